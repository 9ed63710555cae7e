"""The step pipeline: each SchedulerOutput vLLM schedules goes to every rank as a numbered StepRequest
(codec.encode_step), and rank 0's StepResult comes back as vLLM's ModelRunnerOutput (codec.decode_result).

A step is sent without waiting for its reply (`send`), so that with async scheduling the engine schedules the
next step while the workers run this one (two steps in flight). A step with structured-output requests is
deferred: the workers run its forward, then sample in a second call (`send_sample`) with the grammar bitmask the
engine computed meanwhile. `receive` waits for the replies under the step deadline and checks that they come from
the same workers and answer the same step.

The pipeline owns the step counter (the workers apply step N only after N-1) and the set of requests whose state
the workers hold. Anything that breaks the step sequence is reported to the fault supervisor (supervisor.py): the
step's output then carries no tokens, and every request the workers held ends with an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import WorkerError
from vllm_ext.codec import decode_result, encode_grammar, encode_step

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level


@dataclass
class Call:
    """A step RPC in flight on every rank."""
    rpc: str            # "Execute" or "Sample"
    calls: list         # one grpc future per rank
    deadline: float
    t0: float           # before the send (perf_counter)
    landed: float = 0.0  # when the last rank's reply reached this process, however late `receive` collects it

    def arrived(self, _future) -> None:
        self.landed = time.perf_counter()


@dataclass
class Step:
    """One step between its send and its output."""
    step_id: int
    so: object                                   # vLLM's SchedulerOutput
    defer: bool                                  # sampled by a Sample call, with the engine's grammar bitmask
    execute: Call | None = None
    sample: Call | None = None
    output: ModelRunnerOutput | None = None      # set when the step failed without a reply
    in_flight: bool = False                      # sent, its output not back yet


class WorkerLost(RuntimeError):
    """The workers can no longer continue the batch: a worker died, restarted, missed its deadline or refused a
    step."""


class StepPipeline:
    def __init__(self, group, settings, faults, loras, stats, logprobs_mode, speculative: bool):
        self.group, self.settings, self.faults, self.loras, self.stats = group, settings, faults, loras, stats
        self.logprobs_mode, self.speculative = logprobs_mode, speculative
        self.step = 0                             # the last step id sent
        self.live: set[str] = set()               # requests whose state the workers hold
        self.deferred: Step | None = None         # the step awaiting sample_tokens()
        self.drafts: DraftTokenIds | None = None  # the drafts the last step's workers proposed
        self.step_times: deque[float] = deque(maxlen=64)
        self._lock = threading.Lock()             # guards in_flight: steps land on the executor's pool thread
        self.in_flight = 0                        # steps sent whose output is not back

    def restart(self) -> None:
        """New workers (after a start-up handshake): steps count from 1 again."""
        self.step = 0
        self.step_times.clear()

    def deadline(self) -> float:
        """The step deadline: well above the recent step times (p90, times a factor; a floor for a new shape to
        compile), never infinite."""
        s = self.settings
        if not self.step_times:
            return s.step_timeout_s
        recent = sorted(self.step_times)
        derived = s.step_deadline_factor * recent[int(0.9 * (len(recent) - 1))]  # p90: not one compile
        return min(s.step_timeout_s, max(s.step_deadline_floor_s, derived))

    def _start(self, rpc: str, msg) -> Call:
        """A step RPC (Execute or Sample) sent to every rank, not waited for."""
        deadline, t0 = self.deadline(), time.perf_counter()
        call = Call(rpc, self.group.start_all(rpc, msg, deadline), deadline, t0)
        for future in call.calls:
            future.add_done_callback(call.arrived)
        return call

    def _finish(self, call: Call, step_id: int) -> pb.StepResult:
        """Waits for a step RPC's replies. Anything that breaks the step sequence raises WorkerLost."""
        try:
            res = self.group.finish_all(call.rpc, call.calls)
        except WorkerError as e:
            down = self.faults.down
            if down is not None:     # the watchdog found the workers lost and ended this call
                raise WorkerLost(f"step {step_id}: {down}") from None
            how = "missed its deadline of %.0f s: " % call.deadline if e.code and e.code.name == "DEADLINE_EXCEEDED" else ""
            raise WorkerLost(f"step {step_id}: {how}{e}") from None
        dt = (call.landed or time.perf_counter()) - call.t0
        info = self.group.info
        if res.worker_id != info.worker_id:
            raise WorkerLost(f"step {step_id}: ms_rpc worker {self.group.address} restarted (worker id "
                             f"{info.worker_id} became {res.worker_id})")
        if res.step_id != step_id:
            raise WorkerLost(f"step {step_id}: ms_rpc worker {self.group.address} answered step {res.step_id}")
        self.step_times.append(dt)
        self.stats.add_rpc(call.rpc.lower(), dt, res.timings)
        return res

    def send(self, so) -> Step:
        """Encodes a step and sends it to the workers without waiting for the reply."""
        gave_up, down = self.faults.gave_up, self.faults.down
        if gave_up:
            raise RuntimeError(gave_up)
        resumed = {r.req_id for r in so.scheduled_new_reqs if r.req_id in self.live}   # V2 model runner
        self.live.difference_update(so.finished_req_ids)
        self.live.update(r.req_id for r in so.scheduled_new_reqs)
        if down is not None:
            return Step(0, so, False, output=self._fail(so, f"ms_rpc workers are down ({down}); recovering"))
        if self.loras.enabled:
            self.loras.ensure(self.group, so)
        self.step += 1
        step = Step(self.step, so, bool(so.has_structured_output_requests))
        self.stats.step_started()
        t0 = time.perf_counter()
        msg = encode_step(so, step.step_id, self.logprobs_mode, step.defer, resumed)
        self.stats.add("encode", time.perf_counter() - t0)
        try:
            step.execute = self._start("Execute", msg)
        except WorkerError as e:
            step.output = self._lose(so, e, step.step_id)
            return step
        with self._lock:
            self.stats.step_sent(self.in_flight > 0)
            self.in_flight += 1
            step.in_flight = True
        return step

    def _landed(self, step: Step) -> None:
        with self._lock:
            if step.in_flight:
                step.in_flight = False
                self.in_flight -= 1

    def send_sample(self, step: Step, grammar_output) -> None:
        """The Sample call of a deferred step, with the grammar bitmask the engine computed for it."""
        if step.output is not None:
            return
        down = self.faults.down
        if down is not None:
            step.output = self._fail(step.so, f"ms_rpc workers are down ({down})")
            return
        try:
            step.sample = self._start("Sample", encode_grammar(step.step_id, grammar_output))
        except WorkerError as e:
            step.output = self._lose(step.so, e, step.step_id)

    def receive(self, step: Step) -> ModelRunnerOutput:
        """Waits for a step's replies (the forward's, then the sample's when deferred) and decodes them."""
        try:
            if step.output is not None:
                return step.output
            for call in (step.execute, step.sample):
                if call is not None:
                    res = self._finish(call, step.step_id)
        except WorkerLost as e:
            return self._lose(step.so, e)
        finally:
            self._landed(step)
        return self._decode(res)

    def execute(self, so) -> ModelRunnerOutput | None:
        """One step. With structured-output requests in the batch, the worker only runs the forward here and
        samples in sample() with the grammar bitmask the engine computes meanwhile (two phases, as vLLM's own
        executors); otherwise it samples at once and the engine skips sample_tokens()."""
        step = self.send(so)
        if step.defer and step.output is None:
            try:
                self._finish(step.execute, step.step_id)
            except WorkerLost as e:
                self._landed(step)
                return self._lose(so, e)
            step.execute = None
            self.deferred = step
            return None
        return self.receive(step)

    def sample(self, grammar_output) -> ModelRunnerOutput:
        """The deferred step sampled with the grammar bitmask, and its output."""
        step, self.deferred = self.deferred, None
        self.send_sample(step, grammar_output)
        return self.receive(step)

    def _decode(self, res: pb.StepResult) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        out = decode_result(res)
        refused = [r for r in res.results if r.error]
        if refused:   # refused alone by the workers (their state for it is gone): only these end with an error
            for r in refused:
                log.error("ms_rpc worker %s: %s", self.group.address, r.error)
            self.live.difference_update(r.req_id for r in refused)
            self.faults.end_with_error({r.req_id for r in refused})
        if self.speculative:
            self.drafts = DraftTokenIds([r.req_id for r in res.results],
                                        [list(r.draft_token_ids) for r in res.results])
        self.stats.add("decode", time.perf_counter() - t0)
        self.stats.step_ended()
        self.stats.maybe_log(log)
        return out

    def take_drafts(self) -> DraftTokenIds | None:
        drafts, self.drafts = self.drafts, None
        return drafts

    def _lose(self, so, error: Exception, step_id: int | None = None) -> ModelRunnerOutput:
        """The workers are lost at this step: the supervisor brings them back; this step fails."""
        self.faults.lost(str(error) if step_id is None else f"step {step_id}: {error}")
        return self._fail(so, str(error))

    def _fail(self, so, why: str) -> ModelRunnerOutput:
        """An output with no tokens for this step; every request the workers held, and every request of this
        step, ends with an error through the scheduler's own error path when the engine applies it."""
        ids = list(so.num_scheduled_tokens)
        doomed, self.live = self.live | set(ids), set()
        self.faults.end_lost_requests(doomed, why)
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=[[] for _ in ids])
