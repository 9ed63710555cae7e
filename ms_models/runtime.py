"""Process-level MindSpore setup. Call :func:`setup` once at worker start-up.

Importing this module does not import MindSpore; ``setup`` does.
"""
from __future__ import annotations

import os
import socket
import threading
import time

__all__ = ["setup", "current_device", "current_tp", "normalize_device", "parse_dist_addr", "resolve_dist_addr",
           "cluster_env", "ClusterJoinError", "DeviceUnavailableError", "resolve_dtype"]

_lock = threading.Lock()
_state: dict = {"device": None, "threads": None, "tp": (0, 1)}


class ClusterJoinError(RuntimeError):
    """This process could not join the MindSpore cluster of its tensor-parallel group in time."""


class DeviceUnavailableError(RuntimeError):
    """MindSpore cannot use the requested device here (e.g. ascend with a CPU-only MindSpore or without CANN)."""


def parse_dist_addr(addr: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port)."""
    a = str(addr or "").strip()
    host, sep, port = a.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid dist address {addr!r}: expected HOST:PORT")
    return host, int(port)

_DEVICES = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}


def normalize_device(device: str) -> str:
    d = str(device).strip().lower()
    if d not in _DEVICES:
        raise ValueError(f"unsupported device {device!r} (expected one of: cpu, ascend)")
    return "ascend" if d == "npu" else d


# Compute (weight, activation, KV-cache) dtypes per device, the default first: MindSpore's CPU kernels are fp32
# only; the fused Ascend kernels take fp16/bf16 only.
_DTYPES = {"cpu": ("float32",), "ascend": ("bfloat16", "float16")}


def resolve_dtype(device: str, dtype: str | None = "auto", stand_ins: bool = False) -> str:
    """The compute dtype for ``device``: ``dtype``, or the device's default for None/"auto"; ValueError for a dtype
    the device lacks. ``stand_ins``: the ascend path run with plain-op stand-ins of its kernels (tests), which may
    also be float32."""
    dev = normalize_device(device)
    allowed = _DTYPES[dev] + (("float32",) if stand_ins and dev == "ascend" else ())
    if dtype in (None, "auto"):
        return allowed[0]
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} is not supported on {dev} (supported: {', '.join(allowed)})")
    return dtype


def current_device():
    """The device passed to setup(), or None if setup() has not run."""
    return _state["device"]


def current_tp() -> tuple[int, int]:
    """(rank, size) of this process in its MindSpore cluster; (0, 1) without one."""
    return _state["tp"]


def resolve_dist_addr(dist_addr: str, timeout_s: float = 0.0) -> tuple[str, int]:
    """(IPv4 address, port) of ``dist_addr``: MindSpore's MS_SCHED_HOST takes an IP only. A name that does not
    resolve yet (a pod whose DNS record is not published yet) is retried for up to ``timeout_s``."""
    host, port = parse_dist_addr(dist_addr)
    deadline = time.monotonic() + max(0.0, float(timeout_s or 0))
    while True:
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            return infos[0][4][0], port
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterJoinError(f"cannot resolve the dist address {dist_addr!r} to an IPv4 address: {e}") from e
            time.sleep(1.0)


def cluster_env(role: str, tp_size: int, sched_ip: str, port: int, tp_rank: int = 0,
                timeout_s: float | None = None) -> dict:
    """The environment variables of MindSpore's dynamic cluster: ``role`` MS_WORKER (rank ``tp_rank``) or
    MS_SCHED, for ``tp_size`` workers and the scheduler on ``sched_ip``:``port``; MS_TOPO_TIMEOUT = how long
    init() waits for the whole cluster."""
    env = {"MS_ROLE": role, "MS_WORKER_NUM": str(int(tp_size)), "MS_SCHED_HOST": sched_ip,
           "MS_SCHED_PORT": str(int(port))}
    if role == "MS_WORKER":
        env["MS_NODE_ID"] = str(int(tp_rank))
    if timeout_s:
        env["MS_TOPO_TIMEOUT"] = str(max(1, int(round(timeout_s))))
    return env


def setup(device: str = "cpu", threads: int | None = None, tp_rank: int = 0, tp_size: int = 1,
          dist_addr: str | None = None, join_timeout_s: float | None = None) -> None:
    """Selects the MindSpore device and execution mode for this process (idempotent).

    * ``ms.set_device``: "CPU" (tested) or "Ascend".
    * ``ms.runtime.launch_blocking()``: synchronous PyNative dispatch; on a small CPU the
      default asynchronous pipeline is 5-20x slower and reports errors at the wrong op.
    * ``threads``: size of MindSpore's CPU kernel pool (can only be set once per process);
      None keeps MindSpore's default.
    * ``tp_size`` > 1: joins the MindSpore cluster (``mindspore.communication.init()``, right after
      ``set_device`` and before any other op) as worker ``tp_rank``, whose scheduler (started by rank
      0) listens on ``dist_addr``; waits at most ``join_timeout_s`` for all ranks, then raises
      ClusterJoinError.
    Must run before any MindSpore op. Calling again with another device raises.
    Never fork the process after MindSpore has run an op (the child deadlocks).
    """
    dev = normalize_device(device)
    with _lock:
        if _state["device"] is not None:
            if _state["device"] != dev:
                raise RuntimeError(f"ms_models.runtime.setup already ran with device={_state['device']!r}")
            if tp_size > 1 and _state["tp"] != (tp_rank, tp_size):
                raise RuntimeError(f"ms_models.runtime.setup already ran as tensor-parallel rank/size "
                                   f"{_state['tp']}, not ({tp_rank}, {tp_size})")
            return
        os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log level: errors only
        if tp_size > 1:
            if not dist_addr:
                raise ValueError("tensor parallelism (tp_size > 1) needs dist_addr, the cluster scheduler's HOST:PORT")
            ip, port = resolve_dist_addr(dist_addr, join_timeout_s or 0)
            os.environ.update(cluster_env("MS_WORKER", tp_size, ip, port, tp_rank, join_timeout_s))
        import mindspore as ms

        try:
            ms.set_device(_DEVICES[dev])
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DeviceUnavailableError(f"MindSpore cannot use device {dev!r} in this process: {first}") from e
        if tp_size > 1:
            from mindspore import communication

            try:
                communication.init()
            except RuntimeError as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
                waited = f"{join_timeout_s:g} s" if join_timeout_s else "MindSpore's default time (MS_TOPO_TIMEOUT)"
                raise ClusterJoinError(f"rank {tp_rank} of {tp_size} could not join the MindSpore cluster at "
                                       f"{dist_addr} within {waited}: {first}") from e
            got = (communication.get_rank(), communication.get_group_size())
            if got != (tp_rank, tp_size):
                raise ClusterJoinError(f"MindSpore made this process rank {got[0]} of {got[1]}, "
                                       f"expected rank {tp_rank} of {tp_size}")
            _state["tp"] = (int(tp_rank), int(tp_size))
        if threads:
            ms.device_context.cpu.op_tuning.threads_num(int(threads))
        ms.runtime.launch_blocking()
        _state["device"] = dev
        _state["threads"] = threads
