"""MsRpcExecutor: vLLM's executor interface, answered by remote MindSpore workers over gRPC.

The engine core builds the executor (which starts or connects to its workers: group.py, with the settings of
settings.py), then calls, in order: get_kv_cache_specs -> determine_available_memory -> initialize_from_config ->
compile_or_warm_up_model, each one ms_rpc.v1 RPC on every rank; then execute_model (and sample_tokens) once per
step, which the step pipeline (pipeline.py) sends as a numbered delta (codec.py) and turns the reply into a
ModelRunnerOutput. The fault supervisor (supervisor.py) finds lost workers and brings them back.
"""

from __future__ import annotations

import logging
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import torch
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheSpec, MLAAttentionSpec,
                                        SlidingWindowSpec)
from vllm.v1.outputs import DraftTokenIds

from ms_rpc.v1 import FEATURE_LORA, FEATURE_SPEC_DECODE_NGRAM, FEATURE_STEPS_IN_FLIGHT
from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import WorkerError
from vllm_ext.group import WorkerGroup, group_addresses
from vllm_ext.lora import LoraAdapters
from vllm_ext.pipeline import StepPipeline
from vllm_ext.settings import ConfigError, RpcSettings
from vllm_ext.stats import StepStats
from vllm_ext.supervisor import FaultSupervisor

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Executors of this process waiting for the scheduler the engine core builds after them: the plugin's
# Scheduler.__init__ hook hands each a plugin.SchedulerHandle (attach_scheduler).
awaiting_scheduler: list = []


def _done(result) -> Future:
    f: Future = Future()
    f.set_result(result)
    return f


def speculative_config(vllm_config) -> pb.SpeculativeConfig | None:
    """vLLM's --speculative-config as the workers serve it: method ngram (support.py refuses the others), drafts
    proposed and verified on the worker."""
    sc = vllm_config.speculative_config
    if sc is None:
        return None
    return pb.SpeculativeConfig(method=sc.method, num_speculative_tokens=sc.num_speculative_tokens,
                                prompt_lookup_min=sc.prompt_lookup_min, prompt_lookup_max=sc.prompt_lookup_max)


def check_tensor_parallel_size(model: str, size: int, expert_parallel: bool = False, dp_size: int = 1) -> None:
    """Refuses a tensor-parallel size (and expert placement) the workers cannot serve for a local model directory
    before any worker starts (heads that do not divide, experts that do not divide with --enable-expert-parallel,
    over ``dp_size`` data-parallel engines' ranks when they share the experts); the workers check the same."""
    if (size <= 1 and not expert_parallel) or not os.path.isdir(model):
        return
    from ms_models.config import ModelConfig
    from ms_models.parallel import check_tensor_parallel

    try:
        cfg = ModelConfig.from_model_dir(model)
    except (OSError, ValueError):  # UnsupportedModelError included: the workers report it, naming the model
        return
    problem = check_tensor_parallel(cfg, size, expert_parallel, dp_size)
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


class MsRpcExecutor(Executor):
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
        # experts over data-parallel engines: vLLM's engines step in lockstep (an idle one runs a dummy batch), and
        # so do their workers, one MindSpore cluster (ms_models.parallel)
        dp_size = pc.data_parallel_size if pc.enable_expert_parallel else 1
        check_tensor_parallel_size(self.model_config.model, pc.tensor_parallel_size, pc.enable_expert_parallel, dp_size)
        self.settings = RpcSettings.from_vllm_config(self.vllm_config)
        self._speculative = speculative_config(self.vllm_config)
        # vLLM's async scheduling (--async-scheduling; plugin.py keeps it on the CPU platform for ms_rpc): the
        # engine schedules step N+1 while the workers run step N, so two steps are in flight
        self._async = bool(self.scheduler_config.async_scheduling)
        if self._async and dp_size > 1:
            raise ConfigError("ms_rpc: --async-scheduling with --enable-expert-parallel over data-parallel engines is "
                              "not served (their workers run every step's forward together, one step at a time); "
                              "drop --async-scheduling")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms_rpc")
        self._cache: pb.CacheConfig | None = None   # the KV cache the workers hold, for a recovery's handshake
        self.loras = LoraAdapters(self.vllm_config.lora_config)
        addresses = group_addresses(self.settings.workers, pc.tensor_parallel_size, pc.data_parallel_index)
        self.group = WorkerGroup(self.settings, self.model_config.model, pc.tensor_parallel_size, addresses,
                                 pc.enable_expert_parallel, pc.data_parallel_index, dp_size)
        self.faults = FaultSupervisor(self.group, self.settings, self._rejoin)
        self.pipeline = StepPipeline(self.group, self.settings, self.faults, self.loras,
                                     StepStats(self.settings.stats_interval_s), self.model_config.logprobs_mode,
                                     self._speculative is not None)
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
        awaiting_scheduler.append(self)

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

    def _rejoin(self) -> None:
        """Connects to workers the supervisor brought back and runs the start-up handshake again (they hold no
        requests, no KV cache and no adapters)."""
        self.group.connect(self._check_model, timeout=5.0)
        if self._cache is not None:
            self.group.handshake(self._cache, warmup=True)
            self.loras.restore(self.group)
        self.pipeline.restart()

    def register_failure_callback(self, callback) -> None:
        self.faults.failure_callback = callback

    def attach_scheduler(self, scheduler) -> None:
        """Called by the plugin once vLLM's engine core has built its scheduler (a plugin.SchedulerHandle): lost
        requests are ended through the scheduler's own error path, and its prefix cache is reset before the first
        schedule after a loss."""
        self.faults.scheduler = scheduler

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        from ms_models.parallel import TensorParallel

        m = self.info.model
        # The KV cache spec of one rank: its share of the KV heads (one, replicated, when there are fewer than ranks).
        kv_heads = TensorParallel(0, self.group.size).kv_heads(m.num_kv_heads)[1]
        kw = dict(block_size=self.cache_config.block_size, num_kv_heads=kv_heads, head_size=m.head_dim,
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
        self.pipeline.restart()

    def compile_or_warm_up_model(self) -> None:
        """Warmup on every rank. A worker lost here stops start-up with one error naming it (and, for a local
        worker, how it exited): no request has been served yet, so vLLM's supervisor restarts the whole server,
        as for any start-up error. Losses after start-up are recovered in place (supervisor.py)."""
        try:
            self.vllm_config.compilation_config.compilation_time = self.group.warmup()
        except WorkerError as e:
            dead = self.group.local_dead(wait_s=2.0)
            raise ConfigError(f"ms_rpc: start-up failed during the workers' warm-up: {e}"
                              + (f"; local worker {', '.join(dead)} exited" if dead else "")) from None
        self.faults.start_watching()

    @cached_property
    def supported_tasks(self):
        return ("generate",)

    # -- the steps (pipeline.py) -------------------------------------------------------------------------------
    def execute_model(self, scheduler_output, non_block: bool = False):
        p = self.pipeline
        if self._async:
            # Async scheduling: the step goes out now and the engine schedules the next one meanwhile; its output
            # comes from sample_tokens() (from this future when nothing was scheduled: the engine samples nothing)
            step = p.send(scheduler_output)
            if scheduler_output.total_num_scheduled_tokens == 0:
                return self._pool.submit(p.receive, step)
            p.deferred = step
            return _done(None)
        if non_block:
            return self._pool.submit(p.execute, scheduler_output)
        return p.execute(scheduler_output)

    def sample_tokens(self, grammar_output, non_block: bool = False):
        p = self.pipeline
        if self._async:
            step, p.deferred = p.deferred, None
            if step.defer:
                p.send_sample(step, grammar_output)
            return self._pool.submit(p.receive, step)
        if non_block:
            return self._pool.submit(p.sample, grammar_output)
        return p.sample(grammar_output)

    def execute_dummy_batch(self) -> None:
        """vLLM's data-parallel engines of a mixture-of-experts model step in lockstep; one with nothing scheduled
        runs a dummy batch. Its workers join the other engines' forward when they share the experts; otherwise
        there is nothing to run."""
        if self.group.dp_size > 1:
            self.group.run_dummy_batch(timeout=self.pipeline.deadline())

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The drafts the workers proposed with the last step's tokens (vLLM asks once per step)."""
        return self.pipeline.take_drafts()

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        # No-ops for ms_rpc workers: no multimodal or encoder caches.
        if name in ("reset_mm_cache", "reset_encoder_cache", "update_max_model_len"):
            return _done([None]) if non_block else [None]
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
        gave_up, down = self.faults.gave_up, self.faults.down
        if gave_up:
            raise RuntimeError(gave_up)
        if down is not None:
            raise RuntimeError(f"ms_rpc workers are down, recovering: {down}")
        # Deep liveness: each rank runs a real one-token forward (waits for a step in flight).
        self.group.check_liveness(timeout=max(30.0, self.pipeline.deadline()))

    def shutdown(self) -> None:
        if getattr(self, "faults", None) is not None:
            self.faults.close()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "group", None) is not None:
            self.group.close()
