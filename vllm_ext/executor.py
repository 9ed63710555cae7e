"""MsRpcExecutor: vLLM's executor interface, answered by a remote MindSpore worker over gRPC.

The engine core calls, in order: get_kv_cache_specs -> determine_available_memory -> initialize_from_config ->
compile_or_warm_up_model -> execute_model once per step. Each call maps onto one ms_rpc.v1 RPC; each step's
SchedulerOutput travels as a numbered delta (codec.py), and the reply becomes a ModelRunnerOutput.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import torch
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheSpec, MLAAttentionSpec,
                                        SlidingWindowSpec)
from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

from ms_rpc.v1 import FEATURE_LORA, FEATURE_SPEC_DECODE_NGRAM, FEATURE_STEPS_IN_FLIGHT
from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import WorkerError
from vllm_ext.codec import decode_result, encode_grammar, encode_step
from vllm_ext.group import ConfigError, WorkerGroup, group_addresses
from vllm_ext.heartbeat import HangDetector
from vllm_ext.launcher import default_worker_python
from vllm_ext.lora import LoraAdapters
from vllm_ext.stats import StepStats

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_SECURITY_KEYS = ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token", "token_file")

# name: default (its type is the setting's). Each from --additional-config '{"ms_rpc": {name: ...}}', else MS_RPC_<NAME>.
_NUMBERS = {
    "connect_timeout_s": 30.0,        # wait for a worker's health SERVING at start-up
    "step_timeout_s": 600.0,          # the longest any step may take (the cap of the step deadline)
    "step_deadline_floor_s": 120.0,   # the step deadline: max(floor, factor x p90 of the last 64 steps)
    "step_deadline_factor": 10.0,
    "reconnect_timeout_s": 300.0,     # external workers: how long to wait for a lost worker to come back
    "max_restarts": 5,                # local workers: restarts within restart_window_s before giving up
    "restart_window_s": 600.0,
    "watch_interval_s": 2.0,          # how often the workers' health is checked (SERVING, not draining)
    "heartbeat_interval_s": 1.0,      # how often each rank's heartbeat is polled, during steps and between them
    "hang_timeout_s": 5.0,            # a rank that answers no heartbeat this long is hung (step_deadline_floor_s
                                      # while it said it was compiling)
    "stats_interval_s": 30.0,         # how often the step breakdown is logged (0 = never)
}


def rpc_settings(vllm_config) -> dict:
    """ms_rpc settings: `--additional-config '{"ms_rpc": {...}}'` first, then MS_RPC_* environment variables.

    Security (for external workers; see ChannelSecurity): tls (bool), tls_ca, tls_cert + tls_key (mutual TLS),
    tls_server_name, token or token_file; MS_RPC_TLS=1, MS_RPC_TLS_CA, ... likewise. Numbers: see _NUMBERS."""
    extra = (vllm_config.additional_config or {}).get("ms_rpc", {}) or {}
    security = {k: extra.get(k, os.environ.get(f"MS_RPC_{k.upper()}")) for k in _SECURITY_KEYS}
    tls = security["tls"]
    security["tls"] = tls if isinstance(tls, bool) else str(tls or "").strip().lower() in ("1", "true", "yes", "on")
    workers = extra.get("workers")
    if workers is None and os.environ.get("MS_RPC_WORKERS"):
        workers = [w.strip() for w in os.environ["MS_RPC_WORKERS"].split(",") if w.strip()]
    settings = dict(
        workers=list(workers or []),
        worker_python=extra.get("worker_python") or os.environ.get("MS_RPC_WORKER_PYTHON") or default_worker_python(),
        worker_args=list(extra.get("worker_args") or os.environ.get("MS_RPC_WORKER_ARGS", "").split()),
        security=security,
    )
    for name, default in _NUMBERS.items():
        raw = extra.get(name, os.environ.get(f"MS_RPC_{name.upper()}", default))
        try:
            settings[name] = type(default)(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"ms_rpc setting {name} must be a number, got {raw!r}") from None
    return settings


def speculative_config(vllm_config) -> pb.SpeculativeConfig | None:
    """vLLM's --speculative-config as the workers serve it: method ngram (support.py refuses the others), drafts
    proposed and verified on the worker."""
    sc = vllm_config.speculative_config
    if sc is None:
        return None
    return pb.SpeculativeConfig(method=sc.method, num_speculative_tokens=sc.num_speculative_tokens,
                                prompt_lookup_min=sc.prompt_lookup_min, prompt_lookup_max=sc.prompt_lookup_max)


def check_tensor_parallel_size(model: str, size: int) -> None:
    """Refuses a tensor-parallel size the workers cannot serve for a local model directory before any worker starts
    (heads that do not divide, a mixture-of-experts model at size > 1); the workers check the same."""
    if size <= 1 or not os.path.isdir(model):
        return
    from ms_models.config import ModelConfig
    from ms_models.parallel import check_tensor_parallel

    try:
        cfg = ModelConfig.from_model_dir(model)
    except (OSError, ValueError):  # UnsupportedModelError included: the workers report it, naming the model
        return
    problem = check_tensor_parallel(cfg, size)
    if problem:
        raise ConfigError(f"ms_rpc: {problem} (model: {model})")


def check_same_model(info: pb.WorkerInfo, model_config, address: str) -> None:
    hf = model_config.hf_config
    expected = {
        "architecture": (getattr(hf, "architectures", None) or ["?"])[0],
        "vocab_size": model_config.get_vocab_size(),
        "num_layers": hf.num_hidden_layers,
        "num_heads": hf.num_attention_heads,
        # multi-head latent attention: one cached latent "head" per token (vLLM's MLA cache)
        "num_kv_heads": 1 if model_config.use_mla else model_config.get_total_num_kv_heads(),
        "head_dim": model_config.get_head_size(),
        "hidden_size": model_config.get_hidden_size(),
    }
    got = {k: getattr(info.model, k) for k in expected}
    diff = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    if not diff and info.model.config_hash and os.path.isdir(model_config.model):
        # The same pure-Python ModelConfig the worker built (no MindSpore), from the directory vLLM serves.
        from ms_models.config import ModelConfig

        try:
            front_hash = ModelConfig.from_model_dir(model_config.model, dtype=info.dtype or "float32").config_hash
        except (OSError, ValueError) as e:  # UnsupportedModelError is a ValueError
            raise ConfigError(f"ms_rpc: cannot read the model config of {model_config.model} "
                              f"to compare with worker {address}: {e}") from e
        if front_hash != info.model.config_hash:
            diff["config_hash"] = (front_hash, info.model.config_hash)
    if diff:
        detail = ", ".join(f"{k}: front {a} vs worker {b}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"ms_rpc worker {address} serves a different model ({info.model_path}) than vLLM's "
            f"{model_config.model}: {detail}"
        )


@dataclass
class _Call:
    """A step RPC in flight on every rank."""
    rpc: str            # "Execute" or "Sample"
    calls: list         # one grpc future per rank
    deadline: float
    t0: float


@dataclass
class _Step:
    """One step between its send and its output."""
    step_id: int
    so: object                                   # vLLM's SchedulerOutput
    defer: bool                                  # sampled by a Sample call, with the engine's grammar bitmask
    execute: _Call | None = None
    sample: _Call | None = None
    output: ModelRunnerOutput | None = None      # set when the step failed without a reply
    in_flight: bool = False                      # sent, its output not back yet


class WorkerLost(RuntimeError):
    """The workers can no longer continue the batch: a worker died, restarted, missed its deadline or refused a
    step. Every request they held fails; the executor recovers them in the background."""


class MsRpcExecutor(Executor):
    """Faults: when the workers are lost mid-batch, every request they held state for ends with an error (vLLM's
    FINISHED_ERROR: a 500, or an error event in a stream) at once, the prefix cache is reset before the next
    schedule (the KV blocks it points to are gone), and a background thread brings the workers back (local ones
    restarted with backoff, external ones reconnected when systemd or Kubernetes restarted them) and re-runs the
    handshake. Requests that come while the workers are down fail fast. Only after repeated crashes, or an
    external worker gone longer than reconnect_timeout_s, does the executor give up through vLLM's failure
    callback (vLLM's health turns red and the server stops)."""

    uses_ray = False
    supports_pp = False

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True

    # -- start-up ------------------------------------------------------------------------------------------
    def _init_executor(self) -> None:
        pc = self.parallel_config
        if pc.pipeline_parallel_size != 1:
            raise ConfigError("ms_rpc serves pipeline parallel size 1 (tensor and data parallel are supported)")
        check_tensor_parallel_size(self.model_config.model, pc.tensor_parallel_size)
        self.settings = rpc_settings(self.vllm_config)
        self._speculative = speculative_config(self.vllm_config)
        self._drafts: DraftTokenIds | None = None   # the drafts the last step's workers proposed
        self._failure_callback = None
        self._scheduler = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms_rpc")
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._step = 0
        self._cache: pb.CacheConfig | None = None
        self._live: set[str] = set()            # requests whose state the workers hold
        self._deferred: _Step | None = None       # the step awaiting sample_tokens()
        # vLLM's async scheduling (--async-scheduling; plugin.py keeps it on the CPU platform for ms_rpc): the
        # engine schedules step N+1 while the workers run step N, so two steps are in flight
        self._async = bool(self.scheduler_config.async_scheduling)
        self._in_flight = 0                       # steps sent whose output is not back
        self._down: str | None = None             # why the workers are lost (None: serving)
        self._gave_up: str | None = None
        self.loras = LoraAdapters(self.vllm_config.lora_config)
        self._restarts: deque[float] = deque()
        self._step_times: deque[float] = deque(maxlen=64)
        self.stats = StepStats(self.settings["stats_interval_s"])
        addresses = group_addresses(self.settings["workers"], pc.tensor_parallel_size, pc.data_parallel_index)
        self.group = WorkerGroup(self.settings, self.model_config.model, pc.tensor_parallel_size, addresses)
        try:
            if not addresses:
                self.group.launch()
            self.group.connect(self._check_model)
        except BaseException:
            self.shutdown()
            raise
        i = self.info
        log.info("ms_rpc: %s (%s): %s on %s, %s, model %s", self.group.describe_ranks(),
                 self.group.clients[0].security.describe(), i.framework, i.device, i.dtype, i.model_path)
        from vllm_ext.plugin import await_scheduler

        await_scheduler(self)
        self._watchdog: threading.Thread | None = None   # started once the workers are warm

    @property
    def info(self) -> pb.WorkerInfo:
        return self.group.info

    def _check_model(self, info: pb.WorkerInfo, address: str) -> None:
        check_same_model(info, self.model_config, address)
        if self._speculative is not None and FEATURE_SPEC_DECODE_NGRAM not in info.features:
            raise ConfigError(f"ms_rpc worker {address} does not implement speculative decoding ({FEATURE_SPEC_DECODE_NGRAM}); "
                              f"upgrade it or drop --speculative-config")
        if self._async and FEATURE_STEPS_IN_FLIGHT not in info.features:
            raise ConfigError(f"ms_rpc worker {address} cannot take two steps in flight ({FEATURE_STEPS_IN_FLIGHT}); "
                              f"upgrade it or drop --async-scheduling")
        if self.loras.enabled and FEATURE_LORA not in info.features:
            raise ConfigError(f"ms_rpc worker {address} does not serve LoRA adapters ({FEATURE_LORA}); upgrade it or "
                              f"drop --enable-lora")

    def register_failure_callback(self, callback) -> None:
        self._failure_callback = callback

    def attach_scheduler(self, scheduler) -> None:
        """Called by the plugin once vLLM's engine core has built its scheduler (a plugin.SchedulerHandle): lost
        requests are ended through the scheduler's own error path, and its prefix cache is reset before the first
        schedule after a loss."""
        self._scheduler = scheduler

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        m = self.info.model
        tp = self.group.size
        # The KV cache spec of one rank: its share of the KV heads.
        kw = dict(block_size=self.cache_config.block_size, num_kv_heads=m.num_kv_heads // tp, head_size=m.head_dim,
                  dtype=_DTYPES[self.info.dtype])
        # A windowed model lets vLLM free the blocks that fall out of the window; an MLA model caches one latent row
        # per token (MLAAttentionSpec: no separate V, half of FullAttentionSpec's page for the same head size).
        if self.model_config.use_mla:
            spec = MLAAttentionSpec(**kw)
        elif m.sliding_window:
            spec = SlidingWindowSpec(sliding_window=m.sliding_window, **kw)
        else:
            spec = FullAttentionSpec(**kw)
        return [{f"model.layers.{i}.self_attn.attn": spec for i in range(m.num_layers)}]

    def get_supported_kv_cache_layouts(self) -> list[list[str]]:
        return [["NHD"]]

    def set_kv_cache_layout(self, layout_name: str) -> None:
        pass  # the worker chooses its own cache layout; block ids are what crosses the wire

    def determine_available_memory(self) -> list[int]:
        """KV cache bytes per rank, by vLLM's rule, computed on the workers (ms_worker.memory): vLLM's
        --kv-cache-memory-bytes (VLLM_CPU_KVCACHE_SPACE on the CPU platform sets it), else --gpu-memory-utilization
        of the worker device's memory less weights, runtime and the activation peak of a max_num_batched_tokens
        step. With --num-gpu-blocks-override (and no bytes) vLLM allocates that many blocks whatever the memory:
        the workers are asked for exactly those bytes, so that a cache too large for them fails here too."""
        cc, sc = self.cache_config, self.scheduler_config
        requested = cc.kv_cache_memory_bytes or 0
        if not requested and cc.num_gpu_blocks_override:
            specs = self.get_kv_cache_specs()[0]
            requested = cc.num_gpu_blocks_override * sum(s.page_size_bytes for s in specs.values())
        utilization = 0.0 if requested else float(cc.gpu_memory_utilization)
        if utilization and self.group.local:
            # local ranks share this host: the fraction is the group's, as vLLM's is the instance's
            utilization /= self.group.size
        try:
            infos = self.group.determine_available_memory(cc.block_size, requested, utilization,
                                                          sc.max_num_batched_tokens, sc.max_num_seqs)
        except WorkerError as e:
            raise ConfigError(f"ms_rpc: {e}") from None
        m = min(infos, key=lambda i: i.available_kv_bytes)
        gib = 2**30
        if m.sized_by == "gpu_memory_utilization":
            how = (f"gpu_memory_utilization {utilization:g} x {m.total_bytes / gib:.2f} GiB = "
                   f"{m.budget_bytes / gib:.2f} GiB, less weights {m.weight_bytes / gib:.2f}, runtime "
                   f"{m.runtime_bytes / gib:.2f}, activation peak {m.activation_peak_bytes / gib:.2f} GiB")
        else:
            how = "kv_cache_memory_bytes" if not cc.num_gpu_blocks_override else "num_gpu_blocks_override"
        log.info("ms_rpc: KV cache %.2f GiB per worker (%s; %.2f GiB free on the worker)",
                 m.available_kv_bytes / gib, how, m.free_bytes / gib)
        return [m.available_kv_bytes]

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        cfg = kv_cache_configs[0]
        block_size = cfg.kv_cache_groups[0].kv_cache_spec.block_size
        sc = self.scheduler_config
        self._cache = pb.CacheConfig(
            num_blocks=cfg.num_blocks, block_size=block_size, num_layers=self.info.model.num_layers,
            max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=self.model_config.max_model_len,
            # One seed for every rank: their unseeded random draws stay identical, and so do their request states.
            sampling_seed=secrets.randbits(63) or 1, speculative=self._speculative, lora=self.loras.config(),
        )
        self.group.handshake(self._cache, warmup=False)
        self._step = 0

    def compile_or_warm_up_model(self) -> None:
        """Warmup on every rank. A worker lost here stops start-up with one error naming it (and, for a local
        worker, how it exited): no request has been served yet, so vLLM's supervisor restarts the whole server,
        as for any start-up error. Losses after start-up are recovered in place (_recover)."""
        try:
            self.vllm_config.compilation_config.compilation_time = self.group.warmup()
        except WorkerError as e:
            dead = self.group.local_dead(wait_s=2.0)
            raise ConfigError(f"ms_rpc: start-up failed during the workers' warm-up: {e}"
                              + (f"; local worker {', '.join(dead)} exited" if dead else "")) from None
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="ms_rpc_watch", daemon=True)
            self._watchdog.start()

    @cached_property
    def supported_tasks(self):
        return ("generate",)

    # -- the step --------------------------------------------------------------------------------------------
    def _deadline(self) -> float:
        """The step deadline: well above the recent step times (p90, times a factor; a floor for a new shape to
        compile), never infinite."""
        cap = self.settings["step_timeout_s"]
        if not self._step_times:
            return cap
        recent = sorted(self._step_times)
        derived = self.settings["step_deadline_factor"] * recent[int(0.9 * (len(recent) - 1))]  # p90: not one compile
        return min(cap, max(self.settings["step_deadline_floor_s"], derived))

    def _start_step(self, rpc: str, msg) -> _Call:
        """A step RPC (Execute or Sample) sent to every rank, not waited for."""
        deadline = self._deadline()
        return _Call(rpc, self.group.start_all(rpc, msg, deadline), deadline, time.perf_counter())

    def _finish_step(self, call: _Call, step_id: int) -> pb.StepResult:
        """Waits for a step RPC's replies. Anything that breaks the step sequence raises WorkerLost."""
        try:
            res = self.group.finish_all(call.rpc, call.calls)
        except WorkerError as e:
            if self._down is not None:     # the watchdog found the workers lost and ended this call
                raise WorkerLost(f"step {step_id}: {self._down}") from None
            how = "missed its deadline of %.0f s: " % call.deadline if e.code and e.code.name == "DEADLINE_EXCEEDED" else ""
            raise WorkerLost(f"step {step_id}: {how}{e}") from None
        dt = time.perf_counter() - call.t0
        if res.worker_id != self.info.worker_id:
            raise WorkerLost(f"step {step_id}: ms_rpc worker {self.group.address} restarted (worker id "
                             f"{self.info.worker_id} became {res.worker_id})")
        if res.step_id != step_id:
            raise WorkerLost(f"step {step_id}: ms_rpc worker {self.group.address} answered step {res.step_id}")
        self._step_times.append(dt)
        self.stats.add_rpc(call.rpc.lower(), dt, res.timings)
        return res

    def _track(self, so) -> None:
        self._live.difference_update(so.finished_req_ids)
        self._live.update(r.req_id for r in so.scheduled_new_reqs)

    def _send(self, so) -> _Step:
        """Encodes a step and sends it to the workers without waiting for the reply."""
        if self._gave_up:
            raise RuntimeError(self._gave_up)
        resumed = {r.req_id for r in so.scheduled_new_reqs if r.req_id in self._live}   # V2 model runner
        self._track(so)
        if self._down is not None:
            return _Step(0, so, False, output=self._fail(so, f"ms_rpc workers are down ({self._down}); recovering"))
        if self.loras.enabled:
            self.loras.ensure(self.group, so)
        self._step += 1
        step = _Step(self._step, so, bool(so.has_structured_output_requests))
        self.stats.step_started()
        t0 = time.perf_counter()
        msg = encode_step(so, step.step_id, self.model_config.logprobs_mode, step.defer, resumed)
        self.stats.add("encode", time.perf_counter() - t0)
        try:
            step.execute = self._start_step("Execute", msg)
        except WorkerError as e:
            self._lost(f"step {step.step_id}: {e}")
            step.output = self._fail(so, str(e))
            return step
        with self._lock:
            self.stats.step_sent(self._in_flight > 0)
            self._in_flight += 1
            step.in_flight = True
        return step

    def _landed(self, step: _Step) -> None:
        with self._lock:
            if step.in_flight:
                step.in_flight = False
                self._in_flight -= 1

    def _send_sample(self, step: _Step, grammar_output) -> None:
        """The Sample call of a deferred step, with the grammar bitmask the engine computed for it."""
        if step.output is not None:
            return
        if self._down is not None:
            step.output = self._fail(step.so, f"ms_rpc workers are down ({self._down})")
            return
        try:
            step.sample = self._start_step("Sample", encode_grammar(step.step_id, grammar_output))
        except WorkerError as e:
            self._lost(f"step {step.step_id}: {e}")
            step.output = self._fail(step.so, str(e))

    def _receive(self, step: _Step) -> ModelRunnerOutput:
        """Waits for a step's replies (the forward's, then the sample's when deferred) and decodes them."""
        try:
            if step.output is not None:
                return step.output
            for call in (step.execute, step.sample):
                if call is not None:
                    res = self._finish_step(call, step.step_id)
        except WorkerLost as e:
            self._lost(str(e))
            return self._fail(step.so, str(e))
        finally:
            self._landed(step)
        return self._decode(res)

    def _execute(self, so) -> ModelRunnerOutput | None:
        """One step. With structured-output requests in the batch, the worker only runs the forward here and
        samples in sample_tokens() with the grammar bitmask the engine computes meanwhile (two phases, as vLLM's
        own executors); otherwise it samples at once and the engine skips sample_tokens()."""
        step = self._send(so)
        if step.defer and step.output is None:
            try:
                self._finish_step(step.execute, step.step_id)
            except WorkerLost as e:
                self._landed(step)
                self._lost(str(e))
                return self._fail(so, str(e))
            step.execute = None
            self._deferred = step
            return None
        return self._receive(step)

    def _decode(self, res: pb.StepResult) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        out = decode_result(res)
        refused = [r for r in res.results if r.error]
        if refused:   # refused alone by the workers (their state for it is gone): only these end with an error
            for r in refused:
                log.error("ms_rpc worker %s: %s", self.group.address, r.error)
            self._live.difference_update(r.req_id for r in refused)
            self._end_with_error({r.req_id for r in refused})
        if self._speculative is not None:
            self._drafts = DraftTokenIds([r.req_id for r in res.results],
                                         [list(r.draft_token_ids) for r in res.results])
        self.stats.add("decode", time.perf_counter() - t0)
        self.stats.step_ended()
        self.stats.maybe_log(log)
        return out

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The drafts the workers proposed with the last step's tokens (vLLM asks once per step)."""
        drafts, self._drafts = self._drafts, None
        return drafts

    def execute_model(self, scheduler_output, non_block: bool = False):
        if self._async:
            # Async scheduling: the step goes out now and the engine schedules the next one meanwhile; its output
            # comes from sample_tokens() (from this future when nothing was scheduled: the engine samples nothing)
            step = self._send(scheduler_output)
            if scheduler_output.total_num_scheduled_tokens == 0:
                return self._pool.submit(self._receive, step)
            self._deferred = step
            done: Future = Future()
            done.set_result(None)
            return done
        if non_block:
            return self._pool.submit(self._execute, scheduler_output)
        return self._execute(scheduler_output)

    def _sample(self, grammar_output) -> ModelRunnerOutput:
        step, self._deferred = self._deferred, None
        self._send_sample(step, grammar_output)
        return self._receive(step)

    def sample_tokens(self, grammar_output, non_block: bool = False):
        if self._async:
            step, self._deferred = self._deferred, None
            if step.defer:
                self._send_sample(step, grammar_output)
            return self._pool.submit(self._receive, step)
        if non_block:
            return self._pool.submit(self._sample, grammar_output)
        return self._sample(grammar_output)

    # -- faults ----------------------------------------------------------------------------------------------
    def _fail(self, so, why: str) -> ModelRunnerOutput:
        """An output with no tokens for this step; every request the workers held, and every request of this
        step, ends with an error through the scheduler's own error path when the engine applies it."""
        ids = list(so.num_scheduled_tokens)
        doomed = self._live | set(ids)
        self._live.clear()
        if self._scheduler is None:  # without the plugin's hook there is no way to end them alone
            raise RuntimeError(why)
        if doomed:
            log.error("ms_rpc: %s: ending %d request(s) with an error", why, len(doomed))
            self._end_with_error(doomed)
            # blocks scheduled in this step were cached by hash at scheduling time, but never computed
            self._scheduler.reset_prefix_cache_before_next_schedule()
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=[[] for _ in ids])

    def _end_with_error(self, req_ids: set[str]) -> None:
        """These requests end with vLLM's FINISHED_ERROR when the engine applies this step's output."""
        if self._scheduler is None:
            raise RuntimeError(f"ms_rpc: cannot end requests {sorted(req_ids)[:3]} alone without the plugin's "
                               f"scheduler hook")
        self._scheduler.end_with_error(req_ids)

    def _lost(self, why: str, hung: bool = False) -> None:
        """Mark the workers lost (once), end the calls in flight to them (a step waiting on a hung worker fails
        now), and start bringing them back in the background (hung local workers are killed, not asked to stop)."""
        with self._lock:
            if self._down is not None or self._closing.is_set():
                return
            self._down = why
        log.error("ms_rpc: lost the workers: %s", why)
        if self._scheduler is not None:   # their KV cache is gone, even when no request was running
            self._scheduler.reset_prefix_cache_before_next_schedule()
        self.group.abort()
        threading.Thread(target=self._recover, args=(hung,), name="ms_rpc_recover", daemon=True).start()

    def _give_up(self, why: str) -> None:
        self._gave_up = f"ms_rpc: giving up on the workers: {why}"
        log.error("%s; vLLM's health turns red and the server stops (restart it, or its supervisor will)",
                  self._gave_up)
        if self._failure_callback is not None:
            self._failure_callback()

    def _recover(self, hung: bool = False) -> None:
        """Bring the workers back: local ones are restarted (all ranks; backoff 1, 2, 4 .. 30 s; give up after
        max_restarts within restart_window_s), external ones are waited for (give up after reconnect_timeout_s).
        Then the full handshake again (the new workers hold no requests and an empty KV cache)."""
        s = self.settings
        start, backoff, last = time.monotonic(), 1.0, self._down
        while not self._closing.is_set():
            try:
                if not self.group.external:
                    now = time.monotonic()
                    while self._restarts and now - self._restarts[0] > s["restart_window_s"]:
                        self._restarts.popleft()
                    if len(self._restarts) >= s["max_restarts"]:
                        return self._give_up(f"the local workers were restarted {len(self._restarts)} times in "
                                             f"{s['restart_window_s']:.0f} s; last: {last}")
                    self._restarts.append(now)
                    self.group.stop_local(kill=hung)
                    log.warning("ms_rpc: restarting the local workers (restart %d of at most %d in %.0f s)",
                                len(self._restarts), s["max_restarts"], s["restart_window_s"])
                    self.group.launch()
                self.group.connect(self._check_model, timeout=5.0)
                if self._cache is not None:
                    self.group.handshake(self._cache, warmup=True)
                    self.loras.restore(self.group)   # the new workers hold no adapters
                self._step = 0
                self._step_times.clear()
                self._down = None
                log.warning("ms_rpc: workers back after %.1f s: %s", time.monotonic() - start,
                            self.group.describe_ranks())
                return
            except Exception as e:  # noqa: BLE001 - every failure is retried or ends in a give-up
                last = str(e)
                if isinstance(e, ConfigError):
                    return self._give_up(last)
                if self.group.external and time.monotonic() - start > s["reconnect_timeout_s"]:
                    return self._give_up(f"not back within {s['reconnect_timeout_s']:.0f} s: {last}")
                log.warning("ms_rpc: workers not back yet (%s); retrying in %.0f s", last, backoff)
                self._closing.wait(backoff)
                backoff = min(2 * backoff, 30.0)

    def _watch(self) -> None:
        """Notice a lost worker, whether a step runs or not: a local process that exited, a rank that answers no
        heartbeat for hang_timeout_s (heartbeat.py), or health not SERVING (draining)."""
        s = self.settings
        hang = HangDetector(s["hang_timeout_s"], s["step_deadline_floor_s"])
        next_health = 0.0
        while not self._closing.wait(s["heartbeat_interval_s"]):
            if self._down is not None or self._gave_up:
                hang.reset()
                continue
            dead = self.group.local_dead()
            if dead:
                self._lost(f"local worker {', '.join(dead)} exited")
                continue
            why, hung = hang.poll(list(self.group.beats))
            if why and self._down is None:
                self._lost(why, hung=hung)
                continue
            if time.monotonic() < next_health:
                continue
            next_health = time.monotonic() + s["watch_interval_s"]
            for c in list(self.group.clients):
                try:
                    status = c.health(timeout=1.0)
                except WorkerError as e:
                    # Refused or reset: the process is gone. A slow answer is left to the heartbeat.
                    if e.code is not None and e.code.name == "UNAVAILABLE":
                        self._lost(str(e))
                        break
                    continue
                if status != "SERVING":
                    self._lost(f"ms_rpc worker {c.address}: health {status}")
                    break

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        # No-ops for ms_rpc workers: no multimodal or encoder caches; no MoE collectives across data parallel
        # ranks, so an idle DP rank's dummy batch has nothing to run.
        if name in ("reset_mm_cache", "reset_encoder_cache", "update_max_model_len", "execute_dummy_batch"):
            result: list = [None]
            if non_block:
                f: Future = Future()
                f.set_result(result)
                return f
            return result
        raise NotImplementedError(f"ms_rpc workers do not implement the worker call {name!r}")

    # -- LoRA adapters (vLLM's engine core calls these between steps) ------------------------------------------
    def add_lora(self, lora_request) -> bool:
        return self.loras.add(self.group, lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.loras.remove(self.group, lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self.loras.pin(self.group, lora_id)

    def list_loras(self) -> set[int]:
        return self.loras.list(self.group)

    def check_health(self) -> None:
        if self._gave_up:
            raise RuntimeError(self._gave_up)
        if self._down is not None:
            raise RuntimeError(f"ms_rpc workers are down, recovering: {self._down}")
        # Deep liveness: each rank runs a real one-token forward (waits for a step in flight).
        self.group.check_liveness(timeout=max(30.0, self._deadline()))

    def shutdown(self) -> None:
        if getattr(self, "_closing", None) is not None:
            self._closing.set()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "group", None) is not None:
            self.group.close()
