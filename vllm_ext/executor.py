"""MsRpcExecutor: vLLM's executor interface, answered by a remote MindSpore worker over gRPC.

The engine core calls, in order: get_kv_cache_specs -> determine_available_memory -> initialize_from_config ->
compile_or_warm_up_model -> execute_model once per step. Each call maps onto one ms_rpc.v1 RPC; each step's
SchedulerOutput travels as a numbered delta (codec.py), and the reply becomes a ModelRunnerOutput.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import grpc
import torch
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec, SlidingWindowSpec
from vllm.v1.outputs import ModelRunnerOutput

from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import ChannelSecurity, WorkerClient, WorkerError
from vllm_ext.codec import decode_result, encode_grammar, encode_step
from vllm_ext.launcher import LocalWorker, default_worker_python

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConfigError(RuntimeError):
    pass


_SECURITY_KEYS = ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token", "token_file")


def rpc_settings(vllm_config) -> dict:
    """ms_rpc settings: `--additional-config '{"ms_rpc": {...}}'` first, then MS_RPC_* environment variables.

    Security (for external workers; see ChannelSecurity): tls (bool), tls_ca, tls_cert + tls_key (mutual TLS),
    tls_server_name, token or token_file; MS_RPC_TLS=1, MS_RPC_TLS_CA, ... likewise."""
    extra = (vllm_config.additional_config or {}).get("ms_rpc", {}) or {}
    security = {k: extra.get(k, os.environ.get(f"MS_RPC_{k.upper()}")) for k in _SECURITY_KEYS}
    tls = security["tls"]
    security["tls"] = tls if isinstance(tls, bool) else str(tls or "").strip().lower() in ("1", "true", "yes", "on")
    workers = extra.get("workers")
    if workers is None and os.environ.get("MS_RPC_WORKERS"):
        workers = [w.strip() for w in os.environ["MS_RPC_WORKERS"].split(",") if w.strip()]
    return dict(
        workers=list(workers or []),
        worker_python=extra.get("worker_python") or os.environ.get("MS_RPC_WORKER_PYTHON") or default_worker_python(),
        worker_args=list(extra.get("worker_args") or os.environ.get("MS_RPC_WORKER_ARGS", "").split()),
        connect_timeout_s=float(extra.get("connect_timeout_s", os.environ.get("MS_RPC_CONNECT_TIMEOUT_S", 30))),
        step_timeout_s=float(extra.get("step_timeout_s", os.environ.get("MS_RPC_STEP_TIMEOUT_S", 600))),
        security=security,
    )


def connect_worker(settings: dict, address: str) -> WorkerClient:
    """A client for the worker at `address` with the configured TLS/token, once its health says SERVING."""
    try:
        security = ChannelSecurity.load(**settings["security"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    host = address.rsplit(":", 1)[0].strip("[]")
    if not security.tls and not security.token and host not in ("localhost", "::1") and not host.startswith("127."):
        log.warning("ms_rpc: worker %s is reached without TLS or a token: anyone who can reach its port can "
                    "drive it (see the ms_rpc tls_ca/token settings)", address)
    client = WorkerClient(address, security=security)
    try:
        client.wait_ready(settings["connect_timeout_s"])
    except BaseException:
        client.close()
        raise
    return client


def check_same_model(info: pb.WorkerInfo, model_config, address: str) -> None:
    hf = model_config.hf_config
    expected = {
        "architecture": (getattr(hf, "architectures", None) or ["?"])[0],
        "vocab_size": model_config.get_vocab_size(),
        "num_layers": hf.num_hidden_layers,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": model_config.get_total_num_kv_heads(),
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

    # -- start-up ------------------------------------------------------------------------------------------
    def _init_executor(self) -> None:
        if self.parallel_config.world_size != 1:
            raise ConfigError("ms_rpc serves tensor/pipeline parallel size 1 for now")
        self.settings = rpc_settings(self.vllm_config)
        self._failure_callback = None
        self._local: LocalWorker | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms_rpc")
        self._step = 0
        self.client = None
        try:
            self._connect()
        except BaseException:
            self.shutdown()
            raise

    def _connect(self) -> None:
        if self.settings["workers"]:
            if len(self.settings["workers"]) != 1:
                raise ConfigError(f"ms_rpc: one worker address expected, got {self.settings['workers']}")
            address = self.settings["workers"][0]
        else:
            model = self.model_config.model
            if not os.path.isdir(model):
                raise ConfigError(f"ms_rpc: the embedded worker needs a local model directory; {model!r} is not one")
            # The embedded worker listens on loopback in plaintext; a configured token still guards it.
            sec = self.settings["security"]
            self.settings["security"] = {"token": sec["token"], "token_file": sec["token_file"]}
            try:
                token = ChannelSecurity.load(**self.settings["security"]).token
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self._local = LocalWorker(self.settings["worker_python"], os.path.abspath(model),
                                      self.settings["worker_args"], token=token)
            address = self._local.address
        self.client = connect_worker(self.settings, address)
        self.info = self.client.describe()
        if self.info.world_size != 1 or self.info.rank != 0:
            raise ConfigError(f"ms_rpc worker {address} was started as rank {self.info.rank} of "
                              f"{self.info.world_size}; this front drives one worker (rank 0 of 1)")
        check_same_model(self.info, self.model_config, address)
        log.info("ms_rpc: worker %s at %s (%s): %s on %s, %s, model %s", self.info.worker_id, address,
                 self.client.security.describe(), self.info.framework, self.info.device, self.info.dtype,
                 self.info.model_path)

    def register_failure_callback(self, callback) -> None:
        self._failure_callback = callback

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        m = self.info.model
        kw = dict(block_size=self.cache_config.block_size, num_kv_heads=m.num_kv_heads, head_size=m.head_dim,
                  dtype=_DTYPES[self.info.dtype])
        # A windowed model lets vLLM free the blocks that fall out of the window.
        spec = SlidingWindowSpec(sliding_window=m.sliding_window, **kw) if m.sliding_window else FullAttentionSpec(**kw)
        return [{f"model.layers.{i}.self_attn.attn": spec for i in range(m.num_layers)}]

    def get_supported_kv_cache_layouts(self) -> list[list[str]]:
        return [["NHD"]]

    def set_kv_cache_layout(self, layout_name: str) -> None:
        pass  # the worker chooses its own cache layout; block ids are what crosses the wire

    def determine_available_memory(self) -> list[int]:
        requested = self.cache_config.kv_cache_memory_bytes or 0
        mem = self.client.determine_available_memory(self.cache_config.block_size, requested)
        return [mem.available_kv_bytes]

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        cfg = kv_cache_configs[0]
        block_size = cfg.kv_cache_groups[0].kv_cache_spec.block_size
        sc = self.scheduler_config
        self.client.initialize_cache(pb.CacheConfig(
            num_blocks=cfg.num_blocks, block_size=block_size, num_layers=self.info.model.num_layers,
            max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=self.model_config.max_model_len,
        ))
        self._step = 0

    def compile_or_warm_up_model(self) -> None:
        reply = self.client.warmup()
        self.vllm_config.compilation_config.compilation_time = reply.seconds
        log.info("ms_rpc: worker warm-up compiled %d shapes in %.1f s", reply.compiled_shapes, reply.seconds)

    @cached_property
    def supported_tasks(self):
        return ("generate",)

    # -- the step --------------------------------------------------------------------------------------------
    def _call_step(self, call, msg, step_id: int):
        try:
            res = call(msg, self.settings["step_timeout_s"])
        except WorkerError as e:
            if e.unreachable and self._failure_callback is not None:
                self._failure_callback()
            raise
        if res.step_id != step_id:
            raise RuntimeError(f"ms_rpc worker {self.client.address} answered step {res.step_id} for step {step_id}")
        return res

    def _execute(self, scheduler_output) -> ModelRunnerOutput | None:
        """One step. With structured-output requests in the batch, the worker only runs the forward here and
        samples in sample_tokens() with the grammar bitmask the engine computes meanwhile (two phases, as vLLM's
        own executors); otherwise it samples at once and the engine skips sample_tokens()."""
        self._step += 1
        defer = bool(scheduler_output.has_structured_output_requests)
        msg = encode_step(scheduler_output, self._step, self.model_config.logprobs_mode, defer)
        res = self._call_step(self.client.execute, msg, self._step)
        return None if defer else decode_result(res)

    def execute_model(self, scheduler_output, non_block: bool = False):
        if non_block:
            return self._pool.submit(self._execute, scheduler_output)
        return self._execute(scheduler_output)

    def _sample(self, grammar_output) -> ModelRunnerOutput:
        res = self._call_step(self.client.sample, encode_grammar(self._step, grammar_output), self._step)
        return decode_result(res)

    def sample_tokens(self, grammar_output, non_block: bool = False):
        if non_block:
            return self._pool.submit(self._sample, grammar_output)
        return self._sample(grammar_output)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        if name in ("reset_mm_cache", "reset_encoder_cache", "update_max_model_len"):
            result: list = [None]
            if non_block:
                f: Future = Future()
                f.set_result(result)
                return f
            return result
        raise NotImplementedError(f"ms_rpc workers do not implement the worker call {name!r}")

    def check_health(self) -> None:
        if self._local is not None and not self._local.alive():
            raise RuntimeError(f"ms_rpc: local worker {self.client.address} exited "
                               f"(code {self._local.proc.returncode})")
        # Deep liveness: the worker runs a real one-token forward (waits for a step in flight).
        try:
            self.client.check_liveness(timeout=max(30.0, self.settings["step_timeout_s"]))
        except WorkerError as e:
            if e.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self.client.describe(timeout=5.0)

    def shutdown(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "client", None) is not None:
            self.client.close()
        if getattr(self, "_local", None) is not None:
            self._local.stop()
            self._local = None
