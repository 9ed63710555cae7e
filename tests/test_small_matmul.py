"""The SmallMatMul custom kernels (ms_models/kernels/small_matmul.cc): x [M <= 16, K] @ w [K, N] and, SmallMatMulT,
x @ w^T with w [N, K] (the lm head), against float64 numpy, called through ctypes outside MindSpore (the model's own
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
from tests.test_small_matmul import call, check
lib = ctypes.CDLL(sys.argv[1])
for shape in eval(sys.argv[3]):
    check(lib, *shape)
    check(lib, *shape, transposed=True)
errors = []
def worker(seed):
    try:
        for _ in range(20):
            check(lib, 8, 576, 1536, seed)
            check(lib, 4, 576, 4000, seed, transposed=True)
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
