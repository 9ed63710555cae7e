"""Hang detection, independent of how long a step takes: each rank's Heartbeat, polled on its own channel.

A worker answers Heartbeat at once, without waiting for the model (a step in flight does not delay it), so a rank
that answers nothing for hang_timeout_s is stopped, stuck or unreachable. A worker that last said it was
compiling a graph (which may keep it from answering for a while) gets compile_timeout_s instead. A worker without
the Heartbeat call (an older build) is asked its grpc health instead.
"""

from __future__ import annotations

import time

from vllm_ext.client import WorkerClient, WorkerError


class HangDetector:
    def __init__(self, hang_timeout_s: float, compile_timeout_s: float):
        self.hang_timeout_s, self.compile_timeout_s = hang_timeout_s, compile_timeout_s
        self.last_answer: dict[str, float] = {}   # address -> time.monotonic() of its last answer
        self.compiling: dict[str, bool] = {}
        self.no_heartbeat: set[str] = set()        # workers that answer Heartbeat UNIMPLEMENTED

    def reset(self) -> None:
        """Forget every worker (after the group was lost: the next ones start afresh)."""
        self.last_answer.clear()
        self.compiling.clear()

    def poll(self, beats: list[WorkerClient]) -> tuple[str | None, bool]:
        """One heartbeat per rank. Returns (why a rank counts as lost, hung) or (None, False): hung when it went
        silent; not hung when its port refuses connections (the process is gone)."""
        for b in beats:
            now = time.monotonic()
            self.last_answer.setdefault(b.address, now)
            try:
                if b.address in self.no_heartbeat:
                    b.health(timeout=1.0)
                    self.compiling[b.address] = False
                else:
                    self.compiling[b.address] = b.heartbeat(timeout=1.0).compiling
                self.last_answer[b.address] = time.monotonic()
                continue
            except WorkerError as e:
                if e.code is not None and e.code.name == "UNIMPLEMENTED" and b.address not in self.no_heartbeat:
                    self.no_heartbeat.add(b.address)
                    continue
                if e.code is not None and e.code.name == "UNAVAILABLE" and not b.closed:
                    return str(e), False
                last = e.details
            silent = time.monotonic() - self.last_answer[b.address]
            compiling = self.compiling.get(b.address, False)
            limit = self.compile_timeout_s if compiling else self.hang_timeout_s
            if silent > limit:
                return (f"ms_rpc worker {b.address}: no heartbeat for {silent:.1f} s (limit {limit:g} s"
                        f"{', it was compiling' if compiling else ''}): stopped, stuck or unreachable "
                        f"(last: {last})"), True
        return None, False
