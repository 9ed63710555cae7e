"""The vLLM plugin: makes `--distributed-executor-backend ms_rpc` mean our executor.

This is the one place where vllm_ext touches vLLM. vLLM 0.32 resolves a backend string that is not one of its
own names as an import path (`pkg.module.Class`); a bare `ms_rpc` has no dot, so `register()` (run by vLLM's
`vllm.general_plugins` entry point in every vLLM process, before the config is built) wraps
`Executor.get_class` to map the name `ms_rpc` to `vllm_ext.executor.MsRpcExecutor`. The full import path
`vllm_ext.executor.MsRpcExecutor` keeps working without the plugin.

When a config names ms_rpc, `get_class` first refuses the engine flags ms_rpc cannot serve (vllm_ext.support),
and wraps the platform's `validate_request` so that vLLM refuses the request fields it cannot serve (a 400).

It also hands the engine core's scheduler, as a SchedulerHandle, to the executors built before it (they wait in
`vllm_ext.executor.awaiting_scheduler`): when the workers are lost, the executor ends the requests they held
through the scheduler's own error path and resets its prefix cache, so vLLM keeps serving once the workers are
back (see vllm_ext/supervisor.py).

vLLM has no public hook for these, so every use of vLLM's internals is here and nowhere else in vllm_ext
(tests/test_contract.py::test_the_vllm_internals_ms_rpc_relies_on checks each against the installed vLLM):
`Scheduler.__init__` (wrapped: the executor is built before the scheduler), `scheduler.schedule` (wrapped on the
instance: the prefix cache reset runs before the next schedule), `scheduler.update_from_output` (wrapped on the
instance: requests the executor ended join `scheduler.grammar_compile_error_reqs` first, and end with
FINISHED_ERROR as that output is applied). Public hooks used: `Executor.get_class`,
the platform's `validate_request` and `check_and_update_config` (async scheduling, below),
`scheduler.reset_prefix_cache(reset_running_requests=True)`.

Async scheduling: `--async-scheduling` keeps two steps in flight (MsRpcExecutor sends step N+1 while the workers
run step N; they apply it after N, from the tokens they sampled in N). vLLM's CPU platform turns it off for its
own model runner; `_keep_async_scheduling` keeps an explicit request on for ms_rpc. Safe because the engine,
scheduler and executor interface are vLLM's own async path (AsyncScheduler, the batch queue, execute_model /
sample_tokens futures), exactly as with a GPU executor; the only CPU-platform assumption it lifts is that the
model runs in the engine process.

Experts over data-parallel engines (`--enable-expert-parallel --data-parallel-size M`, local workers):
`_place_expert_cluster` picks the loopback address of their one MindSpore cluster while `get_class` runs in the
process that then starts the M engine cores, and writes it into the config they receive
(`additional_config.ms_rpc.expert_cluster_addr`).

World size > 1: vLLM 0.32's CPU platform rewrites the backend only when it is "uni" (to "mp"), and the
parallel config picks a backend only when none is given, so `--tensor-parallel-size N
--distributed-executor-backend ms_rpc` reaches this executor unchanged (tests/test_tp.py serves through it).
"""

from __future__ import annotations

import logging
import sys
import threading

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
            _place_expert_cluster(vllm_config)
            _refuse_unsupported_requests()
            _keep_async_scheduling(vllm_config)
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


def _place_expert_cluster(vllm_config) -> None:
    """Experts over data-parallel engines with local workers: every engine's workers join one MindSpore cluster,
    whose scheduler address is picked here, in the process that resolves the executor and then starts the engines
    (they receive this config)."""
    pc = vllm_config.parallel_config
    if not (pc.enable_expert_parallel and pc.data_parallel_size > 1):
        return
    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    extra = vllm_config.additional_config.setdefault("ms_rpc", {})
    if not extra.get("workers") and not extra.get("expert_cluster_addr"):
        from vllm_ext.group import free_port

        extra["expert_cluster_addr"] = f"127.0.0.1:{free_port()}"


def _keep_async_scheduling(vllm_config) -> None:
    # vLLM resolves async scheduling right after it resolved the executor class (an unset value turns on for an
    # executor that supports it), then its CPU platform turns it off: its own model runner computes in the engine
    # process, so there is nothing to overlap. ms_rpc's workers compute in other processes, so an explicit
    # --async-scheduling is kept on (the engine schedules step N+1 while the workers run step N); unset, ms_rpc
    # follows the CPU platform's default (off).
    from vllm.platforms import current_platform

    sc = vllm_config.scheduler_config
    if sc.async_scheduling is None:
        sc.async_scheduling = False
    platform = type(current_platform)
    update = platform.check_and_update_config
    if getattr(update, "_ms_rpc_wrapped", False):
        return

    def check_and_update_config(cls, config):
        asked = config.scheduler_config.async_scheduling
        update.__func__(cls, config)
        if asked and config.parallel_config.distributed_executor_backend == BACKEND_NAME:
            config.scheduler_config.async_scheduling = True

    check_and_update_config._ms_rpc_wrapped = True
    platform.check_and_update_config = classmethod(check_and_update_config)


class SchedulerHandle:
    """What an executor may do to vLLM's scheduler, from any thread: end requests with an error, reset the prefix
    cache. Both take effect on the engine's thread: the errors when it next applies a step's output, the reset
    before its next schedule."""

    def __init__(self, scheduler):
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._reset_pending = False
        self._errors: set[str] = set()
        schedule, update_from_output = scheduler.schedule, scheduler.update_from_output

        def schedule_after_reset(*args, **kwargs):
            if self._reset_pending:
                self._reset_pending = False
                scheduler.reset_prefix_cache(reset_running_requests=True)
                log.info("ms_rpc: prefix cache reset (the lost workers' KV cache is gone)")
            return schedule(*args, **kwargs)

        def update_with_errors(*args, **kwargs):
            with self._lock:
                errors, self._errors = self._errors, set()
            scheduler.grammar_compile_error_reqs.update(errors)
            return update_from_output(*args, **kwargs)

        scheduler.schedule = schedule_after_reset
        scheduler.update_from_output = update_with_errors

    def end_with_error(self, req_ids) -> None:
        """These requests end with vLLM's FINISHED_ERROR when the engine applies the next step output (the
        scheduler's own per-request error path, as for a grammar that failed to compile)."""
        with self._lock:
            self._errors.update(req_ids)

    def reset_prefix_cache_before_next_schedule(self) -> None:
        """The next schedule() starts from an empty prefix cache (its blocks point into a KV cache that is gone);
        requests still running are preempted and recomputed, as vLLM's own reset does."""
        self._reset_pending = True


def _hand_scheduler_to_executor() -> None:
    # vLLM's engine core loads the plugins inside its own __init__, before it builds the executor and then the
    # scheduler: wrapping Scheduler.__init__ (subclasses call it) is the hook that sees the scheduler.
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__
    if getattr(init, "_ms_rpc_wrapped", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        executor = sys.modules.get("vllm_ext.executor")   # loaded wherever an MsRpcExecutor was built
        while executor is not None and executor.awaiting_scheduler:
            executor.awaiting_scheduler.pop().attach_scheduler(SchedulerHandle(self))

    __init__._ms_rpc_wrapped = True
    Scheduler.__init__ = __init__
