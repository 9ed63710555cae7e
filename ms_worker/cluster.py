"""The MindSpore cluster of a tensor-parallel worker group: N `ms-worker serve` processes started separately
(systemd instances, pods, by hand), each with --tp-rank I --tp-size N --dist-addr HOST:PORT.

MindSpore's dynamic cluster needs one scheduler process (MS_ROLE=MS_SCHED) listening on HOST:PORT. Rank 0
starts it as its own child process, `python -m ms_worker sched ...` (fork + exec, before rank 0 runs any
MindSpore op), and stops it when it exits; the child also dies with rank 0 (PR_SET_PDEATHSIG) and exits by
itself if rank 0 is gone. Every rank then joins with mindspore.communication.init() (ms_models.runtime.setup),
which waits at most --dist-timeout-s (MS_TOPO_TIMEOUT) for all N ranks.

The scheduler's MindSpore log (its cluster module at WARNING level) goes to a temporary file that rank 0
follows: rank 0 logs each rank that joins and the scheduler's errors, and when the cluster does not form in time
it names the ranks that never registered.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger("ms_worker")

_JOINED = re.compile(r"The new node: (\d+)\(role: MS_WORKER\).*registered successfully")
_MS_LINE = re.compile(r"^\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] [A-Z_]+\(\d+,[0-9a-f]+,[^)]*\):\S+ \[[^\]]*\] (.*)$")


def check_port_free(ip: str, port: int) -> str | None:
    """Why the scheduler could not listen on ip:port (in use, not an address of this host), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError as e:
            return f"cannot listen on {ip}:{port} for the MindSpore cluster scheduler: {e.strerror or e}"
    return None


class Scheduler:
    """Rank 0's child process running MindSpore's cluster scheduler for ``size`` ranks on ``dist_addr``.

    Its log goes to a file that a thread here follows (not to a pipe: while rank 0 waits in
    mindspore.communication.init(), which holds the GIL, nothing here could drain a pipe, and a full pipe
    would stall the scheduler)."""

    MAX_LOG_BYTES = 8 << 20   # the followed file is truncated beyond this

    def __init__(self, dist_addr: str, size: int, device: str, timeout_s: float):
        self.dist_addr, self.size, self.device, self.timeout_s = dist_addr, int(size), device, float(timeout_s)
        self.joined: set[int] = set()
        self.errors: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None
        self._reader: threading.Thread | None = None
        self._tail: list[str] = []      # its last lines, for the error if it exits early
        self.joining = True             # rank 0 still waits in init(): the scheduler exiting now is fatal
        self.stopping = False

    def start(self) -> None:
        # The scheduler waits longer than the ranks, so that a missing rank is reported by rank 0 (which then
        # stops the scheduler) rather than by the scheduler's own timeout.
        cmd = [sys.executable, "-m", "ms_worker", "sched", "--dist-addr", self.dist_addr, "--tp-size",
               str(self.size), "--device", self.device, "--dist-timeout-s", f"{self.timeout_s + 60:g}",
               "--parent-pid", str(os.getpid())]
        # GLOG_v=3 (errors) for everything but the cluster module, whose WARNING lines report registrations.
        env = {**os.environ, "GLOG_v": "3", "MS_SUBMODULE_LOG_v": "{DISTRIBUTED:2}", "GLOG_logtostderr": "1"}
        fd, self.log_path = tempfile.mkstemp(prefix="ms-sched-", suffix=".log")
        os.close(fd)
        with open(self.log_path, "ab") as logf:   # O_APPEND: the follower may truncate the file under it
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env)
        self._reader = threading.Thread(target=self._follow, name="ms-sched-log", daemon=True)
        self._reader.start()
        log.info("started the MindSpore cluster scheduler (pid %d) on %s for %d tensor-parallel ranks",
                 self.proc.pid, self.dist_addr, self.size)

    def wait_listening(self, timeout_s: float) -> str | None:
        """Waits until the scheduler accepts connections (it first imports MindSpore: seconds on a busy host),
        so that rank 0's own join does not use up its time window; returns why it never did, or None."""
        from ms_models.runtime import resolve_dist_addr

        ip, port = resolve_dist_addr(self.dist_addr)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return (f"the cluster scheduler exited (code {self.proc.returncode if self.proc else None}): "
                        + (" | ".join(self.last_lines(3)) or "no output"))
            try:
                with socket.create_connection((ip, port), timeout=1.0):
                    return None
            except OSError:
                time.sleep(0.2)
        return f"the cluster scheduler did not listen on {self.dist_addr} within {timeout_s:g} s"

    def _line(self, line: str) -> None:
        if not line.startswith("[INFO]"):
            self._tail = (self._tail + [line])[-20:]
        m = _JOINED.search(line)
        if m:
            rank = int(m.group(1))
            if rank not in self.joined:
                self.joined.add(rank)
                log.info("tensor-parallel rank %d joined the cluster (%d of %d)", rank, len(self.joined), self.size)
            return
        m = _MS_LINE.match(line)
        if m and m.group(1) in ("ERROR", "CRITICAL"):
            self.errors.append(m.group(2))
            log.warning("cluster scheduler: %s", m.group(2))
        elif not m and line.startswith(("RuntimeError", "ms_worker sched:")):
            self.errors.append(line)
            log.warning("cluster scheduler: %s", line)

    def _follow(self) -> None:
        assert self.proc is not None and self.log_path is not None
        try:
            f = open(self.log_path, "rb")
        except OSError:
            return
        with f:
            partial = b""
            while True:
                chunk = f.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith(b"\n"):
                        self._line(partial.decode(errors="replace").rstrip())
                        partial = b""
                    continue
                if self.proc.poll() is not None:
                    rest = f.read()
                    for line in (partial + rest).decode(errors="replace").splitlines():
                        self._line(line.rstrip())
                    break
                if f.tell() > self.MAX_LOG_BYTES and not partial:
                    try:
                        os.truncate(self.log_path, 0)
                        f.seek(0)
                    except OSError:
                        pass
                time.sleep(0.2)
        code = self.proc.returncode
        if self.stopping:
            return
        if self.joining:
            # rank 0's main thread is inside mindspore.communication.init(), which cannot be interrupted: the
            # cluster cannot form without its scheduler, so end the process with the reason.
            log.error("the MindSpore cluster scheduler on %s exited (code %s) before the cluster formed: %s",
                      self.dist_addr, code, " | ".join(self._tail[-5:]) or "no output")
            logging.shutdown()
            os._exit(2)
        log.error("the MindSpore cluster scheduler on %s exited (code %s): the tensor-parallel group is broken; "
                  "restart all of its ranks", self.dist_addr, code)

    def missing(self) -> list[int]:
        """Ranks that never registered with the scheduler (read from its whole log now)."""
        try:
            with open(self.log_path or "", "rb") as f:
                text = f.read().decode(errors="replace")
            self.joined |= {int(m.group(1)) for m in _JOINED.finditer(text)}
        except OSError:
            pass
        return sorted(set(range(self.size)) - self.joined)

    def last_lines(self, n: int) -> list[str]:
        """The last ``n`` lines of its log that are not INFO."""
        try:
            with open(self.log_path or "", "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip() and not ln.startswith("[INFO]")][-n:]

    def stop(self, grace_s: float = 5.0) -> None:
        self.stopping = True
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


def join_failure_message(rank: int, size: int, dist_addr: str, timeout_s: float, error: Exception,
                         sched: Scheduler | None) -> str:
    """The error a rank logs when the cluster did not form: rank 0 names the missing ranks."""
    if sched is not None:
        missing = sched.missing()
        if sched.proc is not None and sched.proc.poll() is not None:
            return (f"{error}; the cluster scheduler on {dist_addr} exited early (code {sched.proc.returncode}): "
                    + (" | ".join(sched.last_lines(3)) or "no output"))
        if missing:
            joined = sorted(sched.joined)
            note = (f" (rank 0 itself did not reach its scheduler in time: the host may be overloaded)"
                    if 0 in missing else "")
            return (f"tensor-parallel rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                    f"{size} did not join the MindSpore cluster at {dist_addr} within {timeout_s:g} s (joined: "
                    f"{', '.join(map(str, joined)) or 'none'}){note}: start every rank with --tp-size {size} "
                    f"--dist-addr {dist_addr} and its --tp-rank, or raise --dist-timeout-s")
        if sched.errors:
            return f"{error}; the cluster scheduler reported: {sched.errors[-1]}"
        return str(error)
    return (f"{error}. Rank 0 runs the cluster's scheduler on {dist_addr} and names the ranks that did not join "
            f"in its log: check that rank 0 runs with --tp-size {size} and that this host reaches {dist_addr}")


# -------------------------------------------------------------------------------------------- `ms-worker sched`
def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (rank 0) dies; exit now if it already has."""
    if not parent_pid:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:  # fallback where prctl is unavailable
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_scheduler(args) -> int:
    """`ms-worker sched`: MindSpore's cluster scheduler (MS_ROLE=MS_SCHED) for --tp-size workers on
    --dist-addr; returns when the cluster ends (all workers gone) or fails to form."""
    from ms_models.runtime import ClusterJoinError, cluster_env, resolve_dist_addr
    from ms_worker.cli import parse_device

    _die_with_parent(args.parent_pid)
    try:
        ip, port = resolve_dist_addr(args.dist_addr, args.dist_timeout_s)
    except (ValueError, ClusterJoinError) as e:
        print(f"ms_worker sched: {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.update(cluster_env("MS_SCHED", args.tp_size, ip, port, timeout_s=args.dist_timeout_s))
    os.environ.setdefault("GLOG_v", "3")
    kind, index = parse_device(args.device)
    import mindspore as ms
    from mindspore import communication

    ms.set_device({"cpu": "CPU", "ascend": "Ascend"}[kind])
    try:
        communication.init()   # the scheduler: serves the cluster until every worker has left
    except RuntimeError as e:
        print(f"ms_worker sched: {str(e).strip().splitlines()[0] if str(e).strip() else e}", file=sys.stderr,
              flush=True)
        return 1
    return 0
