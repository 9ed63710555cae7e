"""Where a step's time goes, as the executor sees it: encode, the RPC (transfer + the worker's own prepare,
forward and sample, which the worker reports in StepResult.timings), and decode. The RPC counts from before the
send to the moment the last rank's reply reached this process (not when the engine collects it: with two steps
in flight that is later), so transfer is the wire's share alone. Logged every interval as one line
`ms_rpc step breakdown ...` (scripts/bench.py reads it). Beside it, `engine`: vLLM's own time between
two back-to-back steps (scheduling, output processing) -- what overlapping the next schedule with the worker's
compute could hide (what --async-scheduling overlaps: it counts the steps sent while the previous one was in
flight)."""

from __future__ import annotations

import time

PARTS = ("encode", "transfer", "prepare", "forward", "sample", "decode")
BUSY_GAP_S = 0.5        # a longer gap between steps is idle time, not the engine's work


class StepStats:
    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.sums = dict.fromkeys(PARTS, 0.0)
        self.steps = 0
        self.since = now
        self.engine_s, self.gaps = 0.0, 0
        self.last_end: float | None = None
        self.sent, self.overlapped = 0, 0
        self.waited_s = 0.0              # the workers' wait behind the step ahead (StepTimings.wait_s)

    def step_started(self) -> None:
        now = time.perf_counter()
        if self.last_end is not None and now - self.last_end < BUSY_GAP_S:
            self.engine_s += now - self.last_end
            self.gaps += 1

    def step_sent(self, while_busy: bool) -> None:
        """A step sent to the workers, `while_busy`: while the previous one was still in flight (async scheduling)."""
        self.sent += 1
        self.overlapped += while_busy

    def step_ended(self) -> None:
        self.last_end = time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.sums[part] += seconds

    def add_rpc(self, rpc: str, rpc_s: float, timings) -> None:
        """One step RPC: its round trip and the worker's timings (prepare/forward/sample/total, and the wait behind
        the step ahead, which is not the wire's). A deferred step (Execute runs the forward, Sample samples)
        reports its timings once, in the Sample reply; its transfer is the Sample round trip less the sampling
        (the Execute round trip holds the forward, untimed)."""
        if timings.total_s == 0:
            return                       # the first half of a deferred step
        worker_s = (timings.sample_s if rpc == "sample" else timings.total_s) + timings.wait_s
        self.sums["transfer"] += max(0.0, rpc_s - worker_s)
        self.waited_s += timings.wait_s
        self.sums["prepare"] += timings.prepare_s
        self.sums["forward"] += timings.forward_s
        self.sums["sample"] += timings.sample_s
        self.steps += 1

    def line(self) -> str:
        total = sum(self.sums.values()) or 1e-12
        n = max(self.steps, 1)
        parts = " ".join(f"{p}={1e3 * self.sums[p] / n:.2f}ms({100 * self.sums[p] / total:.1f}%)" for p in PARTS)
        outside = sum(self.sums[p] for p in ("encode", "transfer", "prepare", "decode"))
        engine = 1e3 * self.engine_s / max(self.gaps, 1)
        return (f"ms_rpc step breakdown over {self.steps} steps: {parts} "
                f"outside_forward_sample={100 * outside / total:.1f}% (engine between steps: {engine:.2f}ms; "
                f"sent while the previous step was in flight: {self.overlapped} of {self.sent}, waiting behind it "
                f"{1e3 * self.waited_s / n:.2f}ms)")

    def maybe_log(self, log) -> None:
        now = time.monotonic()
        if self.interval_s <= 0 or now - self.since < self.interval_s or not self.steps:
            return
        log.info("%s", self.line())
        self._reset(now)
