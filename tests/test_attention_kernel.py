"""The PagedAttentionFlat custom kernel (ms_models/kernels) against the numpy reference
(tests/attention_reference.py) on random ragged batches.

Runs in the front env (.venv); this file re-runs itself under .venv-worker/bin/python
(``--ms-side out.json``), where each case drives the op over several steps on the same caches,
both inside ``ms.jit`` (an nn.Cell whose caches are Parameters) and in PyNative (Parameters
passed in), and records the worst errors; the tests here assert them. Cases cover GQA group 1, 3
and 4, head_dim 64 and 128, block sizes 4/8/16, sliding windows, one-token and 300-token queries,
decodes mixed with chunked prefills over earlier context, a prefix-cache hit whose last shared
block is partial, padding tokens and padding requests, and block ids in random order. Caches start
random (so a read of a wrong slot shows); after every step the whole cache must match the
reference's (V bit-exact, rotated K within 1e-6: fp32 vs the reference's float64 rotation), so
the scratch block and unused blocks are checked untouched. The MindSpore side runs twice, with the
kernel's 2-thread OpenMP team and with 1 thread. Also: reads of the cache Parameter in a jit graph
are ordered around the op, invalid metadata makes the op fail, and ms_models.kernels.build caches
by source hash, serialises concurrent builds and names the compiler command when it fails.
"""
import json
import os
import subprocess
import sys

import numpy as np

try:
    import pytest
except ImportError:  # the MindSpore-side script under .venv-worker
    pytest = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_PY = os.path.join(REPO, ".venv-worker", "bin", "python")
OUT_TOL = 1e-5   # max |out - ref| / max(1, max |ref|)
KCACHE_TOL = 1e-6

# name: (heads, kv_heads, head_dim, block_size, sliding_window)
CASES = {
    "g1_d64_bs16": (4, 4, 64, 16, 0),
    "g3_d128_bs16": (6, 2, 128, 16, 0),
    "g4_d64_bs4": (8, 2, 64, 4, 0),
    "g3_d64_bs8_window24": (6, 2, 64, 8, 24),
    "g4_d128_bs16_window7": (4, 1, 128, 16, 7),
    "g2_d32_bs8": (4, 2, 32, 8, 0),  # a head_dim without a specialised kernel (the generic path)
}
MODES = ("jit", "pynative")


# ============================================================================ the scenario (numpy only)
class _Req:
    def __init__(self, blocks=None, computed=0):
        self.blocks = list(blocks or [])
        self.computed = computed


def scenario(block_size):
    """Steps as lists of (request name, query tokens), plus padding: (items, pad_tokens, pad_reqs).
    "E" is a prefix-cache hit on A's first two blocks with the second one partial (set up in run_steps)."""
    return [
        ([("A", 300), ("B", 37)], 3, 1),                         # long prefill (many query tiles) + prefill
        ([("A", 1), ("B", 1), ("C", 20), ("D", 1)], 0, 2),      # decodes, a prefill, a one-token prompt
        ([("B", 45), ("A", 1), ("E", 2 * block_size + 5)], 2, 0),  # chunked prefill over context, prefix hit
        ([("A", 1), ("B", 1), ("C", 1), ("D", 1), ("E", 1)], 1, 3),  # decodes reading all earlier steps
        ([("C", 1)], 0, 0),                                         # batch of one decode
    ]


def build_step(rng, reqs, pool, items, pad_tokens, pad_reqs, dims):
    """Random q/k/v and the metadata of one step; allocates blocks from ``pool``."""
    H, KVH, D, BS, window = dims
    n = len(items)
    R = n + pad_reqs
    T = sum(q for _, q in items) + pad_tokens
    qsl = np.zeros(R + 1, np.int32)
    seq = np.zeros(R, np.int32)
    slots = np.full(T, -1, np.int32)
    pos = np.zeros(T, np.int64)
    t = 0
    for r, (name, qlen) in enumerate(items):
        req = reqs[name]
        ctx = req.computed + qlen
        while len(req.blocks) * BS < ctx:
            req.blocks.append(pool.pop())
        p = np.arange(req.computed, ctx)
        pos[t:t + qlen] = p
        slots[t:t + qlen] = np.array(req.blocks)[p // BS] * BS + p % BS
        seq[r] = ctx
        req.computed = ctx
        t += qlen
        qsl[r + 1] = t
    qsl[n + 1:] = t  # padding requests: empty ranges
    M = max(len(reqs[name].blocks) for name, _ in items) + 1
    bt = np.full((R, M), -1, np.int32)
    for r, (name, _) in enumerate(items):
        b = reqs[name].blocks
        bt[r, :len(b)] = b
    inv = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    f = pos[:, None] * inv[None, :]
    cos_sin = np.concatenate([np.cos(f), np.sin(f)], -1).astype(np.float32)
    q = (rng.standard_normal((T, H * D)) * 2.0 / np.sqrt(D)).astype(np.float32)
    k = rng.standard_normal((T, KVH * D)).astype(np.float32)
    v = rng.standard_normal((T, KVH * D)).astype(np.float32)
    return q, k, v, cos_sin, slots, qsl, seq, bt, np.array([n, window], np.int32)


def run_steps(dims, make_call, seed):
    """Drives the kernel through the scenario: ``make_call(k_cache0, v_cache0)`` sets up the op on these
    initial caches and returns ``call(step_inputs) -> (out, k_cache, v_cache)``. Returns the worst errors
    against the reference."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from attention_reference import paged_attention_reference

    H, KVH, D, BS, window = dims
    rng = np.random.default_rng(seed)
    num_blocks = (300 + 40 + 45 + 3) // BS + 4 * (20 // BS + 2) + (2 * BS + 5) // BS + 8
    NB = num_blocks + 1  # + the scratch block, never handed out
    pool = [int(b) for b in rng.permutation(num_blocks)]  # block ids in random order
    kc = rng.standard_normal((NB, BS, KVH, D)).astype(np.float32)
    vc = rng.standard_normal((NB, BS, KVH, D)).astype(np.float32)
    scratch_k, scratch_v = kc[-1].copy(), vc[-1].copy()
    call = make_call(kc.copy(), vc.copy())
    reqs = {n: _Req() for n in "ABCD"}
    worst = {"out": 0.0, "k_cache": 0.0, "v_cache_exact": True, "scratch_untouched": True, "steps": 0}
    for s, (items, pad_tokens, pad_reqs) in enumerate(scenario(BS)):
        if s == 2:  # E: prefix hit on A's first 2 blocks, the second shared block partial (BS - 3 tokens)
            reqs["E"] = _Req(reqs["A"].blocks[:2], 2 * BS - 3)
        inputs = build_step(rng, reqs, pool, items, pad_tokens, pad_reqs, dims)
        ref_out, kc, vc = paged_attention_reference(*inputs[:3], kc, vc, *inputs[3:])
        out, k_got, v_got = call(inputs)
        worst["out"] = max(worst["out"], float(np.abs(out - ref_out).max() / max(1.0, np.abs(ref_out).max())))
        worst["k_cache"] = max(worst["k_cache"], float(np.abs(k_got - kc).max()))
        worst["v_cache_exact"] &= bool(np.array_equal(v_got, vc))
        worst["scratch_untouched"] &= bool(np.array_equal(k_got[-1], scratch_k) and np.array_equal(v_got[-1], scratch_v))
        pad_rows = inputs[4] < 0  # slot -1
        worst["padding_rows_zero"] = worst.get("padding_rows_zero", True) and bool(not out[pad_rows].any())
        worst["steps"] += 1
        kc, vc = k_got, v_got  # continue from what the kernel wrote (equal to the reference's but for K rounding)
    return worst, (kc, vc)


# ============================================================================ MindSpore side
def _ms_side(out_path):
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn

    from ms_models.kernels import paged_attention_op

    ms.runtime.launch_blocking()
    op = paged_attention_op()

    class AttnCell(nn.Cell):
        def __init__(self, kc, vc):
            super().__init__()
            self.k_cache = Parameter(Tensor(kc), name="k_cache")
            self.v_cache = Parameter(Tensor(vc), name="v_cache")
            self.op = op

        @ms.jit
        def construct(self, q, k, v, cos_sin, slots, qsl, seq, bt, params):
            return self.op(q, k, v, self.k_cache, self.v_cache, cos_sin, slots, qsl, seq, bt, params)

    results = {}
    for seed, (name, dims) in enumerate(CASES.items()):
        for mode in MODES:
            def make_call(kc0, vc0, mode=mode):
                cell = AttnCell(kc0, vc0)

                def call(inputs):
                    q, k, v, cs, slots, qsl, seq, bt, prm = (Tensor(a) for a in inputs)
                    if mode == "jit":
                        out = cell(q, k, v, cs, slots, qsl, seq, bt, prm)
                    else:  # PyNative, the same Parameters passed in
                        out = op(q, k, v, cell.k_cache, cell.v_cache, cs, slots, qsl, seq, bt, prm)
                    return out.asnumpy(), cell.k_cache.asnumpy(), cell.v_cache.asnumpy()
                return call

            try:
                results[f"{name}/{mode}"], _ = run_steps(dims, make_call, 1000 + seed)
            except Exception as e:  # noqa: BLE001 -- reported to the test
                results[f"{name}/{mode}"] = {"error": f"{type(e).__name__}: {e}"}

    # graph ordering: under jit, a read of the cache before the op must not see its writes, one after must
    from mindspore import ops

    class OrderCell(nn.Cell):
        def __init__(self, kc, vc):
            super().__init__()
            self.k_cache = Parameter(Tensor(kc), name="k_cache")
            self.v_cache = Parameter(Tensor(vc), name="v_cache")

        @ms.jit
        def construct(self, q, k, v, cos_sin, slots, qsl, seq, bt, params):
            before = ops.reduce_sum(self.v_cache * 1.0)
            out = op(q, k, v, self.k_cache, self.v_cache, cos_sin, slots, qsl, seq, bt, params)
            after = ops.reduce_sum(self.v_cache * 1.0)
            return out, before, after

    step = build_step(np.random.default_rng(0), {"A": _Req()}, list(range(4)), [("A", 5)], 0, 0, (2, 1, 64, 4, 0))
    zeros = np.zeros((5, 4, 1, 64), np.float32)
    _, before, after = OrderCell(zeros, zeros.copy())(*(Tensor(a) for a in step))
    results["jit_order"] = {"before": float(before.asnumpy()), "after": float(after.asnumpy()),
                            "written": float(step[2].astype(np.float64).sum())}

    # invalid metadata: a block id past the cache must make the op fail, not read out of bounds
    q, k, v, cs, slots, qsl, seq, bt, prm = build_step(np.random.default_rng(0), {"A": _Req()}, list(range(4)),
                                                      [("A", 5)], 0, 0, (2, 1, 64, 4, 0))
    bt = bt.copy()
    bt[0, 0] = 99
    cache = Parameter(Tensor(np.zeros((5, 4, 1, 64), np.float32)), name="c")
    try:
        op(*(Tensor(a) for a in (q, k, v)), cache, cache, *(Tensor(a) for a in (cs, slots, qsl, seq, bt, prm)))
        results["bad_block_id"] = "accepted"
    except Exception as e:  # noqa: BLE001
        results["bad_block_id"] = f"raised {type(e).__name__}"
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


# ============================================================================ pytest side (front env)
if pytest is not None:
    @pytest.fixture(scope="module", params=["2", "1"], ids=["2threads", "1thread"])
    def kernel_results(request, tmp_path_factory):
        """The MindSpore side's results with the kernel's OpenMP team (MS_PA_THREADS=2, the default) and
        without (1)."""
        if not os.path.exists(WORKER_PY):
            pytest.skip(f"worker env missing: {WORKER_PY}")
        d = tmp_path_factory.mktemp("attention_kernel")
        out = d / "results.json"
        env = dict(os.environ, GLOG_v="3", PYTHONPATH=REPO, MS_PA_THREADS=request.param)
        p = subprocess.run([WORKER_PY, os.path.abspath(__file__), "--ms-side", str(out)], cwd=str(d), env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
        return json.loads(out.read_text())

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("case", list(CASES))
    def test_kernel_matches_reference(kernel_results, case, mode):
        r = kernel_results[f"{case}/{mode}"]
        assert "error" not in r, r
        assert r["steps"] == 5
        assert r["out"] <= OUT_TOL, r
        assert r["k_cache"] <= KCACHE_TOL, r
        assert r["v_cache_exact"], r
        assert r["scratch_untouched"], r
        assert r["padding_rows_zero"], r

    def test_jit_orders_cache_reads_around_the_op(kernel_results):
        """The op is declared a memory side effect: reads of the cache Parameter in the same graph happen
        before / after it as written (without the declaration the earlier read saw the writes)."""
        r = kernel_results["jit_order"]
        assert r["before"] == 0.0, r
        assert abs(r["after"] - r["written"]) <= 1e-3 * max(1.0, abs(r["written"])), r

    def test_invalid_block_id_fails(kernel_results):
        assert kernel_results["bad_block_id"].startswith("raised"), kernel_results["bad_block_id"]

    def _kernels(monkeypatch, build_dir):
        monkeypatch.setenv("MS_MODELS_KERNEL_DIR", str(build_dir))
        monkeypatch.syspath_prepend(REPO)
        import ms_models.kernels as kernels  # plain Python: importable without MindSpore
        return kernels

    def test_build_is_cached_by_source_hash(tmp_path, monkeypatch):
        kernels = _kernels(monkeypatch, tmp_path / "kb")
        path = kernels.build()
        assert os.path.dirname(path) == str(tmp_path / "kb") and os.path.basename(path).startswith("paged_attention-")
        mtime = os.stat(path).st_mtime_ns
        assert kernels.build() == path and os.stat(path).st_mtime_ns == mtime  # not rebuilt

    def test_concurrent_builds_share_one_library(tmp_path):
        """Two processes starting together on an empty build directory: both get the same, complete files (one
        per kernel source)."""
        env = dict(os.environ, MS_MODELS_KERNEL_DIR=str(tmp_path / "kb"), PYTHONPATH=REPO)
        procs = [subprocess.Popen([sys.executable, "-m", "ms_models.kernels"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert outs[0][0] == outs[1][0]
        built = sorted(os.path.basename(p) for p in outs[0][0].split())
        assert [b.split("-")[0] for b in built] == ["moe_ffn", "paged_attention", "small_matmul"]
        assert sorted(f for f in os.listdir(tmp_path / "kb") if f.endswith(".so") or ".tmp" in f) == built

    def test_missing_compiler_names_the_command(tmp_path, monkeypatch):
        kernels = _kernels(monkeypatch, tmp_path / "kb")
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
        with pytest.raises(kernels.KernelBuildError, match=r"no-such-g\+\+.*-fopenmp -shared -fPIC"):
            kernels.build()

    @pytest.mark.parametrize("isa_flags", [[], ["-mavx2", "-mfma"]], ids=["baseline", "avx2"])
    def test_isa_variants_match_reference(tmp_path, monkeypatch, isa_flags):
        """The code of the non-AVX-512 clones (this machine's dispatcher picks AVX-512 where it can): the
        kernel built for one target only, called through ctypes outside MindSpore, against the reference."""
        kernels = _kernels(monkeypatch, tmp_path)
        from ms_models.kernels.bench import direct_call

        lib = str(tmp_path / "pa.so")
        subprocess.run([kernels._compiler(), *kernels.CXX_FLAGS, "-DPA_CLONES=", *isa_flags, "-o", lib,
                        kernels.SOURCE], check=True)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from attention_reference import paged_attention_reference

        for dims in [(14, 2, 64, 16, 0), (6, 2, 128, 8, 9), (4, 2, 32, 4, 0)]:
            rng = np.random.default_rng(dims[2])
            reqs = {"A": _Req(), "B": _Req(), "C": _Req()}
            pool = list(rng.permutation(200))
            H, KVH, D, BS, _ = dims
            kc = rng.standard_normal((201, BS, KVH, D)).astype(np.float32)
            vc = rng.standard_normal((201, BS, KVH, D)).astype(np.float32)
            for items in ([("A", 40), ("B", 3)], [("A", 1), ("B", 1), ("C", 17)]):
                q, k, v, cs, slots, qsl, seq, bt, prm = build_step(rng, reqs, pool, items, 1, 1, dims)
                ref, kc_ref, vc_ref = paged_attention_reference(q, k, v, kc, vc, cs, slots, qsl, seq, bt, prm)
                b = dict(q=q, k=k, v=v, cos_sin=cs, slots=slots, qsl=qsl, seq=seq, bt=bt)
                call = direct_call(lib, b, int(prm[0]), kc, vc, window=int(prm[1]))
                call()
                out = call.keep[0][-1]
                assert np.abs(out - ref).max() / max(1.0, np.abs(ref).max()) <= OUT_TOL
                assert np.abs(kc - kc_ref).max() <= KCACHE_TOL and np.array_equal(vc, vc_ref)

    def test_reference_self_check():
        """The oracle itself: one request, no cache history, equals a dense causal softmax attention."""
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from attention_reference import paged_attention_reference, rope

        rng = np.random.default_rng(5)
        H, KVH, D, BS, T = 4, 2, 8, 4, 6
        q, k, v = (rng.standard_normal((T, n * D)).astype(np.float32) for n in (H, KVH, KVH))
        f = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, D, 2) / D)
        cs = np.concatenate([np.cos(f), np.sin(f)], -1).astype(np.float32)
        kc = np.zeros((3, BS, KVH, D), np.float32)
        out, kc2, _ = paged_attention_reference(q, k, v, kc, kc.copy(), cs, np.array([4, 5, 6, 7, 0, 1], np.int32),
                                                np.array([0, T], np.int32), np.array([T], np.int32),
                                                np.array([[1, 0]], np.int32), np.array([1, 0], np.int32))
        qr = rope(q.reshape(T, H, D).astype(np.float64), cs)
        kr = rope(k.reshape(T, KVH, D).astype(np.float64), cs)
        s = np.einsum("thd,shd->hts", qr, np.repeat(kr, H // KVH, 1))
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        dense = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), np.repeat(v.reshape(T, KVH, D), H // KVH, 1))
        np.testing.assert_allclose(out, dense.reshape(T, H * D), atol=1e-6)
        np.testing.assert_allclose(kc2[1, :], kr[:4].astype(np.float32), atol=1e-6)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ms-side":
    _ms_side(sys.argv[2])
