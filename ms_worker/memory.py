"""How many bytes the worker gives to the KV cache: vLLM's own rule, from vLLM's own flags.

1. ``--kv-cache-memory-bytes`` (on vLLM's CPU platform also ``VLLM_CPU_KVCACHE_SPACE``, in GiB, which vLLM turns
   into that flag): exactly that many bytes.
2. Otherwise ``--gpu-memory-utilization`` (vLLM's default 0.92) of the worker device's memory -- host RAM on CPU
   (MemTotal, or the cgroup's memory limit when lower), the device's own memory on Ascend -- minus what the worker
   needs besides the cache: the weights, the runtime (the framework, the process, compiled graphs: measured after
   loading, before the profile) and the activation peak of one batch of ``max_num_batched_tokens`` tokens
   (measured by the model's profiling forward, CausalLM.profile_run). vLLM's
   ``determine_available_memory`` does the same (gpu_worker.py: the requested fraction minus the non-KV memory;
   cpu_worker.py: the fraction of the NUMA node's memory minus the process's RSS after a warm-up forward).

No cap: a budget that does not cover the weights, runtime and activations, or a cache larger than the memory free
now, is a KvSizeError naming the numbers and the flag to change (the service answers it at start-up).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

GiB = 2**30
DEFAULT_UTILIZATION = 0.92    # vLLM 0.32's CacheConfig.gpu_memory_utilization default


class KvSizeError(ValueError):
    """The requested KV cache cannot fit; the message names the numbers and the flag to change. ``exhausted``: it
    is more than the device has free (else: the budget does not cover what the worker needs besides the cache)."""

    def __init__(self, message: str, exhausted: bool = False):
        super().__init__(message)
        self.exhausted = exhausted


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# -- the device's memory -----------------------------------------------------------------------------------------
def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup (v2, else v1), or None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < 2**60:
            return int(raw), usage
    return None


def host_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes: MemTotal / MemAvailable, or the cgroup's limit and what is left
    of it when that is lower (a container's memory limit is what the worker may use)."""
    info = _meminfo()
    total, avail = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    cg = _cgroup_limit()
    if cg is not None and cg[0] < total:
        total, avail = cg[0], min(avail, max(0, cg[0] - cg[1]))
    return total, avail


def device_memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the memory the worker's weights and KV cache live in: host RAM on cpu; on ascend:N
    the NPU's memory as MindSpore reports it."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return host_memory()
    import mindspore as ms

    props = ms.hal.get_device_properties(int(index or 0), "Ascend")
    return int(props.total_memory), int(props.free_memory)


# -- what the worker holds besides the cache ----------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS")


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_increase(run_profile, poll_s: float = 0.002) -> int:
    """Runs ``run_profile()`` and returns how far the process's resident memory rose above its level before the
    call, at the peak (bytes, >= 0). The peak is VmHWM after resetting it; where the reset is refused, RSS is
    polled every ``poll_s`` on a thread while the profile runs (it may miss a spike shorter than that)."""
    base = rss_bytes()
    if _reset_hwm():
        run_profile()
        return max(0, _status_kib("VmHWM") - base)
    peak, done = [base], threading.Event()

    def poll():
        while not done.wait(poll_s):
            peak[0] = max(peak[0], rss_bytes())

    t = threading.Thread(target=poll, name="rss_poll", daemon=True)
    t.start()
    try:
        run_profile()
    finally:
        done.set()
        t.join()
    return max(0, max(peak[0], rss_bytes()) - base)


def device_peak_increase(run_profile) -> int:
    """The Ascend counterpart of peak_rss_increase: MindSpore's peak device allocation during ``run_profile()``
    above the allocation before it."""
    import mindspore as ms

    ms.runtime.synchronize()
    base = ms.runtime.memory_allocated()
    ms.runtime.reset_peak_memory_stats()
    run_profile()
    ms.runtime.synchronize()
    return max(0, int(ms.runtime.max_memory_allocated()) - int(base))


def activation_peak_bytes(device: str, run_profile) -> int:
    """Peak memory increase of ``run_profile()`` in the memory the KV cache would take: resident host memory on
    cpu, MindSpore's device allocations on ascend. For the model's profile_activation_bytes()."""
    return peak_rss_increase(run_profile) if device.partition(":")[0] == "cpu" else device_peak_increase(run_profile)


def runtime_bytes(device: str, weight_bytes: int, kv_bytes: int = 0) -> int:
    """What the worker holds now besides its weights and KV cache: on cpu the process's RSS less both (the Python
    process, MindSpore's runtime and its compiled graphs); on ascend MindSpore's device allocations less both."""
    if device.partition(":")[0] == "cpu":
        used = rss_bytes()
    else:
        import mindspore as ms

        used = int(ms.runtime.memory_allocated())
    return max(0, used - weight_bytes - kv_bytes)


def estimate_activation_bytes(config, num_tokens: int, num_seqs: int, tp_size: int = 1) -> int:
    """A generous activation peak of one forward of ``num_tokens`` tokens, checked before the measured profile
    runs (a profile that cannot fit would only take the worker down). Per token: 12 hidden-sized rows (residual,
    norm, q/k/v, attention output, o_proj, MLP output, with room for the graph's copies) and 4 intermediate-sized
    rows (gate, up, activation, product) of this rank's share; logits for ``num_seqs`` sampled rows over the whole
    vocabulary, 3 times (logits, their softmax, the sampler's copy); all in 4-byte floats. Attention keeps no
    score matrix (the kernel's online softmax). A mixture-of-experts layer instead keeps, per token, top_k
    expert rows of intermediate and hidden size (the MoE kernel's buffers) and the shared expert's 4 rows, when
    that is more."""
    t = max(0, int(num_tokens))
    s = max(1, min(int(num_seqs or 1), t or 1))
    inter = max(4 * config.intermediate_size, config.num_experts_per_tok * (config.moe_intermediate_size
                + config.hidden_size) + 4 * config.shared_expert_intermediate_size)
    per_token = 12 * config.hidden_size + -(-inter // tp_size)
    logits = 3 * s * config.vocab_size
    return 4 * (t * per_token + logits)


# -- the rule ----------------------------------------------------------------------------------------------------
@dataclass
class KvBudget:
    available_kv_bytes: int
    total_bytes: int            # the device's memory (host RAM on cpu)
    free_bytes: int             # free now
    budget_bytes: int           # ceil(utilization x total); 0 when sized by bytes
    weight_bytes: int
    runtime_bytes: int
    activation_peak_bytes: int
    sized_by: str               # "kv_cache_memory_bytes" or "gpu_memory_utilization"


def size_kv_cache(*, total: int, free: int, weight_bytes: int, runtime: int, activation_peak: int,
                  requested_bytes: int = 0, utilization: float = 0.0, device: str = "cpu",
                  per_block: int = 0) -> KvBudget:
    """The KV cache bytes of vLLM's rule (see the module docstring), or KvSizeError.

    ``requested_bytes`` > 0 wins (vLLM's --kv-cache-memory-bytes); else ``utilization`` (0 < u <= 1) of ``total``
    less weights, runtime and activation peak. Either way the cache (and, sized by the fraction, the activations)
    must fit in ``free`` (what the device has free now, weights and runtime loaded, before the profile and the
    cache), and hold at least one block of ``per_block`` bytes."""
    where = "host memory" if device.partition(":")[0] == "cpu" else f"{device} memory"
    if requested_bytes > 0:
        kv, budget, by = int(requested_bytes), 0, "kv_cache_memory_bytes"
        if kv > free:
            raise KvSizeError(
                f"KV cache of {_gib(kv)} ({kv} bytes, --kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE) is more "
                f"than the {where} free on this worker: {_gib(free)} of {_gib(total)}. Decrease "
                f"--kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE), or free memory", exhausted=True)
    else:
        if not (0.0 < utilization <= 1.0):
            raise KvSizeError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        budget = math.ceil(total * utilization)
        non_kv = weight_bytes + runtime + activation_peak
        kv, by = budget - non_kv, "gpu_memory_utilization"
        detail = (f"--gpu-memory-utilization {utilization:g} of {_gib(total)} {where} = {_gib(budget)}, less "
                  f"weights {_gib(weight_bytes)}, runtime {_gib(runtime)} and activation peak "
                  f"{_gib(activation_peak)}, leaves {_gib(kv)} for the KV cache")
        if kv < max(1, per_block):
            raise KvSizeError(f"{detail}: too little. Increase --gpu-memory-utilization, decrease "
                              f"--max-num-batched-tokens, or set --kv-cache-memory-bytes")
        if kv + activation_peak > free:
            fit = (weight_bytes + runtime + free) / total   # the fraction whose cache and activations fit in free
            raise KvSizeError(f"{detail}; with the activations that is more than the {_gib(free)} free on this "
                              f"worker. Decrease --gpu-memory-utilization (below {fit:.2f}), or set "
                              f"--kv-cache-memory-bytes (VLLM_CPU_KVCACHE_SPACE in GiB on CPU)", exhausted=True)
    if per_block and kv < per_block:
        raise KvSizeError(f"KV cache of {kv} bytes (--kv-cache-memory-bytes) holds no block of {per_block} bytes: "
                          f"increase --kv-cache-memory-bytes")
    return KvBudget(available_kv_bytes=kv, total_bytes=total, free_bytes=free, budget_bytes=budget,
                    weight_bytes=weight_bytes, runtime_bytes=runtime, activation_peak_bytes=activation_peak,
                    sized_by=by)
