"""The ModelWorker calls: version checks, the handshake's order, step numbering, deferred sampling, liveness and
heartbeat, over the request state (state.py) and the runner (runner.py).

Execute applies step N only right after step N-1, and only once the whole step is checked: a refused step changes
nothing and the worker keeps serving. Each call's refusal names the worker (and the step).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

import grpc
import numpy as np

from ms_rpc.v1 import FEATURE_LOGPROB_TOKEN_IDS, FEATURE_STEPS_IN_FLIGHT, PROTOCOL_VERSION, STEP_ORDER_GRACE_S
from ms_rpc.v1 import worker_pb2 as pb

from . import memory
from .runner import Runner
from .sampler import Sampler
from .state import Limits, Requests, StepRefused

log = logging.getLogger("ms_rpc.reference")
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def decode_bitmask(request, vocab: int, step_ids: set[str]) -> dict[str, np.ndarray]:
    """A SampleRequest's packed grammar bitmask -> {req_id: boolean mask [vocab]}, one row per structured request."""
    ids, words = list(request.structured_req_ids), request.bitmask_words
    unknown = sorted(set(ids) - step_ids)
    if unknown:
        raise ValueError(f"grammar bitmask for requests not in the step: {unknown[:3]}")
    if len(set(ids)) != len(ids):
        raise ValueError("grammar bitmask names a request more than once")
    if len(request.grammar_bitmask) != len(ids) * words * 4 or (ids and words * 32 < vocab):
        raise ValueError(f"grammar bitmask of {len(request.grammar_bitmask)} bytes does not hold {len(ids)} rows of "
                         f"{words} words covering {vocab} tokens")
    if not ids:
        return {}
    packed = np.frombuffer(request.grammar_bitmask, "<i4").reshape(len(ids), words)
    bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    return dict(zip(ids, bits))


class Service:
    def __init__(self, cfg, backend, model_path: str, framework: str, kv_cache_bytes: int, on_cache_ready=None,
                 min_step_s: float = 0.0):
        """`min_step_s`: every Execute answers no sooner than this after it began (--simulate-step-ms)."""
        self.cfg = cfg
        self.min_step_s = min_step_s
        self.backend = backend
        self.model_path = model_path
        self.framework = framework
        self.kv_cache_bytes = kv_cache_bytes          # when the front asks for neither bytes nor a fraction
        self.on_cache_ready = on_cache_ready or (lambda: None)
        self.worker_id = uuid.uuid4().hex[:12]
        self.lock = threading.Lock()                  # one step (or probe) at a time
        self.step_done = threading.Condition(self.lock)   # a step call ended: an early successor may be due
        self.requests: Requests | None = None
        self.runner: Runner | None = None
        self.next_step = 0
        self.pending = None                           # (step_id, plan, forward) of a deferred step
        self.running = (0, 0.0)                       # (step id, monotonic start) of the step in flight
        self.busy_s = 0.0                             # seconds in step calls (HeartbeatReply.busy_s)
        self.stopping = threading.Event()

    # -- helpers ---------------------------------------------------------------------------------------------
    def _version(self, request, context) -> None:
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(FAILED_PRECONDITION, f"worker {self.worker_id}: protocol version mismatch: the front "
                                               f"speaks ms_rpc v{request.protocol_version}, this worker speaks "
                                               f"v{PROTOCOL_VERSION}")

    def _need_cache(self, call: str, context) -> None:
        if self.requests is None:
            context.abort(FAILED_PRECONDITION, f"worker {self.worker_id}: {call} before InitializeCache")

    def bytes_per_block(self, block_size: int) -> int:
        c = self.cfg
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * block_size * 4

    # -- handshake -------------------------------------------------------------------------------------------
    def Describe(self, request, context):
        self._version(request, context)
        c = self.cfg
        return pb.WorkerInfo(
            protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, framework=self.framework, device="cpu",
            dtype="float32", model_path=self.model_path, rank=0, world_size=1, features=[FEATURE_STEPS_IN_FLIGHT, FEATURE_LOGPROB_TOKEN_IDS],
            model=pb.ModelInfo(architecture=c.architecture, vocab_size=c.vocab_size, num_layers=c.num_layers,
                               num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                               hidden_size=c.hidden_size, max_position_embeddings=c.max_position_embeddings,
                               sliding_window=c.sliding_window))

    def DetermineAvailableMemory(self, request, context):
        self._version(request, context)
        if request.block_size <= 0:
            context.abort(INVALID_ARGUMENT, f"worker {self.worker_id}: block_size must be positive")
        util = request.gpu_memory_utilization
        if not 0.0 <= util <= 1.0:
            context.abort(INVALID_ARGUMENT, f"worker {self.worker_id}: gpu_memory_utilization {util} is not in (0, 1]")
        requested = request.requested_bytes or (0 if util else self.kv_cache_bytes)
        weights = self.backend.weight_bytes()
        try:
            s = memory.size_kv_cache(self.cfg, weights, requested, util, request.max_num_batched_tokens or 2048,
                                     request.max_num_seqs or 256)
        except memory.SizeError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if e.exhausted else FAILED_PRECONDITION,
                          f"worker {self.worker_id}: KV cache size: {e}")
        return pb.MemoryInfo(available_kv_bytes=s.available, bytes_per_block=self.bytes_per_block(request.block_size),
                             weight_bytes=weights, total_bytes=s.total, free_bytes=s.free, budget_bytes=s.budget,
                             runtime_bytes=s.runtime, activation_peak_bytes=s.activation, sized_by=s.sized_by)

    def InitializeCache(self, request, context):
        self._version(request, context)
        c = self.cfg
        why = None
        if request.num_layers and request.num_layers != c.num_layers:
            why = f"cache config is for {request.num_layers} layers, the model has {c.num_layers}"
        elif request.num_blocks <= 0 or request.block_size <= 0:
            why = "num_blocks and block_size must be positive"
        elif request.HasField("speculative"):
            why = "speculative decoding is not implemented by this worker (no spec_decode feature)"
        if why:
            context.abort(INVALID_ARGUMENT, f"worker {self.worker_id}: {why}")
        need = request.num_blocks * self.bytes_per_block(request.block_size)
        with self.lock:
            self.backend.allocate_kv_cache(request.num_blocks, request.block_size)
            max_len = min(request.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
            self.requests = Requests(Limits(request.num_blocks, request.block_size, c.vocab_size, max_len,
                                            request.max_num_seqs, request.max_num_batched_tokens))
            self.runner = Runner(self.backend, Sampler(request.sampling_seed))
            self.next_step, self.pending = 1, None
        self.on_cache_ready()
        return pb.CacheInfo(allocated_bytes=need, next_step_id=1)

    def Warmup(self, request, context):
        self._version(request, context)
        self._need_cache("Warmup", context)
        t0 = time.perf_counter()
        with self.lock:
            self.runner.probe()
        return pb.WarmupReply(seconds=time.perf_counter() - t0, compiled_shapes=0)

    # -- steps -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _in_order(self, due, early):
        """The step lock, for a call that is `due` now. An `early` call (sent right after its predecessor, which
        has not been applied yet: two steps in flight) first waits for it, STEP_ORDER_GRACE_S at most while no
        step runs; then the usual order checks decide. Yields the seconds the call waited (StepTimings.wait_s)."""
        entered = time.monotonic()
        with self.step_done:
            give_up = entered + STEP_ORDER_GRACE_S
            while not due() and early() and time.monotonic() < give_up:
                self.step_done.wait(give_up - time.monotonic())
            began = time.monotonic()
            try:
                yield began - entered
            finally:
                self.busy_s += time.monotonic() - began
                self.step_done.notify_all()

    def Execute(self, request, context):
        self._version(request, context)
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is shutting down")
        with self._in_order(lambda: self.requests is not None and self.pending is None
                            and request.step_id == self.next_step,
                            lambda: self.requests is not None and request.step_id >= self.next_step) as waited:
            self._need_cache("Execute", context)
            if self.pending is not None:
                context.abort(FAILED_PRECONDITION, f"worker {self.worker_id}: step {self.pending[0]} was deferred "
                                                   f"and awaits Sample before step {request.step_id}")
            if request.step_id != self.next_step:
                context.abort(FAILED_PRECONDITION, f"worker {self.worker_id}: step {request.step_id} out of order, "
                                                   f"expected step {self.next_step}")
            t0 = time.perf_counter()
            try:
                plan = self.requests.apply(request)
            except StepRefused as e:
                context.abort(INVALID_ARGUMENT, f"worker {self.worker_id} step {request.step_id} refused: {e}")
            self.next_step += 1
            self.running = (request.step_id, time.monotonic())
            try:
                fwd = self.runner.forward(plan)
                if request.defer_sampling:
                    self.pending = (request.step_id, plan, fwd, t0)
                    reply = pb.StepResult(step_id=request.step_id, worker_id=self.worker_id)
                    for s in plan.scheduled:
                        reply.results.add(req_id=s.req.req_id)
                else:
                    reply = self._sample(request.step_id, plan, fwd, {}, t0)
                left = t0 + self.min_step_s - time.perf_counter()
                if left > 0:
                    time.sleep(left)
                    if not request.defer_sampling:
                        reply.timings.total_s = time.perf_counter() - t0
                reply.timings.wait_s = waited
                return reply
            finally:
                self.running = (0, 0.0)

    def Sample(self, request, context):
        self._version(request, context)
        with self._in_order(lambda: self.pending is not None and self.pending[0] == request.step_id,
                            lambda: request.step_id >= self.next_step) as waited:
            pending = self.pending
            if pending is None or pending[0] != request.step_id:
                context.abort(FAILED_PRECONDITION, f"worker {self.worker_id}: Sample for step {request.step_id}, "
                                                   f"but the deferred step is {pending[0] if pending else 'none'}")
            step_id, plan, fwd, t0 = pending
            ids = {s.req.req_id for s in plan.scheduled} | set(plan.refused)
            try:
                allowed = decode_bitmask(request, self.cfg.vocab_size, ids)
            except ValueError as e:
                context.abort(INVALID_ARGUMENT, f"worker {self.worker_id}: Sample for step {step_id} refused: {e}")
            self.pending = None
            reply = self._sample(step_id, plan, fwd, allowed, t0)
            reply.timings.wait_s = waited
            return reply

    def _sample(self, step_id: int, plan, fwd, allowed, t0: float) -> pb.StepResult:
        t1 = time.perf_counter()
        reply = pb.StepResult(step_id=step_id, worker_id=self.worker_id)
        for s, o in zip(plan.scheduled, self.runner.sample(plan, fwd, allowed)):
            r = reply.results.add(req_id=s.req.req_id, sampled_token_ids=o.tokens)
            if o.sampled is not None and o.sampled.logprob_ids is not None:
                r.logprobs.token_ids.extend(o.sampled.logprob_ids)
                r.logprobs.logprobs.extend(o.sampled.logprobs)
                r.logprobs.ranks.append(o.sampled.rank)
            if o.prompt is not None:
                ids, lps, ranks = o.prompt
                r.prompt_logprobs.width = ids.shape[1]
                r.prompt_logprobs.token_ids.extend(ids.ravel().tolist())
                r.prompt_logprobs.logprobs.extend(lps.ravel().tolist())
                r.prompt_logprobs.ranks.extend(ranks.tolist())
        for rid, why in plan.refused.items():
            reply.results.add(req_id=rid, error=f"worker {self.worker_id} step {step_id} refused {why}")
        now = time.perf_counter()
        reply.timings.forward_s, reply.timings.sample_s, reply.timings.total_s = t1 - t0, now - t1, now - t0
        log.debug("step %d: %d requests, %d tokens, %d refused alone, %.1f ms", step_id, len(plan.scheduled),
                  sum(s.count for s in plan.scheduled), len(plan.refused), (now - t0) * 1e3)
        return reply

    # -- liveness --------------------------------------------------------------------------------------------
    def CheckLiveness(self, request, context):
        self._version(request, context)
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is shutting down")
        wait = context.time_remaining()
        if not self.lock.acquire(timeout=max(0.1, (wait if wait is not None else 30.0) - 0.5)):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"worker {self.worker_id}: liveness: a step held the "
                                                             f"model for the whole deadline")
        try:
            self._need_cache("CheckLiveness", context)
            t0 = time.perf_counter()
            logits = self.runner.probe()
            dt = time.perf_counter() - t0
            if logits.shape != (1, self.cfg.vocab_size) or not np.isfinite(logits).all():
                context.abort(grpc.StatusCode.INTERNAL, f"worker {self.worker_id}: liveness forward returned bad "
                                                        f"logits")
            return pb.LivenessReply(worker_id=self.worker_id, forward_s=dt, next_step_id=self.next_step,
                                    requests_active=len(self.requests))
        finally:
            self.lock.release()

    def Heartbeat(self, request, context):
        self._version(request, context)
        step_id, started = self.running
        running_s = time.monotonic() - started if step_id else 0.0
        return pb.HeartbeatReply(worker_id=self.worker_id, step_id=step_id, step_s=running_s,
                                 busy_s=self.busy_s + running_s)

    def Shutdown(self, request, context):
        self._version(request, context)
        self.stopping.set()
        return pb.ShutdownReply()
