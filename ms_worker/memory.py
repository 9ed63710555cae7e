"""How much host memory the worker offers to the KV cache."""

from __future__ import annotations

DEFAULT_FRACTION = 0.3          # of the memory available now, when nobody asked for a size
DEFAULT_CAP = 2**30             # bytes; the default never takes more than this (ask for more explicitly)


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def available_kv_bytes(requested: int = 0, cap: bool = True) -> int:
    """`requested` bytes if the host has them free (else what it has), or a default share of free memory."""
    free = mem_available_bytes()
    if not cap:
        return free
    if requested > 0:
        return min(requested, int(free * 0.9))
    return min(int(free * DEFAULT_FRACTION), DEFAULT_CAP)
