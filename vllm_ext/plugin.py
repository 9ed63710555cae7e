"""The vLLM plugin: makes `--distributed-executor-backend ms_rpc` mean our executor.

This is the one place where vllm_ext touches vLLM. vLLM 0.32 resolves a backend string that is not one of its
own names as an import path (`pkg.module.Class`); a bare `ms_rpc` has no dot, so `register()` (run by vLLM's
`vllm.general_plugins` entry point in every vLLM process, before the config is built) wraps
`Executor.get_class` to map the name `ms_rpc` to `vllm_ext.executor.MsRpcExecutor`. The full import path
`vllm_ext.executor.MsRpcExecutor` keeps working without the plugin.

When a config names ms_rpc, `get_class` first refuses the engine flags ms_rpc cannot serve (vllm_ext.support),
and wraps the platform's `validate_request` so that vLLM refuses the request fields it cannot serve (a 400).

It also hands the engine core's scheduler to an executor that asks for it (`await_scheduler`), as a
SchedulerHandle: when the workers are lost, the executor ends the requests they held through the scheduler's own
error path and resets its prefix cache, so vLLM keeps serving once the workers are back (see MsRpcExecutor).

vLLM has no public hook for these, so every use of vLLM's internals is here and nowhere else in vllm_ext
(tests/test_contract.py::test_the_vllm_internals_ms_rpc_relies_on checks each against the installed vLLM):
`Scheduler.__init__` (wrapped: the executor is built before the scheduler), `scheduler.schedule` (wrapped on the
instance: the prefix cache reset runs before the next schedule), `scheduler.grammar_compile_error_reqs` (requests
in it end with FINISHED_ERROR when the engine applies the step's output). Public hooks used: `Executor.get_class`,
the platform's `validate_request`, `scheduler.reset_prefix_cache(reset_running_requests=True)`.

World size > 1: vLLM 0.32's CPU platform rewrites the backend only when it is "uni" (to "mp"), and the
parallel config picks a backend only when none is given, so `--tensor-parallel-size N
--distributed-executor-backend ms_rpc` reaches this executor unchanged (tests/test_tp.py serves through it).
"""

from __future__ import annotations

import logging

BACKEND_NAME = "ms_rpc"
EXECUTOR_PATH = "vllm_ext.executor.MsRpcExecutor"

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level


def register() -> None:
    from vllm.v1.executor.abstract import Executor

    original = Executor.get_class
    if getattr(original, "_ms_rpc_wrapped", False):
        return

    def get_class(vllm_config):
        if vllm_config.parallel_config.distributed_executor_backend == BACKEND_NAME:
            from vllm_ext.executor import MsRpcExecutor
            from vllm_ext.support import check_engine_config

            check_engine_config(vllm_config)
            _refuse_unsupported_requests()
            return MsRpcExecutor
        return original(vllm_config)

    get_class._ms_rpc_wrapped = True
    Executor.get_class = staticmethod(get_class)
    _hand_scheduler_to_executor()


def _refuse_unsupported_requests() -> None:
    # vLLM validates every request with its platform's validate_request(engine_input, params) before it reaches
    # the engine (a raise is a 400 for that request); once this process serves ms_rpc (vLLM resolves the executor
    # class in the front process too), that check also refuses the request fields ms_rpc cannot serve.
    from vllm.platforms import current_platform

    platform = type(current_platform)
    validate = platform.validate_request
    if getattr(validate, "_ms_rpc_wrapped", False):
        return

    def validate_request(cls, processed_inputs, params):
        from vllm.sampling_params import SamplingParams
        from vllm_ext.support import check_request

        validate.__func__(cls, processed_inputs, params)
        if isinstance(params, SamplingParams):
            check_request(params)

    validate_request._ms_rpc_wrapped = True
    platform.validate_request = classmethod(validate_request)


class SchedulerHandle:
    """What an executor may do to vLLM's scheduler: end requests with an error, reset the prefix cache."""

    def __init__(self, scheduler):
        self._scheduler = scheduler
        self._reset_pending = False
        schedule = scheduler.schedule

        def schedule_after_reset(*args, **kwargs):
            if self._reset_pending:
                self._reset_pending = False
                scheduler.reset_prefix_cache(reset_running_requests=True)
                log.info("ms_rpc: prefix cache reset (the lost workers' KV cache is gone)")
            return schedule(*args, **kwargs)

        scheduler.schedule = schedule_after_reset

    def end_with_error(self, req_ids) -> None:
        """These requests end with vLLM's FINISHED_ERROR when the engine applies this step's output (the
        scheduler's own per-request error path, as for a grammar that failed to compile)."""
        self._scheduler.grammar_compile_error_reqs.update(req_ids)

    def reset_prefix_cache_before_next_schedule(self) -> None:
        """The next schedule() starts from an empty prefix cache (its blocks point into a KV cache that is gone);
        requests still running are preempted and recomputed, as vLLM's own reset does."""
        self._reset_pending = True


_awaiting_scheduler: list = []   # executors of this process that asked for the scheduler built after them


def await_scheduler(executor) -> None:
    """The engine core builds its executor, then its scheduler: hand `executor.attach_scheduler` a
    SchedulerHandle of that scheduler."""
    _awaiting_scheduler.append(executor)


def _hand_scheduler_to_executor() -> None:
    # vLLM's engine core loads the plugins inside its own __init__, before it builds the executor and then the
    # scheduler: wrapping Scheduler.__init__ (subclasses call it) is the hook that sees the scheduler.
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__
    if getattr(init, "_ms_rpc_wrapped", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        while _awaiting_scheduler:
            _awaiting_scheduler.pop().attach_scheduler(SchedulerHandle(self))

    __init__._ms_rpc_wrapped = True
    Scheduler.__init__ = __init__
