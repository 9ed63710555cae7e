"""The SmallMatMul custom kernels (ms_models/kernels/small_matmul.cc) against float64 numpy, called through ctypes
outside MindSpore (the model's own tests run them inside every decode graph: their logits match HF's):
x [M <= 16, K] @ w [K, N]; SmallMatMulT, x @ w^T with w [N, K] (the lm head); SmallMatMulAdd, r + x @ w;
SmallMatMul3, three products of one x (q, k, v); SmallGateUp, silu(x @ w_gate) * (x @ w_up); and the last two of
RMSNorm(x) (SmallNorm*, rows of different scales). Shapes cover the column tail (N not a multiple of 16), the weight
rows' tail (K not a multiple of 8), more columns than one accumulator chunk (2,048), products small enough to stay
on the calling thread, and each code path: the AVX-512 / AVX2 / baseline clones the default build dispatches
between (this machine takes one) built for one target each, with the pool's 2 threads and with 1; the same pool
serving consecutive calls of different shapes; calls from two threads at once (MindSpore launches independent
kernels together); and the contract's refusals."""
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1, 576, 1536), (8, 576, 1536), (16, 64, 4100), (3, 577, 33), (5, 7, 5), (2, 100, 2050), (8, 1536, 576)]

CHILD = r"""
import ctypes, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[2])
from tests.test_small_matmul import call, check, check_fused
from ms_models.kernels.bench import aot_call
lib = ctypes.CDLL(sys.argv[1])
for shape in eval(sys.argv[3]):
    check(lib, *shape)
    check(lib, *shape, transposed=True)
    M, K, N = shape
    for norm in (False, True):
        check_fused(lib, M, K, (N, max(N // 3, 1), N + 17), norm=norm)
        check_fused(lib, M, K, (N, N), norm=norm)
    check_fused(lib, M, K, (N,), add=True)
errors = []
def worker(seed):
    try:
        for _ in range(20):
            check(lib, 8, 576, 1536, seed)
            check(lib, 4, 576, 4000, seed, transposed=True)
            check_fused(lib, 8, 576, (576, 192, 192), seed, norm=True)
            check_fused(lib, 2, 576, (1536, 1536), seed, norm=True)
            check_fused(lib, 3, 1536, (576,), seed, add=True)
    except AssertionError as e:
        errors.append(e)
ts = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
x = np.zeros((17, 4), np.float32); w = np.zeros((4, 4), np.float32); y = np.zeros((17, 4), np.float32)
assert call(lib, x, w, y) != 0                     # more than 16 rows
y = np.zeros((2, 4), np.float64)
assert call(lib, x[:2], w, y) != 0                 # a float64 output
assert call(lib, x[:2], np.zeros((4, 5), np.float32), np.zeros((2, 4), np.float32), True) != 0  # w^T's K != x's K
f = np.zeros((2, 4), np.float32); w5 = np.zeros((4, 5), np.float32)
assert aot_call(lib.SmallGateUp, [x[:2], w, w5, f])() != 0       # gate and up of different widths
assert aot_call(lib.SmallMatMul3, [x[:2], w, w, f, f])() != 0     # two outputs for three weights
assert aot_call(lib.SmallMatMul3, [x[:2], w, w5, w, f, f, f])() != 0  # an output of the wrong width
e = np.ones((1,), np.float32)
assert aot_call(lib.SmallNormGateUp, [x[:2], np.ones((2,), np.float32), w, w, f])() != 0  # eps of two values
assert aot_call(lib.SmallNormMatMul3, [x[:2], w, w, w, f, f, f])() != 0  # no eps
assert aot_call(lib.SmallMatMulAdd, [x[:2], w, np.zeros((2, 5), np.float32), f])() != 0  # r of another width
assert aot_call(lib.SmallNormGateUp, [x[:2], e, w, w, f])() == 0
print("OK")
"""


def call(lib, x, w, y, transposed=False):
    from ms_models.kernels.bench import aot_call

    return aot_call(lib.SmallMatMulT if transposed else lib.SmallMatMul, [x, w, y])()


def check(lib, M, K, N, seed=0, transposed=False):
    """SmallMatMul (w [K, N]) or SmallMatMulT (w [N, K], x @ w^T) against float64 numpy."""
    rng = np.random.default_rng(seed + M * 7 + K * 13 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K) if transposed else (K, N)).astype(np.float32)
    y = np.full((M, N), np.nan, np.float32)
    assert call(lib, x, w, y, transposed) == 0
    ref = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, (M, K, N, err)


def check_fused(lib, M, K, widths, seed=0, norm=False, add=False):
    """SmallMatMul3 (three widths: x @ w_i each), SmallGateUp (two equal widths: silu(x @ w_gate) * (x @ w_up)) or
    SmallMatMulAdd (one width, ``add``: r + x @ w) against float64 numpy; ``norm``: SmallNormMatMul3 /
    SmallNormGateUp, of x / sqrt(mean(x^2) + eps) per row."""
    from ms_models.kernels.bench import aot_call

    rng = np.random.default_rng(seed + M * 7 + K * 13 + sum(widths))
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    ws = [rng.standard_normal((K, n)).astype(np.float32) for n in widths]
    eps = np.array([1e-5 if norm else 0], np.float32)
    x64 = x.astype(np.float64)
    if norm:
        x64 = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps[0])
    ref = [x64 @ w.astype(np.float64) for w in ws]
    ins = [x, eps] if norm else [x]
    if len(ws) == 2:
        ref, fn = [ref[0] / (1 + np.exp(-ref[0])) * ref[1]], lib.SmallNormGateUp if norm else lib.SmallGateUp
    elif add:
        r = rng.standard_normal(ref[0].shape).astype(np.float32)
        ref, fn, ws = [ref[0] + r], lib.SmallMatMulAdd, ws + [r]
    else:
        fn = lib.SmallNormMatMul3 if norm else lib.SmallMatMul3
    ys = [np.full(r.shape, np.nan, np.float32) for r in ref]
    assert aot_call(fn, ins + ws + ys)() == 0
    for y, r in zip(ys, ref):
        err = np.abs(y - r).max() / np.abs(r).max()
        assert err <= 1e-5, (M, K, widths, norm, add, err)


@pytest.mark.parametrize("threads", ["2", "1"])
@pytest.mark.parametrize("isa", ["dispatch", "avx2", "baseline"])
def test_matches_numpy(tmp_path, isa, threads):
    sys.path.insert(0, REPO)
    import ms_models.kernels as kernels  # plain Python: importable without MindSpore

    lib = str(tmp_path / "sm.so")
    flags = {"dispatch": [], "avx2": ["-DSM_CLONES=", "-mavx2", "-mfma"], "baseline": ["-DSM_CLONES="]}[isa]
    subprocess.run([kernels._compiler(), *kernels.CXX_FLAGS, *flags, "-o", lib, kernels.MATMUL_SOURCE], check=True,
                   capture_output=True)
    p = subprocess.run([sys.executable, "-c", CHILD, lib, REPO, repr(SHAPES)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, MS_PA_THREADS=threads))
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stdout[-2000:] + p.stderr[-3000:]
