"""The KV cache size by vLLM's rule: the front's requested bytes; else gpu_memory_utilization of the host's memory
less the weights, the rest of the process (runtime) and an activation estimate of the largest step."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


class SizeError(ValueError):
    def __init__(self, message: str, exhausted: bool):
        super().__init__(message)
        self.exhausted = exhausted       # more than the host has free (else: a budget below what is needed)


@dataclass
class Size:
    available: int
    total: int
    free: int
    budget: int
    runtime: int
    activation: int
    sized_by: str


def host_memory() -> tuple[int, int]:
    """(total, free) bytes of host RAM: MemTotal (or the cgroup limit when lower) and MemAvailable."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    total, free = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total, free


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(cfg, tokens: int, seqs: int) -> int:
    """A float32 estimate of one step's peak: a layer's activations for `tokens` tokens, the attention scores of
    one request of them all, and the logits of `seqs` rows (with the sampler's copies)."""
    per_token = 6 * cfg.hidden_size + 3 * cfg.intermediate_size + 3 * cfg.num_heads * cfg.head_dim
    return 4 * (tokens * per_token + 2 * cfg.num_heads * tokens * tokens + 3 * seqs * cfg.vocab_size)


def size_kv_cache(cfg, weight_bytes: int, requested: int, utilization: float, tokens: int, seqs: int) -> Size:
    total, free = host_memory()
    runtime = max(rss_bytes() - weight_bytes, 0)
    if requested:
        if requested > free:
            raise SizeError(f"a KV cache of {requested / 2**30:.2f} GiB is more than the {free / 2**30:.2f} GiB free "
                            f"on this host: decrease --kv-cache-memory-bytes", exhausted=True)
        return Size(requested, total, free, 0, runtime, 0, "kv_cache_memory_bytes")
    budget = math.ceil(utilization * total)
    peak = activation_bytes(cfg, tokens, seqs)
    available = budget - weight_bytes - runtime - peak
    if available <= 0:
        raise SizeError(f"gpu_memory_utilization {utilization} of {total / 2**30:.2f} GiB is {budget / 2**30:.2f} "
                        f"GiB, not more than weights {weight_bytes / 2**20:.0f} MiB + runtime {runtime / 2**20:.0f} "
                        f"MiB + activations {peak / 2**20:.0f} MiB: raise --gpu-memory-utilization",
                        exhausted=False)
    if available + peak > free:
        raise SizeError(f"a KV cache of {available / 2**30:.2f} GiB and {peak / 2**20:.0f} MiB of activations are "
                        f"more than the {free / 2**30:.2f} GiB free on this host: decrease "
                        f"--gpu-memory-utilization or give --kv-cache-memory-bytes", exhausted=True)
    return Size(available, total, free, budget, runtime, peak, "gpu_memory_utilization")
