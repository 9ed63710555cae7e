"""pytest plugin that runs vLLM's own tests here (loaded with `-p vllm_upstream_plugin` by
scripts/vllm_upstream_tests.py, which lists every adaptation in its ADAPTATIONS table).

It rewrites engine arguments only, never a test: `EngineArgs` built in this process (LLM, VllmRunner, AsyncLLM)
and the `vllm serve` command lines of tests/utils.py's servers get the local model (served under the test's own
model name), float32, a fixed KV cache, a capped context, the backend under test and, for native vLLM CPU, a
block size it supports. Hub model names resolve offline to the local model through the HF cache the script
prepares (HF_HOME, HF_HUB_OFFLINE=1), so tokenizers and HF reference models load the same checkpoint.

Settings come from the environment: VLLM_UPSTREAM_BACKEND (native | ms_rpc), VLLM_UPSTREAM_MODEL (a local
directory), VLLM_UPSTREAM_KV_BYTES, VLLM_UPSTREAM_MAX_MODEL_LEN.
"""

from __future__ import annotations

import dataclasses
import os

BACKEND = os.environ["VLLM_UPSTREAM_BACKEND"]
MODEL = os.environ["VLLM_UPSTREAM_MODEL"]
KV_BYTES = int(os.environ["VLLM_UPSTREAM_KV_BYTES"])
MAX_MODEL_LEN = int(os.environ["VLLM_UPSTREAM_MAX_MODEL_LEN"])
NATIVE_BLOCK = 32   # native vLLM CPU's attention takes block sizes that are multiples of 32

if BACKEND not in ("native", "ms_rpc"):
    raise RuntimeError(f"VLLM_UPSTREAM_BACKEND must be native or ms_rpc, not {BACKEND!r}")
if os.environ.get("HF_HUB_OFFLINE") != "1" or not os.environ.get("HF_HOME"):
    raise RuntimeError("run through scripts/vllm_upstream_tests.py: it sets HF_HOME to the offline model cache")


def _is_hub_name(model) -> bool:
    return isinstance(model, str) and not os.path.isdir(model)


def _adapt_engine_args(args) -> None:
    """The adaptations, applied to an EngineArgs (or AsyncEngineArgs) in place."""
    if _is_hub_name(args.model):
        if not args.served_model_name:
            args.served_model_name = args.model
        if args.tokenizer in (None, args.model):
            args.tokenizer = MODEL
        args.model = MODEL
    args.dtype = "float32"
    args.kv_cache_memory_bytes = KV_BYTES
    if args.max_model_len is None or (isinstance(args.max_model_len, int) and args.max_model_len > MAX_MODEL_LEN):
        args.max_model_len = MAX_MODEL_LEN
    if BACKEND == "ms_rpc":
        args.distributed_executor_backend = "ms_rpc"
    elif args.block_size is not None and args.block_size % NATIVE_BLOCK:
        args.block_size = NATIVE_BLOCK


def _adapt_serve_args(model: str, serve_args: list[str]) -> tuple[str, list[str]]:
    """The same adaptations for a `vllm serve MODEL ARGS...` command line (a later flag overrides an earlier)."""
    out = list(serve_args)
    if _is_hub_name(model):
        if "--served-model-name" not in out:
            out += ["--served-model-name", model]
        if "--tokenizer" not in out:
            out += ["--tokenizer", MODEL]
        model = MODEL
    out += ["--dtype", "float32", "--kv-cache-memory-bytes", str(KV_BYTES)]
    if "--max-model-len" in out:
        i = out.index("--max-model-len")
        if int(out[i + 1]) > MAX_MODEL_LEN:
            out[i + 1] = str(MAX_MODEL_LEN)
    else:
        out += ["--max-model-len", str(MAX_MODEL_LEN)]
    if BACKEND == "ms_rpc":
        out += ["--distributed-executor-backend", "ms_rpc"]
    elif "--block-size" in out and int(out[out.index("--block-size") + 1]) % NATIVE_BLOCK:
        out[out.index("--block-size") + 1] = str(NATIVE_BLOCK)
    return model, out


def _install() -> None:
    from vllm.engine import arg_utils

    post_init = arg_utils.EngineArgs.__post_init__

    def adapted_post_init(self):
        _adapt_engine_args(self)
        post_init(self)

    arg_utils.EngineArgs.__post_init__ = adapted_post_init
    assert dataclasses.is_dataclass(arg_utils.EngineArgs)

    from tests import utils as upstream_utils

    init = upstream_utils.RemoteVLLMServer.__init__

    def adapted_init(self, model, vllm_serve_args, *args, **kwargs):
        model, vllm_serve_args = _adapt_serve_args(model, vllm_serve_args)
        init(self, model, vllm_serve_args, *args, **kwargs)

    upstream_utils.RemoteVLLMServer.__init__ = adapted_init


def pytest_configure(config):
    _install()
