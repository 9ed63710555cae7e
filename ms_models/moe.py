"""Mixture-of-experts decoder layers on the flat token batch (the CPU path).

A sparse layer is the shared decoder's layer (attention unchanged) whose MLP is replaced by routed experts:
the post-attention normed hidden states ``h`` [T, H] and their router logits (one matmul) go through one custom
operator per layer (``ms_models.kernels.moe_ffn_op``, moe_ffn.cc) that routes each real token (softmax over the
router logits, top-k, optionally renormalised), counting-sorts the T x top_k (token, expert) pairs by expert into one
contiguous segment per expert, runs each expert's gate/up/down matmuls over its own segment only (experts no
token chose cost nothing; padding rows of the token bucket are not routed) and sums each token's top-k rows
with its routing weights. One op instead of a dozen MindSpore kernels (softmax, top-k, sort,
gathers, per-expert matmuls, scatter) matters on MindSpore CPU, where every kernel launch costs ~15 us and a
static graph cannot skip an expert's matmul when its segment is empty. Qwen2-MoE adds a dense shared expert
whose output is scaled by sigmoid(h @ shared_expert_gate) (plain ops, every token).

Weights come from HF checkpoints as transformers writes them: per expert (``{block}.experts.{e}.{gate,up,down}``
names, ``ExpertNames``) or fused (``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj``
[E, H, I], transformers 5's in-memory layout), stacked here to [E, H, I] / [E, I, H] ([in, out] per expert);
the post-attention norm's gamma is folded into the router, the experts' gate/up and the shared expert (its
gate included), as the dense builder folds it into gate/up. Tensor and expert parallel: ms_models.parallel (each
rank routes every token, computes its experts' part and the layer ends with one all-reduce).

On the fused (Ascend) path (FusedMoeDecoderLayer) the layer's attention is FusedDecoderLayer's and the experts run
through MindSpore's MoE kernels as vLLM-MindSpore calls them (fused_experts; contracts in layers.FusedKernels):
MoeGatingTopKSoftmax, MoeInitRoutingV2 (dropless: the T x top_k pairs sorted by expert), GroupedMatmul for gate,
up and down over each expert's rows, MoeTokenUnpermute (the weighted sum back to token order). There every row
of the token bucket is routed (padding rows included), and expert parallel is not built.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .config import ModelConfig
from .decoder import DecoderLayer, DecoderModel, build_decoder, read_linear
from .layers import (DeviceOps, expand_to, fused_attention, fused_rotary, gated_mlp, head_rms_norm, linear,
                     norm_qkv_linear, rms_norm, to_param)
from .registry import UnsupportedModelError

__all__ = ["ExpertNames", "QWEN_EXPERTS", "MIXTRAL_EXPERTS", "RoutedExperts", "MoeDecoderLayer", "FusedMoeDecoderLayer",
           "fused_experts", "read_experts", "build_moe_decoder"]


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """Where an architecture's checkpoint keeps a sparse layer's weights: ``{layer}.{block}.gate.weight`` (the
    router) and ``{layer}.{block}.experts.{e}.{gate|up|down}.weight``."""
    block: str
    gate: str
    up: str
    down: str


QWEN_EXPERTS = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERTS = ExpertNames("block_sparse_moe", "w1", "w3", "w2")


class RoutedExperts(nn.Cell):
    """The CPU path's routed experts: the MoeFFN kernel (ms_models.kernels.moe_ffn_op) over this rank's experts,
    ``top_k`` per token (renormalised if ``renorm``), the rank's first expert ``first_expert``. With the experts
    spread over data-parallel engines (TensorParallel.dp_experts) every engine's tokens meet here: each of an
    engine's N ranks gives its 1/N share of the engine's T rows (normed hidden states and router logits; ceil(T/N)
    rows, the last share zero-padded), the cluster gathers the shares (so every engine's rows once, in engine
    order), this rank's experts compute their part of all of them (every gathered row is routed, the engines' padding
    rows included), the parts are summed over the cluster and this engine's T rows kept; with tensor parallel in the
    engines only by its rank 0 (zeros on the others: the layer's tensor-parallel sum adds the engine's ranks,
    ms_models.parallel)."""

    def __init__(self, top_k: int, renorm: bool, first_expert: int, tp):
        super().__init__(auto_prefix=False)
        from .kernels import moe_ffn_op

        self.op = moe_ffn_op()
        self.cfg = Tensor(np.array([top_k, int(renorm), first_expert], np.int32))
        self.gather = ops.AllGather() if tp.dp_experts else None
        self.sum = ops.AllReduce() if tp.dp_experts else None
        self.share, self.shares = tp.rank, tp.size          # this rank's share of its engine's rows
        self.engine, self.engines = tp.dp_rank, tp.dp_size
        self.keep = Tensor(np.full((1, 1), tp.rank == 0, np.float32)) if tp.dp_experts and tp.enabled else None

    def construct(self, h, logits, eg, eu, ed, query_start_loc, params):
        if self.gather is None:
            return self.op(h, logits, eg, eu, ed, query_start_loc, params, self.cfg)
        T = h.shape[0]
        c = (T + self.shares - 1) // self.shares   # rows per share (the graph's shapes are static)
        per_engine = c * self.shares
        if per_engine > T:
            h = ops.concat((h, ops.zeros((per_engine - T, h.shape[1]), h.dtype)))
            logits = ops.concat((logits, ops.zeros((per_engine - T, logits.shape[1]), logits.dtype)))
        if self.shares > 1:
            h, logits = h[self.share * c:(self.share + 1) * c], logits[self.share * c:(self.share + 1) * c]
        rows = ops.concat((ops.zeros((1,), ms.int32), ops.full((1,), per_engine * self.engines, dtype=ms.int32)))
        one_request = ops.concat((ops.ones((1,), ms.int32), ops.zeros((1,), ms.int32)))  # (num_reqs, window)
        y = self.sum(self.op(self.gather(h), self.gather(logits), eg, eu, ed, rows, one_request, self.cfg))
        y = y[self.engine * per_engine:self.engine * per_engine + T]
        return y if self.keep is None else y * expand_to(self.keep, y.shape)


class MoeDecoderLayer(DecoderLayer):
    """A decoder layer whose MLP is routed experts (and optionally a gated shared expert). ``w``: DecoderLayer's
    attention weights plus ``router`` [H, E], this rank's experts ``first_expert`` .. + El: ``eg``/``eu`` [El, H, I],
    ``ed`` [El, I, H] (El = E, I its share of moe_intermediate_size, without expert parallel) and, for a shared
    expert, ``sg``/``su`` [H, Is], ``sd`` [Is, H], ``sgate`` [H, 1] (read_experts)."""

    def __init__(self, cfg: ModelConfig, w: dict, prefix: str, dev: DeviceOps):
        super().__init__(cfg, w, prefix, dev)
        m = prefix + ".mlp."
        self.router = to_param(w["router"], m + "gate.weight", dev.dtype)
        self.eg = to_param(w["eg"], m + "experts.gate_proj", dev.dtype)
        self.eu = to_param(w["eu"], m + "experts.up_proj", dev.dtype)
        self.ed = to_param(w["ed"], m + "experts.down_proj", dev.dtype)
        self.sg = to_param(w.get("sg"), m + "shared_expert.gate_proj.weight", dev.dtype)
        self.su = to_param(w.get("su"), m + "shared_expert.up_proj.weight", dev.dtype)
        self.sd = to_param(w.get("sd"), m + "shared_expert.down_proj.weight", dev.dtype)
        self.sgate = to_param(w.get("sgate"), m + "shared_expert_gate.weight", dev.dtype)
        if dev.fused:
            kern = dev.kernels
            self.moe_ops = (kern.moe_gating_top_k_softmax(), kern.moe_init_routing_v2(), kern.grouped_matmul(),
                            kern.moe_token_unpermute())
            self.top_k, self.renorm, self.num_experts = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.num_experts
            self.first_expert = w["first_expert"]
        else:
            self.experts = RoutedExperts(cfg.num_experts_per_tok, cfg.norm_topk_prob, w["first_expert"], dev.tp)

    def construct(self, x, cos_sin, slots, query_start_loc, seq_lens, block_tables, params):
        """DecoderLayer.construct with the MLP replaced (written out whole, as FusedDecoderLayer explains)."""
        q, k, v = norm_qkv_linear(x, self.eps, self.eps_t, self.ln1, self.wq, self.wk, self.wv, self.bq, self.bk,
                                  self.bv)
        if self.qn is not None:
            q = head_rms_norm(q, self.head_dim, self.eps, self.qn)
            k = head_rms_norm(k, self.head_dim, self.eps, self.kn)
        o = self.attn_op(q, k, v, self.k_cache, self.v_cache, cos_sin, slots, query_start_loc, seq_lens,
                         block_tables, params)
        x = self.residual(x, o, self.wo, self.bo)
        h = rms_norm(x, self.eps, self.ln2, self.norm_op)
        logits = linear(h, self.router)
        y = self.experts(h, logits, self.eg, self.eu, self.ed, query_start_loc, params)
        if self.sg is not None:
            s = gated_mlp(h, self.sg, self.su, self.sd)
            y = y + s * expand_to(ops.sigmoid(linear(h, self.sgate)), s.shape)
        if self.all_reduce is not None:  # tensor / expert parallel: each rank's partial sum of the experts
            y = self.all_reduce(y)
        return x + y


class FusedMoeDecoderLayer(MoeDecoderLayer):
    """MoeDecoderLayer on the fused (Ascend) path: FusedDecoderLayer's attention, fused_experts' MLP."""

    def construct(self, x, cos, sin, slots, block_tables, context_lens, q_seq_lens, attn_mask, actual_seq_lens):
        """FusedDecoderLayer.construct with the MLP replaced (written out whole, as FusedDecoderLayer explains)."""
        h = rms_norm(x, self.eps, self.ln1, self.norm_op)
        q = linear(h, self.wq, self.bq)
        k = linear(h, self.wk, self.bk)
        if self.qn is not None:
            q = head_rms_norm(q, self.head_dim, self.eps, self.qn, self.norm_op)
            k = head_rms_norm(k, self.head_dim, self.eps, self.kn, self.norm_op)
        v = linear(h, self.wv, self.bv)
        q = fused_rotary(q, cos, sin, self.rope_op, self.head_dim)
        k = fused_rotary(k, cos, sin, self.rope_op, self.head_dim)
        o = fused_attention(q, k, v, self.k_cache, self.v_cache, slots, block_tables, context_lens, q_seq_lens,
                            attn_mask, actual_seq_lens, self.flash_mask, self.write_op, self.paged_op, self.flash_op,
                            self.num_kv_heads, self.head_dim)
        y = linear(o, self.wo, self.bo)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        x = x + y
        h = rms_norm(x, self.eps, self.ln2, self.norm_op)
        y = fused_experts(h, linear(h, self.router), self.eg, self.eu, self.ed, self.top_k, self.renorm,
                          self.num_experts, *self.moe_ops, self.first_expert)
        if self.sg is not None:
            s = gated_mlp(h, self.sg, self.su, self.sd)
            y = y + s * expand_to(ops.sigmoid(linear(h, self.sgate)), s.shape)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        return x + y


def fused_experts(h, logits, eg, eu, ed, top_k: int, renorm: bool, num_experts: int, gating, routing, gmm, unpermute,
                  first_expert: int = 0):
    """The routed experts' output [T, H] for tokens ``h`` [T, H] with router ``logits`` [T, E] through the fused
    MoE kernels (layers.FusedKernels' contracts): top-k of the softmax (renormalised if ``renorm``), the pairs
    sorted by expert, each expert's gate/up/down over its rows, the weighted sum back in token order.

    Expert parallel (this rank holds El = eg.shape[0] < E experts from ``first_expert``; every rank has every token,
    as vLLM-MindSpore's tensor + expert parallel mode): the pairs of other ranks' experts get weight 0 and an
    expert id at or past El, so the sort puts them after the rank's own; the group list ends at the rank's last
    expert, so the grouped matmuls compute the rank's rows only, and the rows past it (undefined) are zeroed before
    the weighted sum. The layer's all-reduce adds the ranks' parts."""
    weights, experts, _ = gating(logits, None, top_k)
    if renorm:
        weights = weights / expand_to(ops.sum(weights, -1, keepdim=True), weights.shape)
    El = eg.shape[0]
    if El < num_experts:
        local = experts - first_expert
        other = ops.logical_or(local < 0, local >= El)
        experts = ops.select(other, ops.full_like(local, num_experts - 1), local)   # num_experts - 1 >= El
        weights = ops.select(other, ops.zeros_like(weights), weights)
    xs, rows, cumsum, _ = routing(h, experts, 0, 0, num_experts, 0, 1, False)
    groups = ops.cast(cumsum[:El], ms.int64)
    g = gmm([xs], [eg], None, None, None, None, None, groups)[0]
    u = gmm([xs], [eu], None, None, None, None, None, groups)[0]
    y = gmm([ops.silu(g) * u], [ed], None, None, None, None, None, groups)[0]
    if El < num_experts:
        mine = ops.cast(ops.arange(0, y.shape[0], 1, dtype=ms.int64) < groups[El - 1], y.dtype).reshape(-1, 1)
        y = ops.select(expand_to(mine, y.shape) > 0, y, ops.zeros_like(y))   # not a product: undefined may be NaN
    return unpermute(y, rows, ops.cast(weights, y.dtype))


def read_experts(weights, prefix: str, gamma, cfg: ModelConfig, names: ExpertNames, tp) -> dict:
    """A sparse layer's weights for MoeDecoderLayer (numpy, [in, out]), ``gamma`` (or None) folded in. ``cfg``: the
    whole model's config; ``tp``: this rank's place (parallel.TensorParallel): with expert parallel the experts
    ``tp.experts(E)`` whole, else every expert's ``tp.split(I)`` intermediate features; the shared expert split
    like a dense MLP, the router and the shared expert's gate whole."""
    b = f"{prefix}.{names.block}."
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    e0, e1 = tp.experts(E)
    i0, i1 = (0, I) if tp.expert_parallel else tp.split(I)
    router = np.ascontiguousarray(weights.get(b + "gate.weight").T)
    if weights.has(b + "experts.gate_up_proj"):  # fused: gate_up [E, 2I, H], down [E, H, I]
        gu = weights.get(b + "experts.gate_up_proj", dim=0, start=e0, stop=e1)
        if gu.shape != (e1 - e0, 2 * I, H):
            raise ValueError(f"weight {b}experts.gate_up_proj has shape {list(gu.shape)}, expected {[E, 2 * I, H]}")
        wg = np.ascontiguousarray(gu[:, i0:i1].transpose(0, 2, 1))
        wu = np.ascontiguousarray(gu[:, I + i0:I + i1].transpose(0, 2, 1))
        del gu
        wd = weights.get(b + "experts.down_proj", dim=0, start=e0, stop=e1)
        if wd.shape != (e1 - e0, H, I):
            raise ValueError(f"weight {b}experts.down_proj has shape {list(wd.shape)}, expected {[E, H, I]}")
        wd = np.ascontiguousarray(wd[:, :, i0:i1].transpose(0, 2, 1))
    else:
        n, w = e1 - e0, i1 - i0
        wg, wu, wd = np.empty((n, H, w), np.float32), np.empty((n, H, w), np.float32), np.empty((n, w, H), np.float32)
        for j, e in enumerate(range(e0, e1)):
            x = f"{b}experts.{e}."
            wg[j] = weights.get(x + names.gate + ".weight", dim=0, start=i0, stop=i1).T
            wu[j] = weights.get(x + names.up + ".weight", dim=0, start=i0, stop=i1).T
            wd[j] = weights.get(x + names.down + ".weight", dim=1, start=i0, stop=i1).T
    out = dict(router=router, eg=wg, eu=wu, ed=wd, first_expert=e0)
    if cfg.shared_expert_intermediate_size:
        s = b + "shared_expert."
        span = tp.split(cfg.shared_expert_intermediate_size)
        out.update(sg=read_linear(weights, tp, s + "gate_proj", col=span)[0],
                   su=read_linear(weights, tp, s + "up_proj", col=span)[0],
                   sd=read_linear(weights, tp, s + "down_proj", row=span)[0],
                   sgate=read_linear(weights, tp, b + "shared_expert_gate")[0])
    if gamma is not None:  # every consumer of the normed h: scale its input rows
        for key in ("router", "sg", "su", "sgate"):
            if key in out:
                out[key] *= gamma[:, None]
        wg *= gamma[None, :, None]
        wu *= gamma[None, :, None]
    return out


def build_moe_decoder(cfg: ModelConfig, weights, dev: DeviceOps, names: ExpertNames) -> DecoderModel:
    """build_decoder with the layers in ``cfg.moe_layers`` as MoeDecoderLayer (FusedMoeDecoderLayer on the fused
    path; the others dense)."""
    if dev.fused and dev.tp.dp_experts:
        raise UnsupportedModelError(f"{cfg.architecture}: experts over data-parallel engines run on the CPU path only")
    cls = FusedMoeDecoderLayer if dev.fused else MoeDecoderLayer
    return build_decoder(cfg, weights, dev, lambda prefix, gamma: (
        cls, read_experts(weights, prefix, gamma, cfg, names, dev.tp)))
