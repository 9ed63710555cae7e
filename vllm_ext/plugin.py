"""The vLLM plugin: makes `--distributed-executor-backend ms_rpc` mean our executor.

This is the one place where vllm_ext touches vLLM. vLLM 0.32 resolves a backend string that is not one of its
own names as an import path (`pkg.module.Class`); a bare `ms_rpc` has no dot, so `register()` (run by vLLM's
`vllm.general_plugins` entry point in every vLLM process, before the config is built) wraps
`Executor.get_class` to map the name `ms_rpc` to `vllm_ext.executor.MsRpcExecutor`. The full import path
`vllm_ext.executor.MsRpcExecutor` keeps working without the plugin.
"""

from __future__ import annotations

BACKEND_NAME = "ms_rpc"
EXECUTOR_PATH = "vllm_ext.executor.MsRpcExecutor"


def register() -> None:
    from vllm.v1.executor.abstract import Executor

    original = Executor.get_class
    if getattr(original, "_ms_rpc_wrapped", False):
        return

    def get_class(vllm_config):
        if vllm_config.parallel_config.distributed_executor_backend == BACKEND_NAME:
            from vllm_ext.executor import MsRpcExecutor

            return MsRpcExecutor
        return original(vllm_config)

    get_class._ms_rpc_wrapped = True
    Executor.get_class = staticmethod(get_class)
