"""The Ascend path of ms_models (device "ascend": MindSpore's fused kernels), run here with stand-ins.

No NPU exists here, and none of the fused kernels has a CPU implementation. So the model is built for "ascend"
with ``kernels=`` stand-ins: plain-op implementations of each kernel's documented contract (MindSpore 2.10:
RmsNorm, RotaryPositionEmbedding, ReshapeAndCache, PagedAttention, FlashAttentionScore and the MoE kernels; see
ms_models.layers.FusedKernels), fp32 since the CPU has nothing else. Everything else is the real ascend path:
unfolded norm gammas, vLLM's [blocks, block_size, kv_heads, head_dim] cache, the flat batch's slot mapping, block
tables, context and query lengths, masks, and the choice per step (layers.build_fused_attention_metadata) of
FlashAttentionScore in layout TND with actual sequence lengths (pure prefills), PagedAttention (decodes) or
PagedAttention with per-sequence query lengths and a mask (mixed batches, chunks over earlier context, sliding
windows).

For a Llama, a Qwen2 (biases), a Qwen3 (q/k norm, head_dim 64), a Mistral (sliding window 8), a Qwen2-MoE (shared
expert, a dense middle layer, one KV head, renormalised top-k) and a DeepSeek-V3 (MLA: q_lora 96, kv_lora 64, rope 16,
nope 32, v 32; sigmoid group-limited routing with a correction bias, a shared expert, a dense first layer) checkpoint,
the
CPU path (the ms_models.kernels attention kernel), the ascend path under ms.jit and the ascend path in PyNative
with contract checks run the same flat batches (decodes of 1-8 sequences, pure prefills, prefill chunks over
earlier context mixed with decodes, padded tokens and requests) on their own caches. Asserted: logits equal the
CPU path's (< 1e-4); the caches hold the same K/V (padding tokens write only the scratch block); every kernel call
meets its contract (shapes, dtypes, index ranges, the meaning of each length, no all-masked row); per layer the
cache write comes first, then the kernel the step's kind calls for, then in a sparse layer MoeGatingTopKSoftmax,
MoeInitRoutingV2, three GroupedMatmul and MoeTokenUnpermute (moe.fused_experts); one body graph per token bucket and kernel
path. Expert parallel (moe.fused_experts with a rank's experts): the parts of 2 and 4 ranks add up to all experts'
output, with GroupedMatmul's rows past a rank's group list (undefined in the contract) NaN in the stand-in; the
whole fused model over two expert-parallel ranks (two processes) gives the one-process logits. MLA
(ms_models.mla's FusedMlaDecoderLayer): ReshapeAndCache of the latent row alone (no value), PagedAttention
with mla_v_dim over the latent cache passed as key and value cache, FlashAttentionScore on expanded heads for pure
prefills. And the real kernels: an "ascend" model in bf16 builds here with MindSpore's own primitives (attributes
checked: FlashAttentionScore TND / sparse_mode 3 and its constant causal mask), bf16 weights and a bf16 cache half
the size of the CPU one; dtypes a device lacks are refused; the DeepSeek-V3 one's PagedAttention has kv_head_num 1 and
mla_v_dim = kv_lora_rank, its cache one bf16 latent row per token.

Runs in the front env; the MindSpore side is this file run as a script under .venv-worker/bin/python.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "deepseek_v3")
# DeepSeek-V3 (test_deepseek's "v3": q_lora, sigmoid routing with a correction bias, groups, a shared expert, a dense
# first layer) with the MLA dims: FlashAttentionScore's head dim qk_nope + qk_rope = 48 (a multiple of 16)
MLA_DIMS = dict(q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
MOE_CALLS = ["moe_gating_top_k_softmax", "moe_init_routing_v2"] + ["grouped_matmul"] * 3 + ["moe_token_unpermute"]
ROUNDS = 2
ATOL = 1e-4
BLOCK_SIZE, NUM_BLOCKS, MAX_SEQS, MAX_MODEL_LEN, MAX_TOKENS = 4, 64, 8, 64, 32
# One round of steps: each request as (earlier tokens, tokens this step). Padded (CausalLM._pad: tokens to a power
# of two, requests to min(tokens, MAX_SEQS)) with and without padded requests; contexts past Mistral's window (8).
SCENARIOS = [
    [(3, 1)],                                                                  # decodes of 1, 5, 8 sequences
    [(3, 1), (14, 1), (9, 1), (20, 1), (6, 1)],
    [(3, 1), (14, 1), (9, 1), (20, 1), (6, 1), (1, 1), (23, 1), (11, 1)],
    [(0, 7)],                                                                  # pure prefills
    [(0, 5), (0, 3), (0, 6)],                                                  # (all 14 rows' logits)
    [(0, 1)] * 4 + [(0, 2)] * 4,                                               # 8 requests: none padded
    [(0, 8)],                                                                  # no padding token
    [(7, 6)],                                                                  # a chunk over earlier context
    [(0, 4), (9, 1), (5, 3), (14, 1)],                                         # mixed
    [(3, 1)] * 7 + [(5, 2)],                                                   # mixed, 8 requests: none padded
    [(2, 5), (20, 1)],
]


# ============================================================================ MindSpore side
def stand_in_kernels(log: list | None):
    """An object with FusedKernels' factories whose kernels are plain MindSpore ops following each kernel's
    documented contract. With ``log`` (PyNative only): every call is checked against the contract and its kernel
    name appended to ``log``."""
    import mindspore as ms
    from mindspore import Parameter, nn, ops
    from ms_models.layers import PAGED_MASK_VALUE

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
            if value is not None:
                ops.scatter_nd_update(value_cache, idx, value)
            return key

    class PagedAttention(nn.Cell):
        """Sequence e reads keys 0..context_lens[e]-1 through block_tables[e]; without q_seq_lens one query per
        sequence, with q_seq_lens sequence e owns the next q_seq_lens[e] query rows, and attn_mask [T, >= max
        context] is added to the scores of each query row (the lookahead mask). mla_v_dim > 0: the values are the
        first mla_v_dim dims of each value row (MLA: the cache's latent), the output [T, heads, mla_v_dim]."""

        def __init__(self, heads, scale, kv_heads, mla_v_dim=0):
            super().__init__()
            self.heads, self.scale, self.kv_heads, self.mask_mode = heads, scale, kv_heads, "MASK_DEFAULT"
            self.mla_v_dim = mla_v_dim

        def construct(self, query, key_cache, value_cache, block_tables, context_lens, antiquant_scale=None,
                      antiquant_offset=None, attn_mask=None, q_seq_lens=None):
            T, H, D = query.shape
            bs, kvh = key_cache.shape[1], key_cache.shape[2]
            L = block_tables.shape[1] * bs
            if q_seq_lens is None:
                entry = ops.arange(0, T, 1, dtype=ms.int32)
            else:  # token t belongs to the first sequence whose cumulative query length exceeds t
                cum = ops.cumsum(q_seq_lens, 0)
                rows = ops.arange(0, T, 1, dtype=ms.int32).reshape(T, 1)
                entry = ops.cast(rows >= cum.reshape(1, -1), ms.int32).sum(-1)
            tables, ctx = ops.gather(block_tables, entry, 0), ops.gather(context_lens, entry, 0)
            k = ops.gather(key_cache, tables, 0).reshape(T, L, kvh, D).transpose(0, 2, 3, 1)          # [T,kvh,D,L]
            v = ops.gather(value_cache, tables, 0).reshape(T, L, kvh, D).transpose(0, 2, 1, 3)
            s = ops.matmul(query.reshape(T, kvh, H // kvh, D), k) * self.scale                        # [T,kvh,g,L]
            hidden = ops.arange(0, L, 1, dtype=ms.int32).reshape(1, L) >= ctx.reshape(T, 1)
            bias = ops.cast(hidden, s.dtype) * -1e30
            if attn_mask is not None:
                m = attn_mask[:, :L] if attn_mask.shape[1] >= L else ops.concat(
                    (attn_mask, ops.zeros((T, L - attn_mask.shape[1]), attn_mask.dtype)), 1)
                bias = bias + m
            p = ops.softmax(s + bias.reshape(T, 1, 1, L), -1)
            if self.mla_v_dim:
                return ops.matmul(p, v[..., :self.mla_v_dim]).reshape(T, H, self.mla_v_dim)
            return ops.matmul(p, v).reshape(T, H, D)

    class FlashAttentionScore(nn.Cell):
        """Layout TND: sequence b is query rows actual_seq_qlen[b-1]..actual_seq_qlen[b]-1 and key rows likewise
        by actual_seq_kvlen (cumulative); sparse_mode 3 (rightDownCausal): query i of a sequence of S1 queries sees
        its keys j <= i + S2 - S1 (what the compressed [2048, 2048] attn_mask encodes)."""

        def __init__(self, heads, scale, layout, sparse_mode, pre_tokens, next_tokens):
            super().__init__()
            self.heads, self.scale, self.layout = heads, scale, layout
            self.sparse_mode, self.pre_tokens, self.next_tokens = sparse_mode, pre_tokens, next_tokens

        def construct(self, query, key, value, real_shift, drop_mask, padding_mask, attn_mask, prefix,
                      actual_seq_qlen, actual_seq_kvlen):
            T1, N1, D = query.shape
            T2, N2 = key.shape[0], key.shape[1]
            g = N1 // N2

            def seqs(cum, n):
                rows = ops.arange(0, n, 1, dtype=ms.int64)
                idx = ops.cast(rows.reshape(n, 1) >= cum.reshape(1, -1), ms.int32).sum(-1)
                starts = ops.concat((ops.zeros((1,), ms.int64), cum[:-1]))
                return idx, rows - ops.gather(starts, idx, 0), ops.gather(cum - starts, idx, 0)

            iq, oq, lq = seqs(actual_seq_qlen, T1)
            ik, ok, lk = seqs(actual_seq_kvlen, T2)
            visible = ops.logical_and(iq.reshape(T1, 1) == ik.reshape(1, T2),
                                      ok.reshape(1, T2) <= oq.reshape(T1, 1) + lk.reshape(1, T2) - lq.reshape(T1, 1))
            k = ops.tile(key.reshape(T2, N2, 1, D), (1, 1, g, 1)).reshape(T2, N1, D)
            v = ops.tile(value.reshape(T2, N2, 1, D), (1, 1, g, 1)).reshape(T2, N1, D)
            s = ops.matmul(query.transpose(1, 0, 2), k.transpose(1, 2, 0)) * self.scale              # [N1,T1,T2]
            p = ops.softmax(s + ops.cast(ops.logical_not(visible), s.dtype).reshape(1, T1, T2) * -1e30, -1)
            out = ops.matmul(p, v.transpose(1, 0, 2)).transpose(1, 0, 2)                              # [T1,N1,D]
            stats = ops.zeros((T1, N1, 8), ms.float32)
            return stats, stats, ops.zeros((1,), query.dtype), out

    class MoeGatingTopKSoftmax(nn.Cell):
        """The k largest of softmax(x) per row, descending, their experts, and row_idx[t, j] = j * T + t."""

        def construct(self, x, finished=None, k=1):
            y, idx = ops.topk(ops.softmax(x, -1), k)
            T = x.shape[0]
            return y, ops.cast(idx, ms.int32), ops.arange(0, k * T, 1, dtype=ms.int32).reshape(k, T).transpose(1, 0)

    class MoeInitRoutingV2(nn.Cell):
        """Dropless: the T*k pairs p = t*k + j sorted by expert (stably), expanded_row_idx[p] = p's row among
        them, the cumulative rows per expert."""

        def construct(self, x, expert_idx, active_num, expert_capacity, expert_num, drop_pad_mode, count_flag,
                      before_flag):
            T, k = expert_idx.shape
            n = T * k
            flat = expert_idx.reshape(n)
            pairs = ops.arange(0, n, 1, dtype=ms.int32)
            order = ops.cast(ops.argsort(ops.cast(flat * n + pairs, ms.float32)), ms.int32)   # pairs by expert
            rows = ops.cast(ops.argsort(ops.cast(order, ms.float32)), ms.int32)               # its inverse
            counts = ops.cast(flat.reshape(n, 1) == ops.arange(0, expert_num, 1, dtype=ms.int32).reshape(1, -1),
                              ms.int32).sum(0)
            cumsum = ops.cumsum(counts, 0)
            return ops.gather(x, order // k, 0), rows, cumsum, counts

    class GroupedMatmul(nn.Cell):
        """split_item 3, group_type 0: rows group_list[e-1] .. group_list[e]-1 of x times weight[e]; rows past
        group_list[-1] (expert parallel) are undefined in the contract: NaN here."""

        def __init__(self, split_item, group_type):
            super().__init__()
            self.split_item, self.group_type = split_item, group_type

        def construct(self, x, weight, bias=None, scale=None, offset=None, antiquant_scale=None,
                      antiquant_offset=None, group_list=None):
            xs, w = x[0], weight[0]
            M = xs.shape[0]
            rows = ops.arange(0, M, 1, dtype=ms.int64).reshape(M, 1)
            expert = ops.cast(rows >= group_list.reshape(1, -1), ms.int32).sum(-1)
            past = expert >= w.shape[0]
            expert = ops.select(past, ops.zeros_like(expert), expert)
            y = ops.BatchMatMul()(xs.reshape(M, 1, -1), ops.gather(w, expert, 0)).reshape(M, -1)
            nan = ops.fill(y.dtype, y.shape, float("nan"))
            return (ops.select(ops.tile(past.reshape(M, 1), (1, y.shape[1])), nan, y),)

    class MoeTokenUnpermute(nn.Cell):
        """out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t*k + j]]."""

        def construct(self, permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
            T, k = probs.shape
            g = ops.gather(permuted_tokens, sorted_indices, 0).reshape(T, k, -1)
            return (g * probs.reshape(T, k, 1)).sum(1)

    def check_gating(x, finished=None, k=1):
        assert x.ndim == 2 and finished is None and 1 <= k <= x.shape[-1], (x.shape, k)

    def check_routing(x, expert_idx, active_num, expert_capacity, expert_num, drop_pad_mode, count_flag,
                      before_flag):
        e = expert_idx.asnumpy()
        assert x.ndim == 2 and expert_idx.dtype == ms.int32 and e.ndim == 2 and e.shape[0] == x.shape[0], e.shape
        assert (active_num, expert_capacity, drop_pad_mode, count_flag, before_flag) == (0, 0, 0, 1, False)
        assert e.min() >= 0 and e.max() < expert_num, (e.min(), e.max(), expert_num)    # dropless: every pair

    def check_gmm(cell, x, weight, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                  group_list=None):
        assert (cell.split_item, cell.group_type) == (3, 0) and len(x) == len(weight) == 1
        assert bias is None and scale is None and offset is None and antiquant_scale is None
        xs, w, g = x[0], weight[0], group_list.asnumpy()
        assert xs.ndim == 2 and w.ndim == 3 and w.shape[1] == xs.shape[1] and xs.dtype == w.dtype, (xs.shape, w.shape)
        assert group_list.dtype == ms.int64 and g.shape == (w.shape[0],), (group_list.dtype, g.shape)
        assert (np.diff(g, prepend=0) >= 0).all() and g[-1] <= xs.shape[0], g   # less: expert parallel

    def check_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        s, (T, k) = sorted_indices.asnumpy(), probs.shape
        assert sorted_indices.dtype == ms.int32 and not padded_mode and restore_shape is None
        assert permuted_tokens.shape[0] == T * k and sorted(s.tolist()) == list(range(T * k)), s
        assert probs.dtype == permuted_tokens.dtype

    def check_rms_norm(x, gamma):
        assert gamma.shape == (x.shape[-1],) and gamma.dtype == x.dtype, (x.shape, gamma.shape)

    def check_rope(x, cos, sin, mode):
        assert mode == 0 and x.ndim == 4 and x.shape[0] == 1, (x.shape, mode)          # BSND, rotate_half
        assert cos.shape == sin.shape == (1, x.shape[1], 1, x.shape[3]), (x.shape, cos.shape)
        assert cos.dtype == sin.dtype == x.dtype

    def check_write(key, value, key_cache, value_cache, slot_mapping):
        T, N, D = key.shape
        assert (value is None) == (value_cache is None), "a value without its cache"   # None: MLA's latent rows
        assert value is None or (value.shape == key.shape and key_cache.shape == value_cache.shape)
        assert isinstance(key_cache, Parameter) and (value is None or isinstance(value_cache, Parameter))  # in place
        assert key_cache.ndim == 4 and key_cache.shape[2:] == (N, D), (key.shape, key_cache.shape)
        assert key_cache.dtype == key.dtype and (value is None or value.dtype == key.dtype)
        s = slot_mapping.asnumpy()
        assert slot_mapping.dtype == ms.int32 and s.shape == (T,), (slot_mapping.dtype, s.shape)
        assert s.min() >= 0 and s.max() < key_cache.shape[0] * key_cache.shape[1], s

    def check_paged(cell, query, key_cache, value_cache, block_tables, context_lens, antiquant_scale=None,
                    antiquant_offset=None, attn_mask=None, q_seq_lens=None):
        T, H, D = query.shape
        assert H == cell.heads and key_cache.shape[2:] == (cell.kv_heads, D), (query.shape, key_cache.shape)
        assert query.dtype == key_cache.dtype == value_cache.dtype and cell.scale == 1.0  # q is pre-scaled
        assert antiquant_scale is None and antiquant_offset is None and cell.mask_mode == "MASK_DEFAULT"
        bt, cl = block_tables.asnumpy(), context_lens.asnumpy()
        B = bt.shape[0]
        assert block_tables.dtype == context_lens.dtype == ms.int32 and cl.shape == (B,), (bt.shape, cl.shape)
        assert bt.min() >= 0 and bt.max() < key_cache.shape[0], bt
        assert cl.min() >= 1 and cl.max() <= bt.shape[1] * key_cache.shape[1], cl
        assert (attn_mask is None) == (q_seq_lens is None), "query lengths and the mask come together"
        if cell.mla_v_dim:  # MLA: one latent row per token, the cache passed as key and value cache
            assert cell.kv_heads == 1 and value_cache.shape == key_cache.shape and 0 < cell.mla_v_dim < D
            assert value_cache.name == key_cache.name, (value_cache.name, key_cache.name)
        if q_seq_lens is None:
            assert B == T, (B, T)                                                    # one query per sequence
            return "paged_attention"
        ql, m = q_seq_lens.asnumpy(), attn_mask.asnumpy()
        assert q_seq_lens.dtype == ms.int32 and ql.shape == (B,) and ql.min() >= 0 and ql.sum() == T, ql
        assert (ql <= cl).all(), (ql, cl)                                # a sequence's queries are its last keys
        assert attn_mask.dtype == query.dtype and m.ndim == 2 and m.shape[0] == T and m.shape[1] >= cl.max()
        assert set(np.unique(m)) <= {0.0, PAGED_MASK_VALUE}, np.unique(m)
        seen = (m == 0)[:, :m.shape[1]] & (np.arange(m.shape[1])[None] < np.repeat(cl, ql)[:, None])
        assert seen.any(-1).all(), "a query row with every key of its context masked"
        return "paged_attention+q_seq_lens"

    def check_flash(cell, query, key, value, real_shift, drop_mask, padding_mask, attn_mask, prefix,
                    actual_seq_qlen, actual_seq_kvlen):
        assert cell.layout == "TND" and cell.scale == 1.0 and cell.sparse_mode == 3 and cell.next_tokens == 0
        assert real_shift is None and drop_mask is None and padding_mask is None and prefix is None
        T1, N1, D = query.shape
        T2, N2 = key.shape[0], key.shape[1]
        assert N1 == cell.heads and key.shape == value.shape == (T2, N2, D) and N1 % N2 == 0, (query.shape, key.shape)
        assert D % 16 == 0 and D <= 512 and query.dtype == key.dtype == value.dtype
        m = attn_mask.asnumpy()
        assert attn_mask.dtype == ms.uint8 and m.shape == (2048, 2048), (attn_mask.dtype, m.shape)
        assert (m == np.triu(np.ones((2048, 2048), np.uint8), 1)).all(), "not the compressed causal mask"
        cq, ck = actual_seq_qlen.asnumpy(), actual_seq_kvlen.asnumpy()
        assert actual_seq_qlen.dtype == actual_seq_kvlen.dtype == ms.int64 and cq.shape == ck.shape, (cq, ck)
        assert cq.ndim == 1 and 1 <= cq.size <= 1024 and cq[-1] == T1 and ck[-1] == T2, (cq, ck, T1, T2)
        lq, lk = np.diff(cq, prepend=0), np.diff(ck, prepend=0)
        assert lq.min() >= 1 and lk.min() >= 1 and (lq <= lk).all(), (lq, lk)     # non-decreasing, no empty keys
        assert cell.pre_tokens >= lq.max()
        return "flash_attention"

    class Checked(nn.Cell):
        """PyNative only: checks the call against the contract, logs the kernel's name, runs the stand-in."""

        def __init__(self, name, inner, check, with_cell=False):
            super().__init__()
            self.name, self.inner, self.check, self.with_cell = name, inner, check, with_cell

        def construct(self, *args):
            name = self.check(*((self.inner,) + args if self.with_cell else args))
            log.append(name or self.name)
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
        def paged_attention(num_heads, num_kv_heads, mla_v_dim=0):
            return wrap("paged_attention", PagedAttention(num_heads, 1.0, num_kv_heads, mla_v_dim), check_paged,
                        True)

        @staticmethod
        def flash_attention(num_heads):
            return wrap("flash_attention", FlashAttentionScore(num_heads, 1.0, "TND", 3, 2147483647, 0), check_flash,
                        True)

        @staticmethod
        def moe_gating_top_k_softmax():
            return wrap("moe_gating_top_k_softmax", MoeGatingTopKSoftmax(), check_gating)

        @staticmethod
        def moe_init_routing_v2():
            return wrap("moe_init_routing_v2", MoeInitRoutingV2(), check_routing)

        @staticmethod
        def grouped_matmul():
            return wrap("grouped_matmul", GroupedMatmul(3, 0), check_gmm, True)

        @staticmethod
        def moe_token_unpermute():
            return wrap("moe_token_unpermute", MoeTokenUnpermute(), check_unpermute)

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
        "flash_mask": [str(layer.flash_mask.dtype), list(layer.flash_mask.shape),
                       int(layer.flash_mask.asnumpy().astype(np.int64).sum())],
        "cache_shape": list(layer.k_cache.shape),
        "heads": [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim],
        "kv_bytes_per_block": [m.kv_cache_bytes_per_block(4), cpu_model.kv_cache_bytes_per_block(4)],
        "weight_bytes": [m.weight_bytes(), cpu_model.weight_bytes()],
        "config_dtype": cfg.dtype,
    }


def sparse_layer(model):
    """The first layer of ``model`` with routed experts."""
    return next(x for x in model.net.layers if getattr(x, "eg", None) is not None)


def expert_parallel_check(fused, checked) -> dict:
    """moe.fused_experts over a sparse layer's experts split as expert parallel over R = 2 and 4 ranks (rank r:
    experts r*E/R .. (r+1)*E/R - 1, ``first_expert`` r*E/R): {R: [max |sum of the ranks' parts - all experts'|,
    ranks whose part is all finite, ranks whose part is non-zero]}, for 7 and 16 tokens, with the stand-ins under
    contract checks (the grouped matmul's rows past a rank's experts are NaN) and as the jit model runs them."""
    from mindspore import Tensor
    from ms_models.moe import fused_experts

    rng = np.random.default_rng(4)
    layer = sparse_layer(checked)
    E, H = layer.num_experts, layer.eg.shape[1]
    out = {}
    for T in (7, 16):
        h = Tensor(rng.standard_normal((T, H)).astype(np.float32))
        logits = Tensor((rng.standard_normal((T, E)) * 2).astype(np.float32))
        for R in (2, 4):
            for name, model in (("checked", checked), ("fused", fused)):
                ly = sparse_layer(model)
                args = (ly.top_k, getattr(ly, "renorm", True), E, *ly.moe_ops)
                whole = fused_experts(h, logits, ly.eg, ly.eu, ly.ed, *args).asnumpy()
                n = E // R
                parts = [fused_experts(h, logits, ly.eg[r * n:(r + 1) * n], ly.eu[r * n:(r + 1) * n],
                                       ly.ed[r * n:(r + 1) * n], *args, r * n).asnumpy() for r in range(R)]
                out[f"{name} T={T} R={R}"] = [float(np.abs(sum(parts) - whole).max()),
                                              sum(bool(np.isfinite(p).all()) for p in parts),
                                              sum(bool(np.abs(p).max() > 0) for p in parts)]
    return out


def batches(rng, vocab: int) -> list:
    """One round of steps as (FlatBatch, kind): each request computes ``count`` tokens after ``start`` earlier
    ones, over blocks of its own (distinct within a step; earlier steps' keys, the same in every model's cache, are
    its context). Kinds: decode (every query length 1), prefill (every request from position 0), mixed."""
    from ms_models.batch import FlatBatch

    out = []
    for reqs in SCENARIOS:
        starts, counts = [r[0] for r in reqs], [r[1] for r in reqs]
        blocks = [int(b) for b in rng.permutation(NUM_BLOCKS)]
        tables = [[blocks.pop() for _ in range(-(-(s + c) // BLOCK_SIZE))] for s, c in reqs]
        tokens = [rng.integers(0, vocab, s + c).tolist() for s, c in reqs]
        T = sum(counts)
        batch = FlatBatch.build(tokens, starts, counts, tables, BLOCK_SIZE,
                                logits_indices=np.arange(T) if T == 14 else None)  # every row once (prompt logprobs)
        kind = "decode" if max(counts) == 1 else "prefill" if max(starts) == 0 else "mixed"
        out.append((batch, kind))
    return out


def ms_side(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    from ms_models import load_model, runtime
    from ms_models.layers import FusedKernels

    runtime.setup("cpu")
    result = {}
    for arch, model_dir in spec["models"].items():
        log: list = []
        cpu = load_model(model_dir, device="cpu")
        fused = load_model(model_dir, device="ascend", dtype="float32", kernels=stand_in_kernels(None))
        checked = load_model(model_dir, device="ascend", dtype="float32", kernels=stand_in_kernels(log),
                             use_jit=False)
        for m in (cpu, fused, checked):
            m.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE, max_num_seqs=MAX_SEQS, max_model_len=MAX_MODEL_LEN,
                                max_num_batched_tokens=MAX_TOKENS)
        rng = np.random.default_rng(1)
        diffs, calls = [], []
        for _ in range(ROUNDS):
            for batch, kind in batches(rng, cpu.config.vocab_size):
                ref = cpu.forward(batch)
                del log[:]
                got = [fused.forward(batch), checked.forward(batch)]
                assert ref.shape == got[0].shape == got[1].shape == (batch.logits_indices.size, cpu.config.vocab_size)
                diffs.append([float(np.abs(g - ref).max()) for g in got])
                calls.append({"tokens": batch.num_tokens, "reqs": batch.num_reqs, "kind": kind, "log": list(log),
                              "head_calls": -(-batch.logits_indices.size // checked.max_logits_rows)})
        cache_diff = 0.0
        for (ck, cv), (fk, fv), (hk, hv) in zip(cpu.kv_caches(), fused.kv_caches(), checked.kv_caches()):
            for c, f in ((ck, fk), (cv, fv), (ck, hk), (cv, hv)):
                assert c.shape == f.shape == (NUM_BLOCKS + 1, BLOCK_SIZE, cpu.config.num_kv_heads, cpu.config.head_dim)
                cache_diff = max(cache_diff, float(np.abs(c.asnumpy()[:NUM_BLOCKS] - f.asnumpy()[:NUM_BLOCKS]).max()))
        result[arch] = {"diffs": diffs, "calls": calls, "cache_diff": cache_diff,
                        "cache_abs_max": float(np.abs(cpu.kv_caches()[0][0].asnumpy()).max()),
                        "layers": cpu.config.num_layers, "qk_norm": bool(cpu.config.qk_norm),
                        "moe_layers": list(cpu.config.moe_layers), "mla": bool(cpu.config.kv_lora_rank),
                        "sliding_window": cpu.config.sliding_window,
                        "body_graphs": sorted([k[1], list(k[2])] for k in fused.compiled if k[0] == "body")}
        if arch == "llama":
            result["real"] = real_kernels_check(model_dir, cpu)
        if cpu.config.moe_layers:
            result[arch]["expert_parallel"] = expert_parallel_check(fused, checked)
        if arch == "qwen2_moe":  # MindSpore's own MoE primitives, built (not run) here
            layer = load_model(model_dir, device="ascend", dtype="bfloat16", kernels=FusedKernels()).net.layers[0]
            result["real_moe"] = [[type(op).__name__, [getattr(op, "split_item", None), getattr(op, "group_type", None)]]
                                  for op in layer.moe_ops]
        if arch == "deepseek_v3":  # MindSpore's own MLA kernels as vLLM-MindSpore calls them, built (not run) here
            m = load_model(model_dir, device="ascend", dtype="bfloat16", kernels=FusedKernels())
            m.allocate_kv_cache(8, 4)
            layer = m.net.layers[1]
            result["real_mla"] = {
                "prims": {name: [type(op).__name__, {k: (v if isinstance(v, (int, float, str)) else str(v))
                                                     for k, v in op.attrs.items()}]
                          for name, op in (("write", layer.write_op), ("paged", layer.paged_op),
                                           ("flash", layer.flash_op))},
                "moe": [type(op).__name__ for op in layer.moe_ops],
                "cache_shape": list(layer.k_cache.shape), "cache_dtype": str(layer.k_cache.dtype),
                "dims": [cpu.config.num_heads, cpu.config.kv_lora_rank, cpu.config.head_dim]}
    json.dump(result, open(spec["out"], "w"))


# ============================================================================ pytest side
def test_ascend_path_expert_parallel_over_two_ranks(tmp_path):
    """The fused path with --enable-expert-parallel over two tensor-parallel ranks (two processes, one MindSpore
    cluster, stand-in kernels): each rank holds 4 of the 8 experts whole, and the logits of every step of the
    scenarios equal the one-process fused model's (< 1e-4), the two ranks' bit for bit; Qwen2-MoE and DeepSeek-V3."""
    from conftest import ROOT, WORKER_PY, free_port
    from test_deepseek import _make as make_deepseek
    from test_moe import _make as make_moe

    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin", "GLOG_v": "3"}
    for arch, model in (("qwen2_moe", make_moe("qwen2_moe", 34, norm_topk_prob=True)),
                        ("deepseek_v3", make_deepseek("v3", 35, **MLA_DIMS))):
        path = tmp_path / arch
        model.save_pretrained(path)

        def side(rank, size, addr="-"):
            return subprocess.Popen([str(WORKER_PY), __file__, "ep-rank", str(path), str(rank), str(size), addr,
                                     str(tmp_path / f"{arch}_{size}_{rank}.json")], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        addr = f"127.0.0.1:{free_port()}"
        sched = subprocess.Popen([str(WORKER_PY), "-m", "ms_worker", "sched", "--dist-addr", addr, "--tp-size", "2"],
                                 cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            procs = [side(0, 1), side(0, 2, addr), side(1, 2, addr)]
            errs = [p.communicate(timeout=900)[1] for p in procs]
            assert all(p.returncode == 0 for p in procs), [e[-3000:] for e in errs]
        finally:
            sched.kill()
            sched.wait()
        ref, r0, r1 = (json.loads((tmp_path / f"{arch}_{n}_{r}.json").read_text()) for n, r in ((1, 0), (2, 0), (2, 1)))
        assert (ref["experts"], r0["experts"], r1["experts"]) == ([0, 8], [0, 4], [4, 4]), arch
        assert len(ref["logits"]) == ROUNDS * len(SCENARIOS) and r0["logits"] == r1["logits"], arch
        worst = max(float(np.abs(np.array(a) - np.array(b)).max()) for a, b in zip(ref["logits"], r0["logits"]))
        assert worst < ATOL, (arch, worst)


def test_ascend_path_with_contract_stand_ins_matches_cpu(tmp_path):
    from conftest import ROOT, WORKER_PY
    from test_models import _make_checkpoint
    from test_deepseek import _make as make_deepseek
    from test_moe import _make as make_moe

    models = {}
    for i, arch in enumerate(ARCHS):
        if arch == "deepseek_v3":
            m = make_deepseek("v3", 30 + i, **MLA_DIMS)
        else:
            m = make_moe(arch, 30 + i, norm_topk_prob=True) if arch.endswith("_moe") else _make_checkpoint(arch, 30 + i)
        m.save_pretrained(tmp_path / arch)
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
        # MLA layers: norms and RoPE as plain ops (gammas folded; mla.py), the attention kernels only
        norms_per_layer = 0 if a["mla"] else 4 if a["qk_norm"] else 2
        ropes = [] if a["mla"] else ["rope", "rope"]
        used = set()
        for c in a["calls"]:
            window = a["sliding_window"]
            attn = ("flash_attention" if c["kind"] == "prefill" and not window else
                    "paged_attention" if c["kind"] == "decode" and not window else "paged_attention+q_seq_lens")
            used.add(attn)
            log = c["log"]
            assert log.count("rms_norm") == norms_per_layer * L + c["head_calls"], (arch, c)   # + the final norm
            assert log.count("rope") == len(ropes) * L and log.count("reshape_and_cache") == L, (arch, c)
            assert log.count(attn) == L, (arch, c)
            assert len(log) == (norms_per_layer + len(ropes) + 2) * L + len(MOE_CALLS) * len(a["moe_layers"]) + \
                c["head_calls"]
            # per layer: q/k RoPE, the cache write, then the attention (after the write: PagedAttention reads this
            # step's keys from the cache); a sparse layer's experts: gating, routing, gate/up/down, unpermute
            per_layer = [x for x in log if x != "rms_norm"]
            want = [n for i in range(L) for n in ropes + ["reshape_and_cache", attn] +
                    (MOE_CALLS if i in a["moe_layers"] else [])]
            assert per_layer == want, (arch, c)
        assert {c["kind"] for c in a["calls"]} == {"decode", "prefill", "mixed"}, arch
        assert any(c["tokens"] > c["reqs"] for c in a["calls"]), arch                     # padded batches ran
        assert used == ({"paged_attention+q_seq_lens"} if a["sliding_window"] else
                        {"flash_attention", "paged_attention", "paged_attention+q_seq_lens"}), (arch, used)
        # one body graph per token bucket and kernel path (the None inputs differ)
        graphs = a["body_graphs"]
        assert len(graphs) == len({(T, tuple(n)) for T, n in graphs}), graphs
        assert len({tuple(n) for _, n in graphs}) == len(used), (arch, graphs)

    assert r["qwen2_moe"]["moe_layers"] == [0, 2] and r["deepseek_v3"]["moe_layers"] == [1, 2]
    for arch in ("qwen2_moe", "deepseek_v3"):   # expert parallel on the fused path: the ranks' parts add up
        ep = r[arch]["expert_parallel"]
        assert len(ep) == 8 and all(d < 1e-5 and finite == nonzero == int(k[-1]) for k, (d, finite, nonzero)
                                    in ep.items()), (arch, ep)
    mla = r["real_mla"]
    heads, latent, row = mla["dims"]
    assert [n for n, _ in mla["prims"].values()] == ["ReshapeAndCache", "PagedAttention", "FlashAttentionScore"]
    paged, flash = mla["prims"]["paged"][1], mla["prims"]["flash"][1]
    assert (paged["head_num"], paged["kv_head_num"], paged["mla_v_dim"], paged["scale_value"]) == (heads, 1, latent, 1.0)
    assert flash["head_num"] == heads and flash["input_layout"] == 4 and flash["sparse_mode"] == 3   # TND, causal
    assert mla["moe"] == ["MoeGatingTopKSoftmax", "MoeInitRoutingV2", "GroupedMatmul", "MoeTokenUnpermute"]
    assert mla["cache_shape"] == [8 + 1, 4, 1, row] and row == latent + MLA_DIMS["qk_rope_head_dim"]
    assert mla["cache_dtype"] == "BFloat16", mla
    assert [n for n, _ in r["real_moe"]] == ["MoeGatingTopKSoftmax", "MoeInitRoutingV2", "GroupedMatmul",
                                             "MoeTokenUnpermute"], r["real_moe"]
    assert r["real_moe"][2][1] == [3, 0], r["real_moe"]                  # GroupedMatmul: one tensor, grouped on M
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
    assert prims["flash"][1]["scale_value"] == 1.0 and prims["flash"][1]["input_layout"] == 4     # "TND"
    assert prims["flash"][1]["sparse_mode"] == 3 and prims["flash"][1]["next_tokens"] == 0
    assert prims["paged"][1]["mask_mode"] == 0                                                  # MASK_DEFAULT
    assert real["flash_mask"] == ["UInt8", [2048, 2048], 2048 * 2047 // 2]
    assert real["weight_dtypes"] == ["BFloat16"], real["weight_dtypes"]
    assert real["cache_shape"] == [8 + 1, 4, kv_heads, head_dim]             # vLLM's layout (+ scratch block)
    assert real["kv_bytes_per_block"][0] * 2 == real["kv_bytes_per_block"][1]
    assert 0.45 < real["weight_bytes"][0] / real["weight_bytes"][1] < 0.55     # bf16 (norms unfolded, no rotate_half)


def ep_rank_side(model_dir: str, rank: int, size: int, dist_addr: str, out: str) -> None:
    """The fused path with stand-ins as tensor-parallel rank ``rank`` of ``size`` with expert parallel (size 1: the
    whole model on one process, no collective): the logits of two rounds of ``batches`` and the rank's experts."""
    from ms_models import load_model, runtime

    if size > 1:
        runtime.setup("cpu", tp_rank=rank, tp_size=size, dist_addr=dist_addr, join_timeout_s=300)
    else:
        runtime.setup("cpu")
    m = load_model(model_dir, device="ascend", dtype="float32", kernels=stand_in_kernels(None), tp_rank=rank,
                   tp_size=size, expert_parallel=size > 1)
    m.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE, max_num_seqs=MAX_SEQS, max_model_len=MAX_MODEL_LEN,
                        max_num_batched_tokens=MAX_TOKENS)
    rng = np.random.default_rng(1)
    logits = [m.forward(b).tolist() for _ in range(ROUNDS) for b, _ in batches(rng, m.config.vocab_size)]
    layer = sparse_layer(m)
    json.dump({"logits": logits, "experts": [layer.first_expert, layer.eg.shape[0]]}, open(out, "w"))


if __name__ == "__main__":
    if sys.argv[1] == "ep-rank":
        ep_rank_side(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        ms_side(sys.argv[1])
