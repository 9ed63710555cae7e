"""DeepSeek-V2/V3 decoder in MindSpore: multi-head latent attention (MLA) over a latent paged KV cache, dense MLPs
in the first first_k_dense_replace layers, routed + shared experts after them (deepseek_v2.py / deepseek_v3.py).

KV cache: one row per token of head_dim = kv_lora_rank + qk_rope_head_dim floats (one "KV head"), the normalised
latent c = RMSNorm(h @ W_DKV) followed by the rotated shared rope key k_pe, as vLLM sizes MLA caches
(MLAAttentionSpec). Attention is computed in the absorbed form for every token (prefill and decode alike): per
head the no-rope query is taken into latent space, q_lat = q_nope @ W_UK^T, so that
    score(t, s) = softmax_scale * (q_lat . c_s + q_pe . k_pe_s),   out_lat(t) = sum_s p(t, s) c_s,
and the value is out_lat @ W_UV. That is multi-query attention with H query heads of dim head_dim over one KV
head whose value is the key's first kv_lora_rank dims, so the paged attention kernel (ms_models.kernels) runs it
with the latent cache passed as both its K and V cache and the token's [c, k_pe] row as both its k and v (the
kernel writes the same row twice, in place), its own RoPE made the identity (cos 1, sin 0) since q_pe and k_pe
are rotated here, and the first kv_lora_rank dims of each output head kept.

Folded at load time: the input norm's gamma into q_a/q/kv_a projections, q_a_layernorm's into q_b, kv_a_layernorm's
into W_UK and W_UV (the cache holds the latent without it), softmax_scale (times YaRN's mscale^2 with
mscale_all_dim) into the query projections, routed_scaling_factor into the experts' down projections. RoPE of the
rope dims: HF DeepSeek-V2 and V3 (rope_interleave) rotate (x0, x1), (x2, x3) ... pairs; the q/k rope output
columns are permuted to halves (evens, then odds), which changes no dot product, and rotate_half is a second
weight (W @ ROT), so q_pe' = (x @ W) * cos + (x @ W ROT) * sin; cos/sin carry YaRN's attention factor, as HF's.

Routing (as HF's DeepseekV2TopkRouter / DeepseekV3TopkRouter): V2 softmax scores, top-k among all experts
(greedy) or among the topk_group groups of highest max score (group_limited_greedy), weights = scores, not
renormalised; V3 sigmoid scores, the choice by scores + e_score_correction_bias among the topk_group groups of
highest top-2 sum, weights = the scores of the chosen, renormalised when norm_topk_prob. The routers give a dense
weight matrix w [T, E] (zero for unchosen experts); the MoeFFN kernel (moe.py) then gets log(w) as its logits:
its softmax + top-k + renormalisation choose exactly the nonzero experts with weights w / sum(w), multiplied back
by sum(w) when the model does not renormalise.

On the fused (Ascend) path (FusedMlaDecoderLayer) the attention runs on MindSpore's kernels as vLLM-MindSpore runs
DeepSeek (contracts in layers.FusedKernels): ReshapeAndCache writes the token's [c, k_pe] row into the latent cache
(key only); a pure prefill (layers.build_fused_attention_metadata picks the kernel per step) expands per head,
k = [c @ W_UK^T, k_pe], v = c @ W_UV zero-padded to qk_nope + qk_rope dims, through FlashAttentionScore (TND, causal,
actual sequence lengths) on the step's own rows; every other step attends in the absorbed form through
PagedAttention with mla_v_dim = kv_lora_rank over the latent cache in place (one KV head, the cache as both key and
value cache), its output [T, H, kv_lora_rank] taken back through W_UV. Routers and norms are the CPU path's plain
ops (norm gammas folded likewise), the routed experts moe.fused_experts with the routers' log-weights as logits
(the same trick as the MoeFFN kernel's). Expert parallel is not built there.

Tensor parallel (ms_models.parallel): each rank holds H/N query heads (their q, W_UK, W_UV and o_proj rows) and
computes the shared latent and rope key itself, so the latent cache is replicated on every rank (as vLLM's MLA
cache); dense MLPs and shared experts split like Llama's, routed experts as moe.read_experts places them; the
o_proj and MLP outputs are partial sums added by one all-reduce each.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from mindspore import nn, ops

from .config import ModelConfig
from .decoder import DecoderModel, read_linear, read_vocab_rows
from .layers import (PAGED_MASK_VALUE, DeviceOps, RotaryEmbedding, build_fused_attention_metadata, expand_to,
                     flash_causal_mask, gated_mlp, linear, rms_norm, to_param, tp_all_reduce)
from .moe import QWEN_EXPERTS, RoutedExperts, fused_experts, read_experts
from .registry import UnsupportedModelError

__all__ = ["MlaDecoderLayer", "FusedMlaDecoderLayer", "MlaModel", "build_mla_decoder", "yarn_factors"]

_MIN_WEIGHT = 1e-30  # log() floor of the unchosen experts' zero weights: far below any chosen expert's
# MlaDecoderLayer's weights (build_mla_decoder's keys), absent ones None
_ATTN_WEIGHTS = ("wqa", "bqa", "wq_nope", "wq_pe", "wq_rot", "wc", "bc", "wk_pe", "bk_pe", "wk_rot", "bk_rot", "wuk",
                 "wuv", "wo", "bo")
_MLP_WEIGHTS = ("wg", "wu", "wd", "router", "score_bias", "eg", "eu", "ed", "sg", "su", "sd")


def yarn_factors(cfg: ModelConfig) -> tuple[float, float]:
    """(attention factor on cos/sin, multiplier of softmax_scale) of HF's YaRN for DeepSeek: the first is
    get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) (or attention_factor when given; without
    both mscales get_mscale(factor)), the second get_mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set."""
    s = cfg.rope_scaling
    if not s or s.get("rope_type") != "yarn":
        return 1.0, 1.0
    factor = s["factor"]

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if "attention_factor" in s:
        att = s["attention_factor"]
    elif s.get("mscale") and s.get("mscale_all_dim"):
        att = mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
    else:
        att = mscale()
    mul = mscale(s["mscale_all_dim"]) ** 2 if s.get("mscale_all_dim") else 1.0
    return float(att), float(mul)


def _rotate_half_matrix(n: int) -> np.ndarray:
    """ROT [n, n] with x @ ROT = rotate_half(x) = cat(-x2, x1)."""
    m, h = np.zeros((n, n), np.float32), n // 2
    m[np.arange(h) + h, np.arange(h)] = -1.0
    m[np.arange(h), np.arange(h) + h] = 1.0
    return m


def _deinterleave(n: int) -> np.ndarray:
    """Column order taking (x0, x1), (x2, x3) ... pairs to halves (x0, x2, ...; x1, x3, ...)."""
    return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def softmax_router(logits, k: int, n_group: int, topk_group: int):
    """DeepSeek-V2: dense weights [T, E] = softmax scores of the k chosen experts (greedy, or group-limited:
    among the topk_group groups of highest max score), zero elsewhere."""
    s = ops.softmax(logits, -1)
    if n_group:
        s = s * _group_mask(ops.max(s.reshape(s.shape[0], n_group, -1), -1)[0], topk_group, s.shape)
    return _keep_top(s, s, k)


def sigmoid_router(logits, bias, k: int, n_group: int, topk_group: int):
    """DeepSeek-V3: dense weights [T, E] = sigmoid scores of the k experts of highest score + bias among the
    topk_group groups of highest top-2 sum (of score + bias), zero elsewhere."""
    s = ops.sigmoid(logits)
    c = s + expand_to(bias.reshape(1, -1), s.shape)
    T, E = c.shape
    top2 = ops.topk(c.reshape(T, n_group, E // n_group), 2)[0]
    mask = _group_mask(ops.sum(top2, -1), topk_group, c.shape)
    return _keep_top(c * mask + (mask - 1.0) * 1e30, s, k)


def route(logits, score_bias, sigmoid: bool, k: int, n_group: int, topk_group: int):
    """The layer's router: sigmoid_router (V3) or softmax_router (V2)."""
    if sigmoid:
        return sigmoid_router(logits, score_bias, k, n_group, topk_group)
    return softmax_router(logits, k, n_group, topk_group)


def _group_mask(group_scores, topk_group: int, shape):
    """1.0 for the experts of the topk_group groups of highest score, 0.0 elsewhere; [T, E]."""
    T, G = group_scores.shape
    thr = ops.topk(group_scores, topk_group)[0][:, topk_group - 1:topk_group]
    keep = ops.cast(group_scores >= expand_to(thr, (T, G)), group_scores.dtype)
    return expand_to(keep.reshape(T, G, 1), (T, G, shape[1] // G)).reshape(shape)


def _keep_top(choice, weights, k: int):
    """``weights`` where ``choice`` is among its row's k largest, else 0."""
    thr = ops.topk(choice, k)[0][:, k - 1:k]
    return ops.select(choice >= expand_to(thr, choice.shape), weights, ops.zeros_like(weights))


class MlaDecoderLayer(nn.Cell):
    """One DeepSeek decoder layer (CPU path); owns its weights and its latent KV cache [num_blocks + 1, block_size,
    1, head_dim]. ``w``: numpy weights [in, out] (see build_mla_decoder); a layer in cfg.moe_layers has the
    router and experts, the others a dense MLP."""

    def __init__(self, cfg: ModelConfig, w: dict, prefix: str, dev: DeviceOps):
        super().__init__(auto_prefix=False)
        self.prefix, self.dev = prefix, dev
        self.eps = float(cfg.rms_norm_eps)
        self.H, self.Dc, self.D = cfg.num_heads, cfg.kv_lora_rank, cfg.head_dim
        self.dn, self.dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        a, m = prefix + ".self_attn.", prefix + ".mlp."
        for key in _ATTN_WEIGHTS:
            setattr(self, key, to_param(w.get(key), a + key, dev.dtype))
        for key in _MLP_WEIGHTS:
            setattr(self, key, to_param(w.get(key), m + key, dev.dtype))
        self.bmm = ops.BatchMatMul()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.sigmoid = cfg.routing == "sigmoid"
        self.renorm = cfg.norm_topk_prob
        self.num_experts, self.first_expert = cfg.num_experts, w.get("first_expert", 0)
        if dev.fused:
            kern = dev.kernels
            self.write_op = kern.reshape_and_cache()
            self.paged_op = kern.paged_attention(self.H, 1, self.Dc)
            self.flash_op = kern.flash_attention(self.H)
            self.flash_mask = flash_causal_mask()
            self.mm_tb, self.bmm_tb = ops.MatMul(transpose_b=True), ops.BatchMatMul(transpose_b=True)
            self.moe_ops = None if self.router is None else (
                kern.moe_gating_top_k_softmax(), kern.moe_init_routing_v2(), kern.grouped_matmul(),
                kern.moe_token_unpermute())
        else:
            self.attn_op = dev.attention_kernel()
            self.experts = (RoutedExperts(cfg.num_experts_per_tok, True, w.get("first_expert", 0), dev.tp)
                            if self.router is not None else None)
        self.all_reduce = tp_all_reduce(dev.tp)
        self.k_cache = None

    @property
    def v_cache(self):
        """The value cache is the latent cache itself."""
        return self.k_cache

    @v_cache.setter
    def v_cache(self, value):
        if value is not None:
            raise AttributeError("an MLA layer's value cache is its latent cache (k_cache)")

    def allocate_kv_cache(self, num_blocks: int, block_size: int, tag: str) -> None:
        shape = (num_blocks + 1, block_size, 1, self.D)
        self.k_cache = to_param(np.zeros(shape, np.float32), f"{self.prefix}.self_attn.{tag}.k_cache", self.dev.dtype)

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return block_size * self.D * self.dev.itemsize

    def _heads(self, x, n):
        """[T, H*n] -> [H, T, n]."""
        return x.reshape(x.shape[0], self.H, n).transpose(1, 0, 2)

    def construct(self, x, q_cos, q_sin, k_cos, k_sin, ident, slots, query_start_loc, seq_lens, block_tables,
                  params):
        T = x.shape[0]
        h = rms_norm(x, self.eps)
        qin = rms_norm(linear(h, self.wqa, self.bqa), self.eps) if self.wqa is not None else h
        q_lat = self.bmm(self._heads(linear(qin, self.wq_nope), self.dn), self.wuk).transpose(1, 0, 2)
        q_pe = linear(qin, self.wq_pe) * q_cos + linear(qin, self.wq_rot) * q_sin
        q = ops.concat((q_lat, q_pe.reshape(T, self.H, -1)), -1).reshape(T, self.H * self.D)
        c = rms_norm(linear(h, self.wc, self.bc), self.eps)
        k_pe = linear(h, self.wk_pe, self.bk_pe) * k_cos + linear(h, self.wk_rot, self.bk_rot) * k_sin
        kv = ops.concat((c, k_pe), -1)
        o = self.attn_op(q, kv, kv, self.k_cache, self.k_cache, ident, slots, query_start_loc, seq_lens,
                         block_tables, params)
        o_lat = o.reshape(T, self.H, self.D)[:, :, :self.Dc].transpose(1, 0, 2)
        o = self.bmm(o_lat, self.wuv).transpose(1, 0, 2).reshape(T, self.H * self.dv)
        return self._output_and_mlp(x, o, query_start_loc, params)

    def _output_and_mlp(self, x, o, query_start_loc, params):
        """The rest of the layer after attention's output ``o`` [T, H*dv]: o_proj (+ the all-reduce), the residual,
        the post-attention norm and the dense MLP, or the routed experts (_experts) plus the shared expert."""
        y = linear(o, self.wo, self.bo)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        x = x + y
        h = rms_norm(x, self.eps)
        if self.router is None:
            y = gated_mlp(h, self.wg, self.wu, self.wd)
            if self.all_reduce is not None:
                y = self.all_reduce(y)
            return x + y
        wts = route(linear(h, self.router), self.score_bias, self.sigmoid, self.top_k, self.n_group, self.topk_group)
        y = self._experts(h, ops.log(ops.maximum(wts, _MIN_WEIGHT)), query_start_loc, params)
        if not self.renorm:
            y = y * expand_to(ops.sum(wts, -1, keepdim=True), y.shape)
        if self.sg is not None:
            y = y + gated_mlp(h, self.sg, self.su, self.sd)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        return x + y

    def _experts(self, h, log_weights, query_start_loc, params):
        """This rank's routed experts' sum [T, H], weighted by w / sum(w) of the tokens' top-k weights w, given as
        ``log_weights`` [T, E] (route's weights, log of 0 clipped)."""
        return self.experts(h, log_weights, self.eg, self.eu, self.ed, query_start_loc, params)


class FusedMlaDecoderLayer(MlaDecoderLayer):
    """MlaDecoderLayer on the fused (Ascend) path (the module docstring); ``wuv`` is [H, dv, Dc] here (HF's kv_b_proj
    rows, as vLLM-MindSpore keeps them), W_UK [H, dn, Dc] as on the CPU path."""

    def construct(self, x, q_cos, q_sin, k_cos, k_sin, slots, block_tables, context_lens, q_seq_lens, attn_mask,
                  actual_seq_lens):
        """Inputs: MlaModel.prepare_inputs' fused ones (layers.build_fused_attention_metadata's; the None ones select
        the kernel path). Written out whole, as FusedDecoderLayer explains."""
        T, H, dt = x.shape[0], self.H, x.dtype
        h = rms_norm(x, self.eps)
        qin = rms_norm(linear(h, self.wqa, self.bqa), self.eps) if self.wqa is not None else h
        q_nope = linear(qin, self.wq_nope).reshape(T, H, self.dn)
        q_pe = linear(qin, self.wq_pe) * ops.cast(q_cos, dt) + linear(qin, self.wq_rot) * ops.cast(q_sin, dt)
        q_pe = q_pe.reshape(T, H, -1)
        c = rms_norm(linear(h, self.wc, self.bc), self.eps)
        k_pe = linear(h, self.wk_pe, self.bk_pe) * ops.cast(k_cos, dt) + \
            linear(h, self.wk_rot, self.bk_rot) * ops.cast(k_sin, dt)
        written = self.write_op(ops.concat((c, k_pe), -1).reshape(T, 1, self.D), None, self.k_cache, None, slots)
        q_nope = ops.depend(q_nope, written)  # the attention reads this step's rows from the cache
        if actual_seq_lens is not None:       # pure prefill: expanded heads, FlashAttentionScore on the step's rows
            R, dq = k_pe.shape[1], self.dn + k_pe.shape[1]
            k = ops.concat((self.mm_tb(c, self.wuk.reshape(H * self.dn, self.Dc)).reshape(T, H, self.dn),
                            ops.tile(k_pe.reshape(T, 1, R), (1, H, 1))), -1)
            v = self.mm_tb(c, self.wuv.reshape(H * self.dv, self.Dc)).reshape(T, H, self.dv)
            if self.dv < dq:
                v = ops.concat((v, ops.zeros((T, H, dq - self.dv), dt)), -1)
            pad = ops.zeros((actual_seq_lens.shape[0], H, dq), dt)  # rows of the padded requests (fused_attention)
            q = ops.concat((ops.concat((q_nope, q_pe), -1), pad), 0)
            o = self.flash_op(q, ops.concat((k, pad), 0), ops.concat((v, pad), 0), None, None, None, self.flash_mask,
                              None, actual_seq_lens, actual_seq_lens)[3]
            o = o[:T, :, :self.dv].reshape(T, H * self.dv)
        else:                                 # absorbed: PagedAttention over the latent cache in place
            q_lat = self.bmm(q_nope.transpose(1, 0, 2), self.wuk).transpose(1, 0, 2)
            mask = None if attn_mask is None else ops.cast(attn_mask, dt) * PAGED_MASK_VALUE
            o_lat = self.paged_op(ops.concat((q_lat, q_pe), -1), self.k_cache, self.k_cache, block_tables,
                                  context_lens, None, None, mask, q_seq_lens).reshape(T, H, self.Dc)
            o = self.bmm_tb(o_lat.transpose(1, 0, 2), self.wuv).transpose(1, 0, 2).reshape(T, H * self.dv)
        return self._output_and_mlp(x, o, None, None)

    def _experts(self, h, log_weights, query_start_loc, params):
        """The routed experts through the fused MoE kernels (fused_experts): the top-k softmax of the log-weights is
        w / sum(w); _output_and_mlp multiplies it back by sum(w) where the model does not renormalise."""
        return fused_experts(h, log_weights, self.eg, self.eu, self.ed, self.top_k, True, self.num_experts,
                             *self.moe_ops, self.first_expert)


class MlaModel(DecoderModel):
    """DecoderModel with MLA layers (``cfg``: this rank's heads). body inputs: input_ids [T], then q_cos, q_sin
    [T, H*rope] (each head's rope-dim cos/sin, YaRN's attention factor included), k_cos, k_sin [T, rope], ident
    [T, head_dim] (the attention kernel's identity RoPE: cos 1, sin 0), slots, query_start_loc, seq_lens,
    block_tables, params as DecoderModel's CPU path."""

    def __init__(self, cfg: ModelConfig, embed, layers: list, norm: np.ndarray, lm_head_w, dev: DeviceOps):
        super().__init__(cfg, embed, layers, norm, lm_head_w, dev)
        self.rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.rope_factor = np.float32(yarn_factors(cfg)[0])

    def prepare_inputs(self, batch, num_blocks: int, block_size: int, num_reqs: int) -> tuple:
        cfg = self.config
        cos, sin = self.rope.cos_sin(batch.positions)
        cos *= self.rope_factor
        sin *= self.rope_factor
        H = cfg.num_heads
        if self.fused:
            return (batch.input_ids, np.tile(cos, (1, H)), np.tile(sin, (1, H)), cos, sin,
                    *build_fused_attention_metadata(batch, num_blocks, block_size, num_reqs))
        ident = np.zeros((batch.num_tokens, cfg.head_dim), np.float32)
        ident[:, :cfg.head_dim // 2] = 1.0
        return (batch.input_ids, np.tile(cos, (1, H)), np.tile(sin, (1, H)), cos, sin, ident, batch.slot_mapping,
                batch.query_start_loc, batch.seq_lens, batch.block_tables, np.array([num_reqs, 0], np.int32))


def build_mla_decoder(cfg: ModelConfig, weights, dev: DeviceOps) -> MlaModel:
    """Reads a DeepSeek-V2/V3 checkpoint (HF names) into an MlaModel, folding as the module docstring says;
    under tensor parallel this rank's share only (``dev.tp``: heads h0 .. h0 + H - 1 of the model's)."""
    if dev.fused and dev.tp.dp_experts:
        raise UnsupportedModelError(f"{cfg.architecture}: experts over data-parallel engines run on the CPU path only")
    if dev.fused and ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) % 16 or cfg.v_head_dim > cfg.qk_nope_head_dim +
                      cfg.qk_rope_head_dim):
        raise UnsupportedModelError(
            f"{cfg.architecture} on the fused path: FlashAttentionScore's head dim qk_nope_head_dim + "
            f"qk_rope_head_dim = {cfg.qk_nope_head_dim + cfg.qk_rope_head_dim} must be a multiple of 16 and at least "
            f"v_head_dim {cfg.v_head_dim}")
    tp = dev.tp
    H, dn, R, dv, Dc = cfg.num_heads // tp.size, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, \
        cfg.kv_lora_rank
    h0 = tp.rank * H
    lcfg = dataclasses.replace(cfg, num_heads=H)
    scale = np.float32((dn + R) ** -0.5 * yarn_factors(cfg)[1])
    rot = _rotate_half_matrix(R)
    order = _deinterleave(R) if cfg.rope_interleave else np.arange(R)

    def lin(name, gamma=None, bias=False, col=None, row=None):
        return read_linear(weights, tp, name, bias, gamma, col=col, row=row)

    def rope_pair(w, b=None):
        """Columns [*, n*R] of rope dims in the checkpoint's order -> (halves order, its rotate_half) per head."""
        n = w.shape[1] // R
        w = w.reshape(-1, n, R)[:, :, order]
        wr = np.ascontiguousarray((w @ rot).reshape(-1, n * R))
        if b is None:
            return np.ascontiguousarray(w.reshape(-1, n * R)), wr, None, None
        b = b.reshape(n, R)[:, order]
        return np.ascontiguousarray(w.reshape(-1, n * R)), wr, b.reshape(-1), (b @ rot).reshape(-1)

    bias = cfg.attention_bias
    layers = []
    embed = read_vocab_rows(weights, tp, "model.embed_tokens.weight", cfg.vocab_size, dev.dtype)
    lm_head_w = None if cfg.tie_word_embeddings else read_vocab_rows(weights, tp, "lm_head.weight", cfg.vocab_size,
                                                                     dev.dtype)
    q_heads = (h0 * (dn + R), (h0 + H) * (dn + R))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a = p + ".self_attn."
        g1 = weights.get(p + ".input_layernorm.weight")
        g2 = weights.get(p + ".post_attention_layernorm.weight")
        w = {}
        if cfg.q_lora_rank:
            w["wqa"], w["bqa"] = lin(a + "q_a_proj", g1, bias)
            wq, _ = lin(a + "q_b_proj", weights.get(a + "q_a_layernorm.weight"), col=q_heads)
        else:
            wq, _ = lin(a + "q_proj", g1, col=q_heads)
        wq = wq.reshape(wq.shape[0], H, dn + R) * scale
        w["wq_nope"] = np.ascontiguousarray(wq[:, :, :dn].reshape(-1, H * dn))
        w["wq_pe"], w["wq_rot"], _, _ = rope_pair(wq[:, :, dn:].reshape(-1, H * R))
        del wq
        wkv, bkv = lin(a + "kv_a_proj_with_mqa", g1, bias)
        w["wc"] = np.ascontiguousarray(wkv[:, :Dc])
        w["bc"] = None if bkv is None else np.ascontiguousarray(bkv[:Dc])
        w["wk_pe"], w["wk_rot"], w["bk_pe"], w["bk_rot"] = rope_pair(wkv[:, Dc:], None if bkv is None else bkv[Dc:])
        gc = weights.get(a + "kv_a_layernorm.weight")
        kvb = weights.get(a + "kv_b_proj.weight", dim=0, start=h0 * (dn + dv), stop=(h0 + H) * (dn + dv))
        kvb = kvb.reshape(H, dn + dv, Dc)  # HF [out, in]
        w["wuk"] = np.ascontiguousarray(kvb[:, :dn, :] * gc[None, None, :])                     # [H, dn, Dc]
        if dev.fused:
            w["wuv"] = np.ascontiguousarray(kvb[:, dn:, :] * gc[None, None, :])                 # [H, dv, Dc]
        else:
            w["wuv"] = np.ascontiguousarray(kvb[:, dn:, :].transpose(0, 2, 1) * gc[None, :, None])  # [H, Dc, dv]
        del kvb
        w["wo"], w["bo"] = lin(a + "o_proj", None, bias, row=(h0 * dv, (h0 + H) * dv))
        if i in cfg.moe_layers:
            mlp = read_experts(weights, p, g2, cfg, QWEN_EXPERTS, tp)
            mlp["ed"] *= np.float32(cfg.routed_scaling_factor)
            w.update(mlp)
            if cfg.routing == "sigmoid":
                w["score_bias"] = weights.get(p + ".mlp.gate.e_score_correction_bias")
            if cfg.n_shared_experts:
                s = p + ".mlp.shared_experts."
                span = tp.split(cfg.n_shared_experts * cfg.moe_intermediate_size)
                w["sg"], _ = lin(s + "gate_proj", g2, col=span)
                w["su"], _ = lin(s + "up_proj", g2, col=span)
                w["sd"], _ = lin(s + "down_proj", row=span)
        else:
            span = tp.split(cfg.intermediate_size)
            w["wg"], _ = lin(p + ".mlp.gate_proj", g2, col=span)
            w["wu"], _ = lin(p + ".mlp.up_proj", g2, col=span)
            w["wd"], _ = lin(p + ".mlp.down_proj", row=span)
        layers.append((FusedMlaDecoderLayer if dev.fused else MlaDecoderLayer)(lcfg, w, p, dev))
    return MlaModel(lcfg, embed, layers, weights.get("model.norm.weight"), lm_head_w, dev)
