"""The SmallMatMul custom kernels (ms_models/kernels/small_matmul.cc): x [M <= 16, K] @ w [K, N]; SmallMatMulT,
x @ w^T with w [N, K] (the lm head); SmallMatMul3, three products of one x (q, k, v); SmallGateUp,
silu(x @ w_gate) * (x @ w_up); against float64 numpy, called through ctypes outside MindSpore (the model's own
tests run it inside every decode graph: their logits match HF's). Shapes cover the column tail (N not a multiple of 16), the weight rows' tail (K not a multiple
of 8), more columns than one accumulator chunk (2,048), products small enough to stay on the calling thread, and
each code path: the AVX-512 / AVX2 / baseline clones the default build dispatches between (this machine takes one)
built for one target each, with the pool's 2 threads and with 1; the same pool serving consecutive calls of
different shapes; calls from two threads at once (MindSpore launches independent kernels together); and the
contract's refusals."""
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
    check_fused(lib, M, K, (N, max(N // 3, 1), N + 17))
    check_fused(lib, M, K, (N, N))
errors = []
def worker(seed):
    try:
        for _ in range(20):
            check(lib, 8, 576, 1536, seed)
            check(lib, 4, 576, 4000, seed, transposed=True)
            check_fused(lib, 8, 576, (576, 192, 192), seed)
            check_fused(lib, 2, 576, (1536, 1536), seed)
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


def check_fused(lib, M, K, widths, seed=0):
    """SmallMatMul3 (three widths: x @ w_i each) or SmallGateUp (two equal widths: silu(x @ w_gate) * (x @ w_up))
    against float64 numpy."""
    from ms_models.kernels.bench import aot_call

    rng = np.random.default_rng(seed + M * 7 + K * 13 + sum(widths))
    x = rng.standard_normal((M, K)).astype(np.float32)
    ws = [rng.standard_normal((K, n)).astype(np.float32) for n in widths]
    ref = [x.astype(np.float64) @ w.astype(np.float64) for w in ws]
    if len(ws) == 2:
        ref = [ref[0] / (1 + np.exp(-ref[0])) * ref[1]]
    ys = [np.full(r.shape, np.nan, np.float32) for r in ref]
    assert aot_call(lib.SmallGateUp if len(ws) == 2 else lib.SmallMatMul3, [x, *ws, *ys])() == 0
    for y, r in zip(ys, ref):
        err = np.abs(y - r).max() / np.abs(r).max()
        assert err <= 1e-5, (M, K, widths, err)


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
