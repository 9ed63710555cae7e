"""Times PagedAttentionFlat in a compiled graph, inside the graph and called alone (run under the worker env).

    .venv-worker/bin/python -m ms_models.kernels.bench [--reps 30] [--spin]

Shapes: Qwen2.5-0.5B attention (14 heads, 2 kv heads, head_dim 64), block size 16; decode B=1/8/32
with 241..256 tokens of context each, and a 1x512 prefill. The op (RoPE, the cache write and attention;
cos_sin [T, hd], slot mapping, query_start_loc, seq lens, block table) runs under ms.jit on an nn.Cell whose
caches are Parameters, with blocking launches.

Each figure is the median ms per call over ``--reps`` calls after a warm-up. ``--spin`` also times, in
fresh processes, the graph with an MLP (matmul [T,896]x[896,4864], silu, matmul back) after each op (the kernels MindSpore runs
next in a layer) under different OpenMP wait settings and thread counts.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from ms_models.kernels import set_omp_wait_policy

set_omp_wait_policy()  # before MindSpore is imported

H, KVH, D, BS = 14, 2, 64, 16
HIDDEN, FFN = 896, 4864
# A jit call costs ~0.6-0.9 ms on its own here (an empty-ish graph: 0.87 ms), so each graph runs the
# attention of LAYERS layers (own caches; each layer's output is the next one's query) and figures
# are per layer: as in the model, where the whole forward is one graph.
LAYERS = 8


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_batch(rng, qlens, ctxs, num_blocks):
    """Random step inputs for requests with ``qlens`` new tokens and ``ctxs`` context after the step."""
    R = len(qlens)
    T = int(sum(qlens))
    M = max(-(-c // BS) for c in ctxs)
    pool = list(rng.permutation(num_blocks))
    bt = np.full((R, M), -1, np.int32)
    qsl = np.zeros(R + 1, np.int32)
    qsl[1:] = np.cumsum(qlens)
    pos = np.zeros((R, max(qlens)), np.int64)
    slots = np.full((R, max(qlens)), -1, np.int32)
    for r, (ql, c) in enumerate(zip(qlens, ctxs)):
        nb = -(-c // BS)
        bt[r, :nb] = [pool.pop() for _ in range(nb)]
        p = np.arange(c - ql, c)
        pos[r, :ql] = p
        slots[r, :ql] = bt[r, p // BS] * BS + p % BS
    inv = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    f = pos[:, :, None] * inv
    return dict(
        q=(rng.standard_normal((T, H * D)) / 8).astype(np.float32),
        k=rng.standard_normal((T, KVH * D)).astype(np.float32),
        v=rng.standard_normal((T, KVH * D)).astype(np.float32),
        pos=pos, slots2d=slots, bt=bt, qsl=qsl, seq=np.array(ctxs, np.int32), qlens=qlens,
        cos_sin=np.concatenate([np.cos(f), np.sin(f)], -1).astype(np.float32).reshape(-1, D)[
            (np.arange(max(qlens))[None, :] < np.array(qlens)[:, None]).reshape(-1)],
        slots=slots[slots >= 0].astype(np.int32),
    )


def direct_call(lib_path, b, num_reqs, k_cache, v_cache, window=0):
    """A callable running the kernel on numpy arrays through ctypes, outside MindSpore (its own speed).
    The caches are written in place (they must be C-contiguous float32); the output is call.keep[0][-1]."""
    import ctypes

    f = ctypes.CDLL(lib_path).PagedAttentionFlat
    arrs = [b["q"], b["k"], b["v"], k_cache, v_cache, b["cos_sin"], b["slots"], b["qsl"], b["seq"], b["bt"],
            np.array([num_reqs, window], np.int32), np.zeros_like(b["q"])]
    assert k_cache.flags.c_contiguous and v_cache.flags.c_contiguous
    run = aot_call(f, [np.ascontiguousarray(a) for a in arrs])

    def call():
        if run() != 0:
            raise RuntimeError("PagedAttentionFlat failed")
    call.keep = run.keep
    return call


def aot_call(fn, arrs):
    """A callable running the AOT kernel function ``fn`` (a ctypes function of the .so) on the C-contiguous numpy
    arrays ``arrs`` (its inputs, then its output), as MindSpore calls it: (nparam, params, ndims, shapes, dtypes,
    stream, extra); returns the kernel's status. ``.keep[0]`` is ``arrs`` (the buffers must outlive the pointers)."""
    import ctypes

    n = len(arrs)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrs])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrs])
    shp = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrs]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(x, ctypes.POINTER(ctypes.c_int64)) for x in shp])
    dtypes = (ctypes.c_char_p * n)(*[str(a.dtype).encode() for a in arrs])

    def call():
        return fn(n, params, ndims, shapes, dtypes, None, None)
    call.keep = (arrs, shp)
    return call


def _median_ms(fn, reps):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def run_bench(reps: int, cases, with_mlp: bool = False):
    import ctypes

    os.environ.setdefault("MS_PA_PROFILE", "1")  # read by the library when MindSpore loads it
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

    from ms_models.kernels import build, paged_attention_op

    ms.runtime.launch_blocking()
    op = paged_attention_op()
    num_blocks = 32 * 17 + 40
    NB = num_blocks + 1
    rng = np.random.default_rng(0)
    w_up = Parameter(Tensor(rng.standard_normal((HIDDEN, FFN)).astype(np.float32) / 30), name="w_up")
    w_down = Parameter(Tensor(rng.standard_normal((FFN, HIDDEN)).astype(np.float32) / 70), name="w_down")

    def caches(shape, name):
        return ParameterTuple(
            Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=f"{name}{i}") for i in range(LAYERS))

    class KernelCell(nn.Cell):
        def __init__(self):
            super().__init__()
            self.kc = caches((NB, BS, KVH, D), "kc")
            self.vc = caches((NB, BS, KVH, D), "vc")
            self.w_up, self.w_down = w_up, w_down

        @ms.jit
        def construct(self, q, k, v, cs, slots, qsl, seq, bt, prm):
            for i in range(LAYERS):
                q = op(q, k, v, self.kc[i], self.vc[i], cs, slots, qsl, seq, bt, prm)
                if with_mlp:  # the layer's MLP-sized kernels between two attentions
                    q = q + ops.matmul(ops.silu(ops.matmul(q, self.w_up)), self.w_down)
            return q

    kcell = KernelCell()
    results = []
    for name, qlens, ctxs in cases:
        b = make_batch(rng, qlens, ctxs, num_blocks)
        T = b["q"].shape[0]
        kargs = [Tensor(b[n]) for n in ("q", "k", "v", "cos_sin", "slots", "qsl", "seq", "bt")]
        kargs += [Tensor(np.array([len(qlens), 0], np.int32))]

        def run_kernel():
            kcell(*kargs).asnumpy()

        prof = ctypes.CDLL(build()).PagedAttentionFlatProfile  # the library MindSpore loaded
        calls, total = ctypes.c_int64(), ctypes.c_double()
        prof(ctypes.byref(calls), ctypes.byref(total), 1)
        row = {"case": name, "kernel_ms": _median_ms(run_kernel, reps) / LAYERS}
        prof(ctypes.byref(calls), ctypes.byref(total), 1)
        row["in_graph_ms"] = total.value / max(1, calls.value) / 1e3 if calls.value else float("nan")
        kc0 = rng.standard_normal((NB, BS, KVH, D)).astype(np.float32)
        row["direct_ms"] = _median_ms(direct_call(build(), b, len(qlens), kc0, kc0.copy()), reps)
        results.append(row)
    return results


CASES = [
    ("decode B=1 ctx~256", [1], [256]),
    ("decode B=8 ctx 241..256", [1] * 8, [241 + 2 * i for i in range(8)]),
    ("decode B=32 ctx 225..256", [1] * 32, [225 + i for i in range(32)]),
    ("prefill 1x512", [512], [512]),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--spin", action="store_true", help="also compare OpenMP wait settings (subprocesses)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the --spin comparison")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:  # one spin setting: op + matmul/silu graph
        for r in run_bench(args.reps, CASES, with_mlp=True):
            print(f"{r['case']}|{r['kernel_ms']:.4f}")
        return 0
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); MS_PA_THREADS={os.environ.get('MS_PA_THREADS', '2')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(loader default)')}")
    print(f"per layer (median of {args.reps} graph calls of {LAYERS} layers each / {LAYERS}):")
    print("kernel: the custom op in the graph; inside: the kernel's own time"
          " in the graph (MS_PA_PROFILE); alone: the same .so called through ctypes outside MindSpore (one"
          " layer's caches, warm in cache)")
    print(f"{'case':28s} {'kernel ms':>10s} {'inside ms':>10s} {'alone ms':>9s}")
    for r in run_bench(args.reps, CASES):
        print(f"{r['case']:28s} {r['kernel_ms']:10.3f} {r['in_graph_ms']:10.3f} {r['direct_ms']:9.3f}")
    if args.spin:
        # fresh process per setting (libgomp reads these at load); settings interleaved over rounds, since
        # other load on a small VM drifts; the table keeps each setting's best median
        settings = [
            ("1 thread", {"MS_PA_THREADS": "1"}),
            ("2t spin 0", {"GOMP_SPINCOUNT": "0"}),
            ("2t spin 10k", {"GOMP_SPINCOUNT": "10000"}),
            ("2t spin 300k", {"GOMP_SPINCOUNT": "300000"}),  # libgomp's default
            ("2t ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000000000"}),
        ]
        best = {}
        for _ in range(args.rounds):
            for label, env in settings:
                e = dict(os.environ, GLOG_v="3", **env)
                p = subprocess.run([sys.executable, "-m", "ms_models.kernels.bench", "--_child", "--reps",
                                    str(args.reps)], env=e, capture_output=True, text=True)
                if p.returncode != 0:
                    print(p.stderr[-2000:])
                    return 1
                for line in p.stdout.splitlines():
                    case, ms_ = line.rsplit("|", 1)
                    key = (case, label)
                    best[key] = min(best.get(key, float("inf")), float(ms_))
        print(f"\nper layer of op + MLP (matmul [T,896]x[896,4864], silu, matmul back), {LAYERS} layers a graph; "
              f"best of {args.rounds} rounds' medians, ms:")
        print(f"{'case':28s}" + "".join(f"{label:>14s}" for label, _ in settings))
        for case, _, _ in CASES:
            print(f"{case:28s}" + "".join(f"{best[(case, label)]:14.3f}" for label, _ in settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
