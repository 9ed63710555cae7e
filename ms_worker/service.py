"""The gRPC servicer: a thin layer over the model, the per-request state and the runner.

Every call checks the protocol version first. Execute applies step N only right after step N-1, and only after
the whole step message validated: a refused step changes nothing, and the worker keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np

from ms_rpc.v1 import (FEATURE_LOGPROB_TOKEN_IDS, FEATURE_LORA, FEATURE_STEPS_IN_FLIGHT, PROTOCOL_VERSION,
                       STEP_ORDER_GRACE_S)
from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc
from ms_worker import memory, spec
from ms_worker.lora import LoraError, LoraManager
from ms_worker.runner import ModelRunner, RequestOutput
from ms_worker.sampler import Sampler
from ms_worker.state import BatchState, StepError, StepPlan

log = logging.getLogger("ms_worker")


def decode_bitmask(request, vocab_size: int, scheduled: dict[str, int]) -> dict[str, np.ndarray]:
    """The packed grammar bitmask of a SampleRequest -> {req_id: boolean masks [rows, vocabulary]}; a request
    has one row per position it samples (``scheduled[req_id]``: 1 + its drafts), in the order of
    structured_req_ids."""
    words = request.bitmask_words
    ids = list(request.structured_req_ids)
    unknown = set(ids) - set(scheduled)
    if unknown:
        raise ValueError(f"grammar bitmask for requests not in the step: {sorted(unknown)[:3]}")
    n = sum(scheduled[r] for r in ids)
    if len(request.grammar_bitmask) != n * words * 4 or (n and words * 32 < vocab_size):
        raise ValueError(f"grammar bitmask of {len(request.grammar_bitmask)} bytes does not hold {n} rows of "
                         f"{words} words covering {vocab_size} tokens")
    if n == 0:
        return {}
    if len(set(ids)) != len(ids):
        twice = sorted({r for r in ids if ids.count(r) > 1})
        raise ValueError(f"grammar bitmask names requests more than once: {twice[:3]}")
    packed = np.frombuffer(request.grammar_bitmask, dtype="<i4").reshape(n, words)
    bits = np.unpackbits(packed.view(np.uint8).reshape(n, words * 4), axis=1, bitorder="little")
    starts = np.cumsum([0] + [scheduled[r] for r in ids])
    return {rid: bits[starts[i]:starts[i + 1], :vocab_size].astype(bool) for i, rid in enumerate(ids)}


class WorkerService(pb_grpc.ModelWorkerServicer):
    def __init__(self, model, model_path: str, device: str, kv_cache_bytes: int = 0, framework: str = "",
                 rank: int = 0, world_size: int = 1, memory_utilization: float = memory.DEFAULT_UTILIZATION,
                 draft_budget: bool = True):
        """``draft_budget``: with ngram drafts, propose only those that pay for their rows (runner.ModelRunner)."""
        self.model = model
        self.draft_budget = draft_budget
        self.model_path = model_path
        self.device = device
        # The worker's own defaults, for a front that asks for neither a size nor a fraction
        self.kv_cache_bytes = kv_cache_bytes
        self.memory_utilization = memory_utilization
        self._activation: dict[tuple[int, int], int] = {}   # (tokens, seqs) -> measured activation peak bytes
        self.framework = framework
        self.rank, self.world_size = rank, world_size
        self.worker_id = uuid.uuid4().hex[:12]
        self.lock = threading.Lock()       # one step at a time; the model and the state are not shared
        self.turn = threading.Condition(self.lock)   # notified when a step call ends (the next one may be due)
        # MindSpore work runs on one thread: the same forwards called from gRPC's pool threads in turn cost
        # ~110 MiB more RSS (per-thread runtime and allocator state), measured with SmolLM2
        self._model_thread = futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.state: BatchState | None = None
        self.runner: ModelRunner | None = None
        self.next_step = 0                 # 0 = no cache yet
        self.pending: _Deferred | None = None
        self.running = (0, 0.0)            # (step id, time.monotonic() at its start) of the step call in flight
        self.busy_s = 0.0                  # time in step calls (HeartbeatReply.busy_s)
        self.stopping = threading.Event()

    # -- helpers --------------------------------------------------------------------------------------------
    def _on_model_thread(self, fn, *args):
        """``fn(*args)`` on the model thread (its exception raised here)."""
        return self._model_thread.submit(fn, *args).result()

    @contextlib.contextmanager
    def _turn_of(self, due, ahead):
        """Holds the step lock for a step call. A call that is not ``due`` yet but ``ahead`` of the worker (its
        predecessor was sent first but has not been applied: the front keeps two steps in flight) waits for it,
        at most STEP_ORDER_GRACE_S while no step runs; the call then checks its order as usual. Ends by waking
        the waiting calls. Yields the seconds the call waited (StepTimings.wait_s)."""
        entered = time.monotonic()
        with self.turn:
            until = entered + STEP_ORDER_GRACE_S
            while not due() and ahead() and time.monotonic() < until:
                self.turn.wait(until - time.monotonic())
            t0 = time.monotonic()
            try:
                yield t0 - entered
            finally:
                self.busy_s += time.monotonic() - t0
                self.turn.notify_all()

    def _check_version(self, request, context) -> None:
        v = request.protocol_version
        if v != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version mismatch: the front speaks ms_rpc v{v}, this worker speaks v{PROTOCOL_VERSION}",
            )

    def _model_info(self) -> pb.ModelInfo:
        c = self.model.config
        return pb.ModelInfo(
            architecture=c.architecture, vocab_size=c.vocab_size, num_layers=c.num_layers, num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_size=c.hidden_size,
            max_position_embeddings=c.max_position_embeddings, config_hash=c.config_hash,
            sliding_window=c.sliding_window or 0,
        )

    # -- handshake ------------------------------------------------------------------------------------------
    def Describe(self, request, context):
        self._check_version(request, context)
        return pb.WorkerInfo(
            protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, framework=self.framework,
            device=self.device, dtype=self.model.config.dtype, model_path=self.model_path,
            model=self._model_info(), rank=self.rank, world_size=self.world_size,
            features=[spec.FEATURE, FEATURE_STEPS_IN_FLIGHT, FEATURE_LORA, FEATURE_LOGPROB_TOKEN_IDS],
            experts=self._expert_placement(),
        )

    def _expert_placement(self) -> pb.ExpertPlacement | None:
        n, tp = self.model.config.num_experts, self.model.tp
        if not n:
            return None
        first, stop = tp.experts(n)
        return pb.ExpertPlacement(num_experts=n, expert_parallel=tp.expert_parallel, first_expert=first,
                                  local_experts=stop - first, data_parallel_size=tp.dp_size,
                                  data_parallel_rank=tp.dp_rank)

    def _activation_peak(self, tokens: int, seqs: int) -> int:
        """The activation peak of one step of `tokens` tokens and `seqs` sampled rows, measured once per shape by
        the model's profiling forward on the model thread (ms_worker.memory.activation_peak_bytes)."""
        key = (tokens, seqs)
        if key not in self._activation:
            self._activation[key] = int(self._on_model_thread(
                memory.activation_peak_bytes, self.device, lambda: self.model.profile_run(tokens, seqs)))
        return self._activation[key]

    def DetermineAvailableMemory(self, request, context):
        """The KV cache bytes by vLLM's rule (ms_worker.memory): the front's requested bytes, else its
        gpu_memory_utilization of the device's memory less weights, runtime and activation peak; with neither, this
        worker's --kv-cache-memory-bytes / --gpu-memory-utilization."""
        self._check_version(request, context)
        if request.block_size <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "block_size must be positive")
        util = request.gpu_memory_utilization
        if not (0.0 <= util <= 1.0):      # NaN fails too
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gpu_memory_utilization must be in (0, 1], got {util}")
        requested = request.requested_bytes
        if not requested and not util:
            requested, util = self.kv_cache_bytes, self.memory_utilization
        per_block = self.model.kv_cache_bytes_per_block(request.block_size)
        weights = self.model.weight_bytes()
        peak = 0
        with self.lock:
            m = self.model      # a cache allocated already (a second handshake) is not runtime
            kv_now = (m.num_blocks + 1) * m.kv_cache_bytes_per_block(m.block_size) if m.num_blocks else 0
            total, free = memory.device_memory(self.device)
            runtime = memory.runtime_bytes(self.device, weights, kv_now)
            if not requested:
                tokens, seqs = request.max_num_batched_tokens or 2048, request.max_num_seqs or 256
                guess = memory.estimate_activation_bytes(m.config, tokens, seqs, self.world_size)
                if guess > free:    # a profile this large would only take the worker down
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"KV cache size: a step of {tokens} tokens needs about {guess / 2**30:.2f} GiB of "
                                  f"activations, more than the {free / 2**30:.2f} GiB free on this worker: decrease "
                                  f"--max-num-batched-tokens")
                peak = self._activation_peak(tokens, seqs)
        try:
            b = memory.size_kv_cache(total=total, free=free, weight_bytes=weights, runtime=runtime,
                                     activation_peak=peak, requested_bytes=requested, utilization=util,
                                     device=self.device, per_block=per_block)
        except memory.KvSizeError as e:
            log.error("KV cache size: %s", e)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if e.exhausted else grpc.StatusCode.FAILED_PRECONDITION,
                          f"KV cache size: {e}")
        log.info("KV cache size: %.1f MiB by %s (device %.1f GiB, %.1f GiB free; budget %.1f MiB, weights %.1f "
                 "MiB, runtime %.1f MiB, activation peak %.1f MiB%s)", b.available_kv_bytes / 2**20, b.sized_by,
                 total / 2**30, free / 2**30, b.budget_bytes / 2**20, weights / 2**20, runtime / 2**20,
                 peak / 2**20, "")
        return pb.MemoryInfo(available_kv_bytes=b.available_kv_bytes, bytes_per_block=per_block, weight_bytes=weights,
                             total_bytes=total, free_bytes=free, budget_bytes=b.budget_bytes,
                             runtime_bytes=runtime, activation_peak_bytes=peak,
                             sized_by=b.sized_by)

    def InitializeCache(self, request, context):
        self._check_version(request, context)
        c = self.model.config
        if request.num_layers and request.num_layers != c.num_layers:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"cache config is for {request.num_layers} layers, the model has {c.num_layers}")
        if request.num_blocks <= 0 or request.block_size <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_blocks and block_size must be positive")
        sc = request.speculative if request.HasField("speculative") else None
        if sc is not None and (sc.method != spec.METHOD or not sc.num_speculative_tokens
                               or not 0 < sc.prompt_lookup_min <= sc.prompt_lookup_max):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"speculative decoding: method {sc.method!r} with {sc.num_speculative_tokens} tokens and "
                          f"prompt lookup {sc.prompt_lookup_min}..{sc.prompt_lookup_max}: this worker serves method "
                          f"{spec.METHOD!r} with at least one token and 0 < prompt_lookup_min <= prompt_lookup_max")
        need = request.num_blocks * self.model.kv_cache_bytes_per_block(request.block_size)
        total, free = memory.device_memory(self.device)
        if need > free:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{request.num_blocks} blocks need {need / 2**30:.2f} GiB, more than this host has free "
                          f"({free / 2**30:.2f} of {total / 2**30:.2f} GiB): decrease --kv-cache-memory-bytes, "
                          f"--gpu-memory-utilization or --num-gpu-blocks-override")
        loras = None
        if request.HasField("lora"):
            lc = request.lora
            try:
                with self.lock:
                    slots = self._on_model_thread(self.model.enable_lora, lc.max_loras, lc.max_lora_rank)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"LoRA: {e}")
            loras = LoraManager(slots, lc.max_cpu_loras)
            log.info("LoRA: %d slots of rank %d (%.1f MiB), at most %d adapters held", lc.max_loras,
                     lc.max_lora_rank, slots.weight_bytes() / 2**20, loras.max_cpu_loras)
        with self.lock:
            t0 = time.perf_counter()
            max_len = min(request.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
            max_seqs = request.max_num_seqs or 256
            # with drafts a request samples at 1 + num_speculative_tokens rows: the head graphs cover them
            self._on_model_thread(self.model.allocate_kv_cache, request.num_blocks, request.block_size, max_seqs,
                                  max_len, request.max_num_batched_tokens or max_len,
                                  1 + (sc.num_speculative_tokens if sc is not None else 0))
            self.state = BatchState(request.num_blocks, request.block_size, c.vocab_size, max_len,
                                    request.max_num_seqs, request.max_num_batched_tokens)
            self.state.loras = loras
            self.runner = ModelRunner(self.model, self.state, Sampler(request.sampling_seed), sc,
                                      self.draft_budget)
            self.next_step = 1
            self.pending = None
            log.info("KV cache: %d blocks of %d tokens (%.1f MiB) in %.2f s", request.num_blocks,
                     request.block_size, need / 2**20, time.perf_counter() - t0)
        return pb.CacheInfo(allocated_bytes=need, next_step_id=1)

    def Warmup(self, request, context):
        self._check_version(request, context)
        if self.runner is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Warmup before InitializeCache")
        with self.lock:
            t0 = time.perf_counter()
            n = len(self._on_model_thread(self.model.warmup))
            dt = time.perf_counter() - t0
        log.info("warm-up: %d graphs in %.1f s", n, dt)
        return pb.WarmupReply(seconds=dt, compiled_shapes=n)

    # -- the step -------------------------------------------------------------------------------------------
    def Execute(self, request, context):
        self._check_version(request, context)
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        with self._turn_of(lambda: self.state is not None and self.pending is None
                           and request.step_id == self.next_step,
                           lambda: self.state is not None and request.step_id >= self.next_step) as waited:
            if self.state is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Execute before InitializeCache")
            if self.pending is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"step {self.pending.step_id} was deferred and awaits Sample before step "
                              f"{request.step_id}")
            if request.step_id != self.next_step:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"step {request.step_id} out of order: worker {self.worker_id} expects step {self.next_step}",
                )
            t0 = time.perf_counter()
            try:
                plan = self.state.apply(request)
            except StepError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {request.step_id} refused: {e}")
            self.next_step += 1
            self.running = (request.step_id, time.monotonic())
            try:
                out, forward_s, outputs, sample_s = self._on_model_thread(self._run, plan, not request.defer_sampling)
                step = _Deferred(request.step_id, plan, out, t0, time.perf_counter() - t0 - forward_s - sample_s,
                                 forward_s)
                if request.defer_sampling:
                    self.pending = step
                    reply = pb.StepResult(step_id=request.step_id, worker_id=self.worker_id)
                    for s in plan.scheduled:
                        reply.results.add(req_id=s.req.req_id)
                    return reply
                return self._reply(step, outputs, sample_s, waited)
            finally:
                self.running = (0, 0.0)

    def Sample(self, request, context):
        self._check_version(request, context)
        with self._turn_of(lambda: self.pending is not None and self.pending.step_id == request.step_id,
                           lambda: request.step_id >= self.next_step) as waited:
            step = self.pending
            if step is None or step.step_id != request.step_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"Sample for step {request.step_id}, but the deferred step is "
                              f"{step.step_id if step else 'none'}")
            try:
                allowed = decode_bitmask(request, self.model.config.vocab_size,
                                         {**dict.fromkeys(step.plan.refused, 1),
                                          **{s.req.req_id: 1 + len(s.drafts) for s in step.plan.scheduled}})
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Sample for step {step.step_id} refused: {e}")
            self.pending = None
            self.running = (step.step_id, time.monotonic())
            try:
                t1 = time.perf_counter()
                outputs = self._on_model_thread(self.runner.sample, step.plan, step.out, allowed) if step.out else []
                return self._reply(step, outputs, time.perf_counter() - t1, waited)
            finally:
                self.running = (0, 0.0)

    def _run(self, plan: StepPlan, sample: bool):
        """On the model thread, in one hand-off: the step's forward, then its sampling unless it is deferred.
        Returns (forward output, forward seconds, sampled outputs or None, sampling seconds)."""
        t0 = time.perf_counter()
        out = self.runner.forward(plan) if plan.scheduled else None
        if out is None and plan.refused and self.model.tp.dp_experts:
            # vLLM counts this step as run (it scheduled tokens): the other engines' forward waits for ours
            self.model.dummy_forward()
        t1 = time.perf_counter()
        outputs = None if not sample else self.runner.sample(plan, out, None) if out else []
        return out, t1 - t0, outputs, time.perf_counter() - t1

    def _reply(self, step: "_Deferred", outputs, sample_s: float, waited: float) -> pb.StepResult:
        reply = pb.StepResult(step_id=step.step_id, worker_id=self.worker_id)
        for s, o in zip(step.plan.scheduled, outputs):
            _add_result(reply.results.add(req_id=s.req.req_id), o)
        for req_id, why in step.plan.refused.items():
            log.warning("step %d: refused alone: %s", step.step_id, why)
            reply.results.add(req_id=req_id, error=f"worker {self.worker_id} step {step.step_id} refused {why}")
        t = reply.timings
        t.prepare_s, t.forward_s, t.sample_s, t.wait_s = step.prepare_s, step.forward_s, sample_s, waited
        t.total_s = time.perf_counter() - step.t0
        return reply

    # -- LoRA adapters --------------------------------------------------------------------------------------
    def _loras(self, request, context) -> LoraManager:
        self._check_version(request, context)
        loras = self.state.loras if self.state is not None else None
        if loras is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "LoRA is not enabled on this worker (InitializeCache without a LoRA config)")
        return loras

    def LoadLora(self, request_iterator, context):
        """One adapter from a stream of chunks: read from its path, or from the files the chunks carry."""
        first, files = None, {}
        for chunk in request_iterator:
            if first is None:
                first = chunk
            if chunk.file:
                files.setdefault(chunk.file, []).append(chunk.data)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadLora: an empty stream")
        loras = self._loras(first, context)
        try:
            loras.check_room(first.lora_id, first.name)
            adapter = loras.read(first.lora_id, first.name, first.path, {f: b"".join(d) for f, d in files.items()})
            with self.lock:
                ok = loras.add(adapter, first.replace)
        except LoraError as e:
            log.warning("LoadLora refused: %s", e)
            code = "RESOURCE_EXHAUSTED" if e.full else "NOT_FOUND" if e.missing else "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode[code], f"worker {self.worker_id}: {e}")
        log.info("LoRA adapter %r (id %d, rank %d) %s %s", adapter.name, adapter.lora_id, adapter.rank,
                 "loaded" if ok else "already loaded",
                 "from the files the front sent" if files else f"from {first.path}")
        return pb.LoraReply(ok=ok)

    def RemoveLora(self, request, context):
        loras = self._loras(request, context)
        with self.lock:
            ok = loras.remove(request.lora_id)
        if ok:
            log.info("LoRA adapter id %d removed", request.lora_id)
        return pb.LoraReply(ok=ok)

    def PinLora(self, request, context):
        return pb.LoraReply(ok=self._loras(request, context).pin(request.lora_id))

    def ListLoras(self, request, context):
        return pb.LoraList(lora_ids=self._loras(request, context).ids())

    def Shutdown(self, request, context):
        self._check_version(request, context)
        self.stopping.set()
        return pb.ShutdownReply()

    def Heartbeat(self, request, context):
        """Answered at once, without the model lock: the step in flight and whether a graph is compiling."""
        self._check_version(request, context)
        now = time.monotonic()
        step_id, started = self.running
        compiling = self.model.compiling_since
        return pb.HeartbeatReply(worker_id=self.worker_id, step_id=step_id, step_s=now - started if step_id else 0.0,
                                 busy_s=self.busy_s + (now - started if step_id else 0.0),
                                 compiling=bool(compiling), compiling_s=now - compiling if compiling else 0.0)

    def RunDummyBatch(self, request, context):
        """This engine's part of a step in which it has nothing to run (experts over data-parallel engines: the
        other engines' forward waits for this one in its sparse layers); in turn with the steps."""
        self._check_version(request, context)
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        if not self.model.tp.dp_experts:
            return pb.DummyBatchReply()
        with self._turn_of(lambda: True, lambda: False):
            if self.state is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "RunDummyBatch before InitializeCache")
            t0 = time.perf_counter()
            self._on_model_thread(self.model.dummy_forward)
            return pb.DummyBatchReply(forward_s=time.perf_counter() - t0)

    def CheckLiveness(self, request, context):
        """A real one-token forward, like TGI's health check. It writes nothing (slot -1) and reads only the
        cache's scratch block, so no request's state changes. With experts over data-parallel engines a forward
        would wait for the other engines' (their sparse layers are collectives): there the model thread answers
        without one (forward_s 0)."""
        self._check_version(request, context)
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        wait = context.time_remaining()
        if not self.lock.acquire(timeout=max(0.1, (wait if wait is not None else 30.0) - 0.5)):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "liveness: a step has held the model for the whole "
                                                             "deadline")
        try:
            if self.state is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "liveness: no KV cache yet (InitializeCache first)")
            if self.model.tp.dp_experts:
                self._on_model_thread(lambda: None)
                return pb.LivenessReply(worker_id=self.worker_id, next_step_id=self.next_step,
                                        requests_active=len(self.state.requests))
            t0 = time.perf_counter()
            try:
                logits = self._on_model_thread(self.model.forward, self.model.dummy_batch(1))
            except Exception as e:  # noqa: BLE001 - any failure of the model is the answer
                log.exception("liveness forward failed")
                context.abort(grpc.StatusCode.INTERNAL, f"liveness forward failed: {type(e).__name__}: {e}")
            dt = time.perf_counter() - t0
            if logits.shape != (1, self.model.config.vocab_size) or not np.isfinite(logits).all():
                context.abort(grpc.StatusCode.INTERNAL, f"liveness forward returned bad logits (shape "
                                                        f"{logits.shape}, finite: {bool(np.isfinite(logits).all())})")
            return pb.LivenessReply(worker_id=self.worker_id, forward_s=dt, next_step_id=self.next_step,
                                    requests_active=len(self.state.requests))
        finally:
            self.lock.release()


@dataclass
class _Deferred:
    """A step whose forward ran: its plan, the forward's output and timings (kept until Sample with defer)."""

    step_id: int
    plan: StepPlan
    out: object
    t0: float
    prepare_s: float
    forward_s: float


def _add_result(r: pb.RequestResult, o: RequestOutput) -> None:
    if o.prompt_logprobs is not None:
        ids, lps, ranks = o.prompt_logprobs
        r.prompt_logprobs.width = ids.shape[1]
        r.prompt_logprobs.token_ids.extend(ids.ravel().tolist())
        r.prompt_logprobs.logprobs.extend(lps.ravel().tolist())
        r.prompt_logprobs.ranks.extend(ranks.tolist())
    r.sampled_token_ids.extend(o.tokens)
    for res in o.samples:
        if res.logprob_token_ids is not None:
            r.logprobs.token_ids.extend(res.logprob_token_ids)
            r.logprobs.logprobs.extend(res.logprobs)
            r.logprobs.ranks.append(res.rank)
    if o.drafts:
        r.draft_token_ids.extend(o.drafts)
