"""Custom MindSpore CPU kernels (ops.Custom, func_type "aot"), compiled from C++ on first use.

``build(source)`` compiles one kernel source (``paged_attention.cc`` by default, ``moe_ffn.cc``,
``small_matmul.cc``; all include ``common.h``) with g++
into ``ms_models/kernels/build/`` (or ``$MS_MODELS_KERNEL_DIR``) as ``<name>-<hash>.so``, the hash
covering the source, common.h and the compiler command, so a changed source gets a new file and a stale one is
never loaded; a file lock (``fcntl.flock``) lets worker processes that start together build it once.
``python -m ms_models.kernels`` builds them all ahead (the worker environment's Makefile recipe does).

``paged_attention_op()`` returns the ``PagedAttentionFlat`` Custom op (cached per process); the
contract is at the top of paged_attention.cc. ``moe_ffn_op()`` returns ``MoeFFN`` (the routed experts of
a mixture-of-experts layer, moe_ffn.cc; ms_models.moe), ``small_matmul_op()`` ``SmallMatMul`` and its variants (the
products of decode graphs, small_matmul.cc; ms_models.layers). The attention op writes the two cache inputs in place: pass
``Parameter`` caches (in place under ``ms.jit`` and in PyNative; checked by
tests/test_attention_kernel.py).

MindSpore's AOT white list: when ``MS_CUSTOM_AOT_WHITE_LIST`` is set, ops.Custom refuses a
library outside that directory (TypeError at construction). ``paged_attention_op()`` checks this
first and raises a RuntimeError naming both paths; build into the white-listed directory with
``MS_MODELS_KERNEL_DIR``. Unset (the default), MindSpore only logs an info line.

Threads: the kernel uses OpenMP, at most ``MS_PA_THREADS`` (default 2) threads, one for small work
(under ~0.1 ms) or a single work unit. libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` when it
is loaded, and ``import mindspore`` loads it, so ``set_omp_wait_policy()`` (called by ``ms_worker`` and
the benchmarks before anything imports MindSpore) sets ``GOMP_SPINCOUNT=0`` unless already set, and
``paged_attention_op()`` warns when libgomp was loaded before that: a team thread sleeps as soon as
the parallel region ends instead of spinning on a core that MindSpore's own thread pool needs for the
layer's next kernels. Measured on the whole model (``.venv-worker/bin/python -m ms_models.bench
models/SmolLM2-135M-Instruct --decode-batches 1,8,32 --prefill 128,512 --block-size 128``, 2-vCPU AMD
EPYC, nothing else running, two interleaved rounds, median ms per forward):

    setting                      B=1     B=8      B=32     prefill 128  prefill 512
    MS_PA_THREADS=1              48-50   74-87    177-183  198-207      811-877
    2 threads, spin 10,000       53-58   142-177  260-294  436-448      981-993
    2 threads, spin 0 (default)  50-54   72-77    137-141  193-195      690-732

The kernel alone (``python -m ms_models.kernels.bench --spin``: attention + an MLP-sized matmul per
layer) cannot show this: the contention is with the rest of the model's kernels.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

__all__ = ["build", "paged_attention_op", "moe_ffn_op", "small_matmul_op", "SMALL_MATMUL_ROWS", "set_omp_wait_policy",
           "KernelBuildError", "SOURCE", "MOE_SOURCE", "MATMUL_SOURCE", "FUNC_NAME"]

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "paged_attention.cc")
FUNC_NAME = "PagedAttentionFlat"
MOE_SOURCE = os.path.join(HERE, "moe_ffn.cc")
MATMUL_SOURCE = os.path.join(HERE, "small_matmul.cc")
SOURCES = (SOURCE, MOE_SOURCE, MATMUL_SOURCE)
HEADER = os.path.join(HERE, "common.h")  # included by every source
CXX_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# libgomp's spin before an idle thread sleeps (see the module docstring for the measurement).
_SPINCOUNT = "0"


def set_omp_wait_policy() -> None:
    """Call before MindSpore is imported (it loads libgomp, which reads GOMP_SPINCOUNT once)."""
    os.environ.setdefault("GOMP_SPINCOUNT", _SPINCOUNT)
    global _POLICY_BEFORE_LIBGOMP
    _POLICY_BEFORE_LIBGOMP = _POLICY_BEFORE_LIBGOMP or not _libgomp_loaded()


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


_POLICY_BEFORE_LIBGOMP = False


class KernelBuildError(RuntimeError):
    pass


def build_dir() -> str:
    return os.path.abspath(os.environ.get("MS_MODELS_KERNEL_DIR") or os.path.join(HERE, "build"))


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _lib_path(source: str = SOURCE) -> tuple[str, list[str]]:
    src = b""
    for part in (source, HEADER):
        with open(part, "rb") as f:
            src += f.read()
    cxx = _compiler()
    h = hashlib.sha256(src + " ".join([cxx] + CXX_FLAGS).encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(build_dir(), f"{name}-{h}.so")
    return path, [cxx, *CXX_FLAGS, "-o", path, source]


def build(force: bool = False, source: str = SOURCE) -> str:
    """Path of the compiled library of ``source``, compiling it when missing (or ``force``)."""
    path, cmd = _lib_path(source)
    if os.path.exists(path) and not force:
        return path
    os.makedirs(build_dir(), exist_ok=True)
    with open(os.path.join(build_dir(), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        try:
            if os.path.exists(path) and not force:
                return path
            if shutil.which(cmd[0]) is None:
                raise KernelBuildError(f"C++ compiler {cmd[0]!r} not found (set CXX or install g++); "
                                       f"the kernel is built with: {' '.join(cmd)}")
            tmp = f"{path}.tmp{os.getpid()}"
            tmp_cmd = cmd[:-3] + ["-o", tmp, source]
            p = subprocess.run(tmp_cmd, capture_output=True, text=True)
            if p.returncode != 0:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise KernelBuildError(f"kernel build failed (exit {p.returncode}): {' '.join(tmp_cmd)}\n"
                                       f"{p.stderr.strip()}")
            os.replace(tmp, path)  # atomic: a reader never sees a partial library
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _check_white_list(path: str) -> None:
    allowed = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
    if allowed is None:
        return
    allowed, real = os.path.realpath(allowed), os.path.realpath(path)
    if os.path.commonpath([real, allowed]) != allowed:
        raise RuntimeError(f"MS_CUSTOM_AOT_WHITE_LIST={allowed} does not contain the kernel library {real}: "
                           f"set MS_MODELS_KERNEL_DIR to a directory under it (or unset the white list)")


_OP = None


def paged_attention_op():
    """The PagedAttentionFlat ops.Custom (one per process; usable in PyNative and inside ms.jit)."""
    global _OP
    if _OP is None:
        if not _POLICY_BEFORE_LIBGOMP and os.environ.get("GOMP_SPINCOUNT") != _SPINCOUNT:
            import logging

            logging.getLogger(__name__).warning(
                "libgomp was loaded before GOMP_SPINCOUNT=%s was set: the attention kernel's idle threads spin "
                "on cores MindSpore needs (about 2x slower forwards on 2 cores); call "
                "ms_models.kernels.set_omp_wait_policy() before importing mindspore", _SPINCOUNT)
        from mindspore import ops

        path = build()
        _check_white_list(path)
        op = ops.Custom(f"{path}:{FUNC_NAME}", out_shape=lambda q, *_: q, out_dtype=lambda q, *_: q,
                        func_type="aot")
        # The op writes its cache inputs. Declared a memory side effect, MindSpore's graph orders it with the
        # other reads/writes of those Parameters (auto-monad); without it, a read of the cache placed before
        # the op in the same jit graph was measured to see the op's writes (tests/test_attention_kernel.py).
        op.add_prim_attr("side_effect_mem", True)
        _OP = op
    return _OP


_MOE_OP = None


def moe_ffn_op():
    """The MoeFFN ops.Custom (one per process): x [T, H], router logits [T, E], w_gate / w_up [El, H, I], w_down
    [El, I, H] (the El experts this rank holds), query_start_loc, params (the attention kernel's), moe [3] =
    (top_k, norm_topk_prob, first_expert) -> [T, H] (moe_ffn.cc's contract)."""
    global _MOE_OP
    if _MOE_OP is None:
        from mindspore import ops

        path = build(source=MOE_SOURCE)
        _check_white_list(path)
        _MOE_OP = ops.Custom(f"{path}:MoeFFN", out_shape=lambda x, *_: x, out_dtype=lambda x, *_: x,
                             func_type="aot")
    return _MOE_OP


# The token buckets whose linears run SmallMatMul (small_matmul.cc): at 16 rows it is no faster than MindSpore's
# MatMul in the graph (its accumulators leave L1).
SMALL_MATMUL_ROWS = 8
_MM_OPS: dict = {}


# small_matmul.cc's entry points: variant -> (function, its output shapes from the input shapes)
_MM_ENTRIES = {
    "mm": ("SmallMatMul", lambda x, w: [x[0], w[1]]),
    "t": ("SmallMatMulT", lambda x, w: [x[0], w[0]]),
    "mm_add": ("SmallMatMulAdd", lambda x, w, r: [x[0], w[1]]),
    "mm3": ("SmallMatMul3", lambda x, a, b, c: ([x[0], a[1]], [x[0], b[1]], [x[0], c[1]])),
    "norm_mm3": ("SmallNormMatMul3", lambda x, e, a, b, c: ([x[0], a[1]], [x[0], b[1]], [x[0], c[1]])),
    "gate_up": ("SmallGateUp", lambda x, g, u: [x[0], g[1]]),
    "norm_gate_up": ("SmallNormGateUp", lambda x, e, g, u: [x[0], g[1]]),
}


def small_matmul_op(variant: str = "mm"):
    """A SmallMatMul ops.Custom of small_matmul.cc (one per variant and process; its contract is at the top of the
    source), for x [M <= 16, K] in f32, the weights' columns split over MS_PA_THREADS threads: "mm" x @ w [K, N];
    "t" x @ w^T, w [N, K] (the lm head); "mm_add" r + x @ w; "mm3" (x @ w0, x @ w1, x @ w2) in one call (q, k, v);
    "gate_up" silu(x @ w_gate) * (x @ w_up); "norm_mm3" / "norm_gate_up" the same of RMSNorm(x), eps [1] their
    second input."""
    if variant not in _MM_OPS:
        from mindspore import ops

        path = build(source=MATMUL_SOURCE)
        _check_white_list(path)
        entry, shapes = _MM_ENTRIES[variant]
        dtypes = (lambda x, *_: (x, x, x)) if variant.endswith("mm3") else (lambda x, *_: x)
        _MM_OPS[variant] = ops.Custom(f"{path}:{entry}", out_shape=shapes, out_dtype=dtypes, func_type="aot")
    return _MM_OPS[variant]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the custom MindSpore CPU kernels.")
    ap.add_argument("--force", action="store_true", help="rebuild even if the library exists")
    args = ap.parse_args(argv)
    try:
        for source in SOURCES:
            print(build(force=args.force, source=source))
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
