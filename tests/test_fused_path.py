"""The Ascend path of ms_models (device "ascend": MindSpore's fused kernels), run here with stand-ins.

No NPU exists here, and none of the fused kernels has a CPU implementation. So the model is built for "ascend"
with ``kernels=`` stand-ins: plain-op implementations of each kernel's documented contract (MindSpore 2.10:
RmsNorm, RotaryPositionEmbedding, ReshapeAndCache, PagedAttention, FlashAttentionScore; see
ms_models.layers.FusedKernels), fp32 since the CPU has nothing else. Everything else is the real ascend path:
unfolded norm gammas, vLLM's [blocks, block_size, kv_heads, head_dim] cache, slot mapping, block tables, context
lengths, masks, the choice of PagedAttention (decode) or FlashAttentionScore (prefill, sliding window).

For a Llama, a Qwen2 (biases), a Qwen3 (q/k norm, head_dim 64) and a Mistral (sliding window 8) checkpoint, the
CPU path, the ascend path under ms.jit and the ascend path in PyNative with contract checks run the same mixed
batches (decodes of 1-8 sequences, prefill chunks over earlier context, padding) on their own caches. Asserted:
logits equal the CPU path's (< 1e-4); the caches hold the same K/V (the ascend one in vLLM's layout); every kernel
call meets its contract (shapes, dtypes, index ranges, no all-masked row); per layer the cache write comes first,
then PagedAttention for a decode batch or FlashAttentionScore otherwise. And the real kernels: an "ascend" model
in bf16 builds here with MindSpore's own primitives (attributes checked), bf16 weights and a bf16 cache half the
size of the CPU one; dtypes a device lacks are refused.

Runs in the front env; the MindSpore side is this file run as a script under .venv-worker/bin/python.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
ROUNDS = 2
ATOL = 1e-4


# ============================================================================ MindSpore side
def stand_in_kernels(log: list | None):
    """An object with FusedKernels' factories whose kernels are plain MindSpore ops following each kernel's
    documented contract. With ``log`` (PyNative only): every call is checked against the contract and its kernel
    name appended to ``log``."""
    import mindspore as ms
    from mindspore import Parameter, nn, ops

    class RmsNorm(nn.Cell):
        def __init__(self, eps):
            super().__init__()
            self.eps = eps

        def construct(self, x, gamma):
            rstd = ops.rsqrt(ops.mean(x * x, -1, True) + self.eps)
            return x * rstd * gamma, rstd

    class Rope(nn.Cell):
        def construct(self, x, cos, sin, mode):
            h = x.shape[-1] // 2
            return x * cos + ops.concat((-x[..., h:], x[..., :h]), -1) * sin

    class ReshapeAndCache(nn.Cell):
        def construct(self, key, value, key_cache, value_cache, slot_mapping):
            bs = key_cache.shape[1]
            idx = ops.stack((slot_mapping // bs, slot_mapping % bs), -1)
            ops.scatter_nd_update(key_cache, idx, key)
            ops.scatter_nd_update(value_cache, idx, value)
            return key

    class PagedAttention(nn.Cell):
        def __init__(self, heads, scale, kv_heads):
            super().__init__()
            self.heads, self.scale, self.kv_heads = heads, scale, kv_heads

        def construct(self, query, key_cache, value_cache, block_tables, context_lens):
            B, H, D = query.shape
            bs, kvh = key_cache.shape[1], key_cache.shape[2]
            L = block_tables.shape[1] * bs
            k = ops.gather(key_cache, block_tables, 0).reshape(B, L, kvh, D).transpose(0, 2, 3, 1)   # [B,kvh,D,L]
            v = ops.gather(value_cache, block_tables, 0).reshape(B, L, kvh, D).transpose(0, 2, 1, 3)
            s = ops.matmul(query.reshape(B, kvh, H // kvh, D), k) * self.scale                    # [B,kvh,g,L]
            hidden = ops.arange(0, L, 1, dtype=ms.int32).reshape(1, 1, 1, L) >= context_lens.reshape(B, 1, 1, 1)
            p = ops.softmax(s + ops.cast(hidden, s.dtype) * -1e30, -1)
            return ops.matmul(p, v).reshape(B, H, D)

    class FlashAttentionScore(nn.Cell):
        def __init__(self, heads, scale, layout):
            super().__init__()
            self.heads, self.scale, self.layout = heads, scale, layout

        def construct(self, query, key, value, real_shift, drop_mask, padding_mask, attn_mask):
            B, S1, H1 = query.shape
            S2 = key.shape[1]
            D = H1 // self.heads
            kvh = key.shape[2] // D
            g = self.heads // kvh
            q = query.reshape(B, S1, self.heads, D).transpose(0, 2, 1, 3)                     # [B,H,S1,D]
            k = ops.tile(key.reshape(B, S2, kvh, 1, D), (1, 1, 1, g, 1)).reshape(B, S2, self.heads, D)
            v = ops.tile(value.reshape(B, S2, kvh, 1, D), (1, 1, 1, g, 1)).reshape(B, S2, self.heads, D)
            s = ops.matmul(q, k.transpose(0, 2, 3, 1)) * self.scale                               # [B,H,S1,S2]
            p = ops.softmax(s + ops.cast(attn_mask, s.dtype) * -1e30, -1)
            out = ops.matmul(p, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3).reshape(B, S1, H1)
            stats = ops.zeros((B, self.heads, S1, 8), ms.float32)
            return stats, stats, ops.zeros((1,), query.dtype), out

    def check_rms_norm(x, gamma):
        assert gamma.shape == (x.shape[-1],) and gamma.dtype == x.dtype, (x.shape, gamma.shape)

    def check_rope(x, cos, sin, mode):
        assert mode == 0 and x.ndim == 4 and x.shape[0] == 1, (x.shape, mode)          # BSND, rotate_half
        assert cos.shape == sin.shape == (1, x.shape[1], 1, x.shape[3]), (x.shape, cos.shape)
        assert cos.dtype == sin.dtype == x.dtype

    def check_write(key, value, key_cache, value_cache, slot_mapping):
        T, N, D = key.shape
        assert value.shape == key.shape and key_cache.shape == value_cache.shape
        assert isinstance(key_cache, Parameter) and isinstance(value_cache, Parameter)  # written in place
        assert key_cache.ndim == 4 and key_cache.shape[2:] == (N, D), (key.shape, key_cache.shape)
        assert key_cache.dtype == key.dtype == value.dtype
        s = slot_mapping.asnumpy()
        assert slot_mapping.dtype == ms.int32 and s.shape == (T,), (slot_mapping.dtype, s.shape)
        assert s.min() >= 0 and s.max() < key_cache.shape[0] * key_cache.shape[1], s

    def check_paged(cell, query, key_cache, value_cache, block_tables, context_lens):
        B, H, D = query.shape
        assert H == cell.heads and key_cache.shape[2:] == (cell.kv_heads, D), (query.shape, key_cache.shape)
        assert query.dtype == key_cache.dtype == value_cache.dtype and cell.scale == 1.0  # q is pre-scaled
        bt, cl = block_tables.asnumpy(), context_lens.asnumpy()
        assert block_tables.dtype == context_lens.dtype == ms.int32 and bt.shape[0] == B and cl.shape == (B,)
        assert bt.min() >= 0 and bt.max() < key_cache.shape[0], bt
        assert cl.min() >= 1 and cl.max() <= bt.shape[1] * key_cache.shape[1], cl

    def check_flash(cell, query, key, value, real_shift, drop_mask, padding_mask, attn_mask):
        assert cell.layout == "BSH" and cell.scale == 1.0
        assert real_shift is None and drop_mask is None and padding_mask is None
        B, S1, H1 = query.shape
        D = H1 // cell.heads
        assert key.shape == value.shape and key.shape[0] == B and key.shape[2] % D == 0
        assert cell.heads % (key.shape[2] // D) == 0 and query.dtype == key.dtype == value.dtype
        m = attn_mask.asnumpy()
        assert attn_mask.dtype == ms.uint8 and m.shape == (B, 1, S1, key.shape[1]), (attn_mask.dtype, m.shape)
        assert set(np.unique(m)) <= {0, 1} and (m == 0).any(-1).all(), "a query row with every key masked"

    class Checked(nn.Cell):
        """PyNative only: checks the call against the contract, logs the kernel's name, runs the stand-in."""

        def __init__(self, name, inner, check, with_cell=False):
            super().__init__()
            self.name, self.inner, self.check, self.with_cell = name, inner, check, with_cell

        def construct(self, *args):
            self.check(*((self.inner,) + args if self.with_cell else args))
            log.append(self.name)
            return self.inner(*args)

    def wrap(name, cell, check, with_cell=False):
        return cell if log is None else Checked(name, cell, check, with_cell)

    class Kernels:
        @staticmethod
        def rms_norm(eps):
            return wrap("rms_norm", RmsNorm(eps), check_rms_norm)

        @staticmethod
        def rope():
            return wrap("rope", Rope(), check_rope)

        @staticmethod
        def reshape_and_cache():
            return wrap("reshape_and_cache", ReshapeAndCache(), check_write)

        @staticmethod
        def paged_attention(num_heads, num_kv_heads):
            return wrap("paged_attention", PagedAttention(num_heads, 1.0, num_kv_heads), check_paged, True)

        @staticmethod
        def flash_attention(num_heads):
            return wrap("flash_attention", FlashAttentionScore(num_heads, 1.0, "BSH"), check_flash, True)

    return Kernels()


def real_kernels_check(model_dir: str, cpu_model) -> dict:
    """An ascend model in bf16 with MindSpore's own kernels, built (not run: no NPU) on this CPU."""
    import mindspore as ms
    from ms_models import load_model
    from ms_models.layers import DeviceOps, FusedKernels

    refused = []
    for device, dtype, kernels in (("cpu", "bfloat16", None), ("cpu", "float16", None), ("ascend", "float32", None)):
        try:
            DeviceOps(device, dtype=dtype, kernels=kernels)
        except ValueError as e:
            refused.append(str(e))
    m = load_model(model_dir, device="ascend", dtype="bfloat16", kernels=FusedKernels())
    m.allocate_kv_cache(8, 4)
    layer = m.net.layers[0]
    cfg = m.config
    return {
        "refused": refused,
        "default_dtype": DeviceOps("ascend").dtype_name,
        "prims": {name: [type(op).__name__, {k: (v if isinstance(v, (int, float, str)) else str(v))
                                             for k, v in op.attrs.items()}]
                  for name, op in (("norm", layer.norm_op), ("rope", layer.rope_op), ("write", layer.write_op),
                                   ("paged", layer.paged_op), ("flash", layer.flash_op))},
        "weight_dtypes": sorted({str(p.dtype) for p in m.net.get_parameters()}),
        "cache_shape": list(layer.k_cache.shape),
        "heads": [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim],
        "kv_bytes_per_block": [m.kv_cache_bytes_per_block(4), cpu_model.kv_cache_bytes_per_block(4)],
        "weight_bytes": [m.weight_bytes(), cpu_model.weight_bytes()],
        "config_dtype": cfg.dtype,
    }


def ms_side(spec_path: str) -> None:
    from test_graph_cache import BLOCK_SIZE, NUM_BLOCKS, batches

    spec = json.load(open(spec_path))
    from ms_models import load_model, runtime

    runtime.setup("cpu")
    result = {}
    for arch, model_dir in spec["models"].items():
        log: list = []
        cpu = load_model(model_dir, device="cpu")
        fused = load_model(model_dir, device="ascend", dtype="float32", kernels=stand_in_kernels(None))
        checked = load_model(model_dir, device="ascend", dtype="float32", kernels=stand_in_kernels(log),
                             use_jit=False)
        for m in (cpu, fused, checked):
            m.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
        rng = np.random.default_rng(1)
        diffs, calls = [], []
        for _ in range(ROUNDS):
            for batch in batches(rng, cpu.config.vocab_size):
                args = {k: np.asarray(v) for k, v in batch.items()}
                ref = cpu.forward(**args)
                del log[:]
                got = [fused.forward(**args), checked.forward(**args)]
                diffs.append([float(np.abs(g - ref).max()) for g in got])
                calls.append({"shape": list(args["input_ids"].shape), "log": list(log)})
        cache_diff = 0.0
        for (ck, cv), (fk, fv), (hk, hv) in zip(cpu.kv_caches(), fused.kv_caches(), checked.kv_caches()):
            for c, f in ((ck, fk), (cv, fv), (ck, hk), (cv, hv)):
                c = c.asnumpy().reshape(cpu.config.num_kv_heads, NUM_BLOCKS + 1, BLOCK_SIZE, -1)[:, :NUM_BLOCKS]
                f = f.asnumpy()[:NUM_BLOCKS].transpose(2, 0, 1, 3)   # [blocks, bs, kvh, hd] -> [kvh, blocks, bs, hd]
                cache_diff = max(cache_diff, float(np.abs(c - f).max()))
        result[arch] = {"diffs": diffs, "calls": calls, "cache_diff": cache_diff,
                        "cache_abs_max": float(np.abs(cpu.kv_caches()[0][0].asnumpy()).max()),
                        "layers": cpu.config.num_layers, "qk_norm": bool(cpu.config.qk_norm),
                        "sliding_window": cpu.config.sliding_window}
        if arch == "llama":
            result["real"] = real_kernels_check(model_dir, cpu)
    json.dump(result, open(spec["out"], "w"))


# ============================================================================ pytest side
def test_ascend_path_with_contract_stand_ins_matches_cpu(tmp_path):
    from conftest import ROOT, WORKER_PY
    from test_models import _make_checkpoint

    models = {}
    for i, arch in enumerate(ARCHS):
        _make_checkpoint(arch, seed=30 + i).save_pretrained(tmp_path / arch)
        models[arch] = str(tmp_path / arch)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": models, "out": str(tmp_path / "out.json")}))
    proc = subprocess.run([str(WORKER_PY), __file__, str(spec)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}:{ROOT / 'tests'}",
                                             "PATH": "/usr/bin:/bin", "GLOG_v": "3"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "out.json").read_text())

    for arch in ARCHS:
        a = r[arch]
        worst = np.max(a["diffs"], 0)
        assert worst[0] < ATOL and worst[1] < ATOL, (arch, worst)           # jit and PyNative ascend paths
        assert a["cache_abs_max"] > 0.1 and a["cache_diff"] < ATOL, (arch, a["cache_diff"])
        L = a["layers"]
        norms_per_layer = 4 if a["qk_norm"] else 2
        for c in a["calls"]:
            B, Q = c["shape"]
            paged = Q == 1 and not a["sliding_window"]
            attn = "paged_attention" if paged else "flash_attention"
            log = c["log"]
            assert log.count("rms_norm") == norms_per_layer * L + 1, (arch, c)
            assert log.count("rope") == 2 * L and log.count("reshape_and_cache") == L, (arch, c)
            assert log.count(attn) == L and len(log) == (norms_per_layer + 4) * L + 1, (arch, c)
            # per layer: q/k RoPE, the cache write, then attention over the cache (which holds this step's keys)
            per_layer = [x for x in log if x != "rms_norm"]
            assert per_layer == ["rope", "rope", "reshape_and_cache", attn] * L, (arch, c)
        kinds = {(c["shape"][1] == 1) for c in a["calls"]}
        assert kinds == {True, False}, arch                                  # both decodes and prefills ran

    real = r["real"]
    assert len(real["refused"]) == 3 and all("not supported" in m for m in real["refused"]), real["refused"]
    assert real["default_dtype"] == "bfloat16" and real["config_dtype"] == "bfloat16"
    heads, kv_heads, head_dim = real["heads"]
    prims = real["prims"]
    assert prims["norm"][0] == "RmsNorm" and prims["rope"][0] == "RotaryPositionEmbedding"
    assert prims["write"][0] == "ReshapeAndCache"
    assert prims["paged"][0] == "PagedAttention" and prims["paged"][1]["head_num"] == heads
    assert prims["paged"][1]["kv_head_num"] == kv_heads and prims["paged"][1]["scale_value"] == 1.0
    assert prims["flash"][0] == "FlashAttentionScore" and prims["flash"][1]["head_num"] == heads
    assert prims["flash"][1]["scale_value"] == 1.0
    assert real["weight_dtypes"] == ["BFloat16"], real["weight_dtypes"]
    assert real["cache_shape"] == [8 + 1, 4, kv_heads, head_dim]             # vLLM's layout (+ scratch block)
    assert real["kv_bytes_per_block"][0] * 2 == real["kv_bytes_per_block"][1]
    assert 0.45 < real["weight_bytes"][0] / real["weight_bytes"][1] < 0.55     # bf16 (norms unfolded, no rotate_half)


if __name__ == "__main__":
    ms_side(sys.argv[1])
