"""The fault supervisor: finds lost workers, ends the requests they held, and brings them back.

The workers count as lost when a step breaks (pipeline.py: a worker died, restarted, missed its deadline or
refused a step) or when the watchdog finds, between steps as well, a local process that exited, a rank that
answers no heartbeat (heartbeat.py) or health not SERVING (draining). Then every request the workers held ends
with an error at once (vLLM's FINISHED_ERROR: a 500, or an error event in a stream), the prefix cache is reset
before the next schedule (the KV blocks it points to are gone), and a background thread brings the workers back
(local ones restarted with backoff, external ones reconnected when systemd or Kubernetes restarted them) and
re-runs the handshake. Steps scheduled while the workers are down fail fast. Only after repeated crashes, or an
external worker gone longer than reconnect_timeout_s, does the supervisor give up through vLLM's failure
callback (vLLM's health turns red and the server stops).

Requests end, and the prefix cache is reset, through the scheduler handle the plugin attaches
(plugin.SchedulerHandle).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from vllm_ext.client import WorkerError
from vllm_ext.heartbeat import HangDetector
from vllm_ext.settings import ConfigError

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level


class FaultSupervisor:
    def __init__(self, group, settings, rejoin):
        self.group, self.settings = group, settings
        self.rejoin = rejoin                 # connects to the workers brought back and runs the handshake again
        self.scheduler = None                # a plugin.SchedulerHandle, once the engine core built its scheduler
        self.failure_callback = None         # vLLM's: called on giving up
        self.closing = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._lock = threading.Lock()        # guards the three below
        self._down: str | None = None        # why the workers are lost (None: serving)
        self._gave_up: str | None = None
        self._restarts: deque[float] = deque()   # when the local workers were restarted

    @property
    def down(self) -> str | None:
        with self._lock:
            return self._down

    @property
    def gave_up(self) -> str | None:
        with self._lock:
            return self._gave_up

    def start_watching(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="ms_rpc_watch", daemon=True)
            self._watchdog.start()

    def close(self) -> None:
        self.closing.set()

    def end_with_error(self, req_ids: set[str]) -> None:
        """These requests end with vLLM's FINISHED_ERROR when the engine applies this step's output."""
        if self.scheduler is None:
            raise RuntimeError(f"ms_rpc: cannot end requests {sorted(req_ids)[:3]} alone without the plugin's "
                               f"scheduler hook")
        self.scheduler.end_with_error(req_ids)

    def end_lost_requests(self, req_ids: set[str], why: str) -> None:
        """The requests whose state was on lost workers end with an error, and the blocks cached for them go."""
        if self.scheduler is None:  # without the plugin's hook there is no way to end them alone
            raise RuntimeError(why)
        if req_ids:
            log.error("ms_rpc: %s: ending %d request(s) with an error", why, len(req_ids))
            self.end_with_error(req_ids)
            # blocks scheduled in this step were cached by hash at scheduling time, but never computed
            self.scheduler.reset_prefix_cache_before_next_schedule()

    def lost(self, why: str, hung: bool = False) -> None:
        """Mark the workers lost (once), end the calls in flight to them (a step waiting on a hung worker fails
        now), and start bringing them back in the background (hung local workers are killed, not asked to stop)."""
        with self._lock:
            if self._down is not None or self.closing.is_set():
                return
            self._down = why
        log.error("ms_rpc: lost the workers: %s", why)
        if self.scheduler is not None:   # their KV cache is gone, even when no request was running
            self.scheduler.reset_prefix_cache_before_next_schedule()
        self.group.abort()
        threading.Thread(target=self._recover, args=(hung,), name="ms_rpc_recover", daemon=True).start()

    def _give_up(self, why: str) -> None:
        gave_up = f"ms_rpc: giving up on the workers: {why}"
        with self._lock:
            self._gave_up = gave_up
        log.error("%s; vLLM's health turns red and the server stops (restart it, or its supervisor will)", gave_up)
        if self.failure_callback is not None:
            self.failure_callback()

    def _count_restart(self) -> int | None:
        """Records a restart of the local workers now and returns how many fall within restart_window_s; None
        when max_restarts are used up (nothing recorded)."""
        s = self.settings
        with self._lock:
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > s.restart_window_s:
                self._restarts.popleft()
            if len(self._restarts) >= s.max_restarts:
                return None
            self._restarts.append(now)
            return len(self._restarts)

    def _recover(self, hung: bool = False) -> None:
        """Bring the workers back: local ones are restarted (all ranks; backoff 1, 2, 4 .. 30 s; give up after
        max_restarts within restart_window_s), external ones are waited for (give up after reconnect_timeout_s).
        Then the full handshake again (the new workers hold no requests and an empty KV cache)."""
        s = self.settings
        start, backoff, last = time.monotonic(), 1.0, self.down
        if self.group.dp_size > 1:
            return self._give_up(f"{last}; these workers share their experts with {self.group.dp_size - 1} other "
                                 f"data-parallel engine(s) in one MindSpore cluster, which a lost rank breaks for "
                                 f"all of them (ms_rpc does not rebuild it)")
        while not self.closing.is_set():
            try:
                if not self.group.external:
                    n = self._count_restart()
                    if n is None:
                        return self._give_up(f"the local workers were restarted {s.max_restarts} times in "
                                             f"{s.restart_window_s:.0f} s; last: {last}")
                    self.group.stop_local(kill=hung)
                    log.warning("ms_rpc: restarting the local workers (restart %d of at most %d in %.0f s)",
                                n, s.max_restarts, s.restart_window_s)
                    self.group.launch()
                self.rejoin()
                with self._lock:
                    self._down = None
                log.warning("ms_rpc: workers back after %.1f s: %s", time.monotonic() - start,
                            self.group.describe_ranks())
                return
            except Exception as e:  # noqa: BLE001 - every failure is retried or ends in a give-up
                last = str(e)
                if isinstance(e, ConfigError):
                    return self._give_up(last)
                if self.group.external and time.monotonic() - start > s.reconnect_timeout_s:
                    return self._give_up(f"not back within {s.reconnect_timeout_s:.0f} s: {last}")
                log.warning("ms_rpc: workers not back yet (%s); retrying in %.0f s", last, backoff)
                self.closing.wait(backoff)
                backoff = min(2 * backoff, 30.0)

    def _watch(self) -> None:
        """Notice a lost worker, whether a step runs or not: a local process that exited, a rank that answers no
        heartbeat for hang_timeout_s (heartbeat.py), or health not SERVING (draining)."""
        s = self.settings
        hang = HangDetector(s.hang_timeout_s, s.step_deadline_floor_s)
        next_health = 0.0
        while not self.closing.wait(s.heartbeat_interval_s):
            with self._lock:
                serving = self._down is None and not self._gave_up
            if not serving:
                hang.reset()
                continue
            dead = self.group.local_dead()
            if dead:
                self.lost(f"local worker {', '.join(dead)} exited")
                continue
            why, hung = hang.poll(list(self.group.beats))
            if why:
                self.lost(why, hung=hung)
                continue
            watched = [(c.address, c.watched) for c in self.group.clients]
            not_serving = [f"ms_rpc worker {a}: health {w}" for a, w in watched if w not in (None, "SERVING")]
            if not_serving:                  # said at once by a rank's Health.Watch stream
                self.lost(not_serving[0])
                continue
            if time.monotonic() < next_health:
                continue
            next_health = time.monotonic() + s.watch_interval_s
            for c in list(self.group.clients):
                if c.watched == "SERVING":
                    continue                 # its Health.Watch stream is open and says SERVING
                try:
                    status = c.health(timeout=1.0)
                except WorkerError as e:
                    # Refused or reset: the process is gone. A slow answer is left to the heartbeat.
                    if e.code is not None and e.code.name == "UNAVAILABLE":
                        self.lost(str(e))
                        break
                    continue
                if status != "SERVING":
                    self.lost(f"ms_rpc worker {c.address}: health {status}")
                    break
