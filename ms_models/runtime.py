"""Process-level MindSpore setup. Call :func:`setup` once at worker start-up.

Importing this module does not import MindSpore; ``setup`` does.
"""
from __future__ import annotations

import os
import threading

__all__ = ["setup", "current_device", "normalize_device"]

_lock = threading.Lock()
_state: dict = {"device": None, "threads": None}

_DEVICES = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}


def normalize_device(device: str) -> str:
    d = str(device).strip().lower()
    if d not in _DEVICES:
        raise ValueError(f"unsupported device {device!r} (expected one of: cpu, ascend)")
    return "ascend" if d == "npu" else d


def current_device():
    """The device passed to setup(), or None if setup() has not run."""
    return _state["device"]


def setup(device: str = "cpu", threads: int | None = None) -> None:
    """Selects the MindSpore device and execution mode for this process (idempotent).

    * ``ms.set_device``: "CPU" (tested) or "Ascend".
    * ``ms.runtime.launch_blocking()``: synchronous PyNative dispatch; on a small CPU the
      default asynchronous pipeline is 5-20x slower and reports errors at the wrong op.
    * ``threads``: size of MindSpore's CPU kernel pool (can only be set once per process);
      None keeps MindSpore's default.
    Must run before any MindSpore op. Calling again with another device raises.
    Never fork the process after MindSpore has run an op (the child deadlocks).
    """
    dev = normalize_device(device)
    with _lock:
        if _state["device"] is not None:
            if _state["device"] != dev:
                raise RuntimeError(f"ms_models.runtime.setup already ran with device={_state['device']!r}")
            return
        os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log level: errors only
        import mindspore as ms

        ms.set_device(_DEVICES[dev])
        if threads:
            ms.device_context.cpu.op_tuning.threads_num(int(threads))
        ms.runtime.launch_blocking()
        _state["device"] = dev
        _state["threads"] = threads
