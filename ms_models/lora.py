"""LoRA in the flat batch: several adapters and the base model in one forward.

Each target linear of each layer holds every resident adapter stacked: A [in, L*R] and B [L*R, out] Parameters
(L slots of rank R = the largest rank; an adapter of rank r < R and a free slot are zero columns). A step gives
every token its slot (-1 = base) as one mask [T, L*R] with ones in the columns of the token's slot, and
    y = x @ W + ((x @ A) * mask) @ B
so one forward mixes base tokens and any of the L adapters with three ops per target and static shapes (the
shrink / expand of punica, with the per-token adapter index as a mask). The adapter's scale is folded into B, and
so is whatever the base weight folds (the RMSNorm gamma into A of q/k/v/gate/up on the CPU, the attention scale into
B of q). Loading an adapter into a slot rewrites that slot's columns in place (compiled graphs stay valid).
Tensor parallel: column-parallel targets (q, k, v, gate, up) hold B's columns of this rank's output features,
row-parallel ones (o, down) A's rows of its input features; their partial products join the layer's all-reduce.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

from .layers import linear, to_param

__all__ = ["TARGETS", "LoraSlots", "lora_linear", "target_shapes"]

# PEFT target module -> (module under the HF layer, tensor-parallel split, DecoderLayer's A / B attributes)
TARGETS = {
    "q_proj": ("self_attn", "col", "la_q", "lb_q"),
    "k_proj": ("self_attn", "col", "la_k", "lb_k"),
    "v_proj": ("self_attn", "col", "la_v", "lb_v"),
    "o_proj": ("self_attn", "row", "la_o", "lb_o"),
    "gate_proj": ("mlp", "col", "la_g", "lb_g"),
    "up_proj": ("mlp", "col", "la_u", "lb_u"),
    "down_proj": ("mlp", "row", "la_d", "lb_d"),
}


def lora_linear(x, w, b, la, lb, mask):
    """x @ w (+ b), plus each token's adapter: ((x @ la) * mask) @ lb; without a mask (LoRA off) just linear."""
    y = linear(x, w, b)
    if mask is not None:
        y = y + ops.matmul(ops.matmul(x, la) * mask, lb)
    return y


def target_shapes(cfg) -> dict:
    """target -> (in, out) of the whole (unsharded) weight: the shapes an adapter's A [r, in] and B [out, r] need."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


class LoraSlots:
    """The resident adapters of a CausalLM: ``max_loras`` slots of rank ``max_rank`` in every layer's targets."""

    def __init__(self, lm, max_loras: int, max_rank: int):
        from .decoder import DecoderLayer, q_scale, tp_spans
        from .loader import SafetensorsWeights

        cfg, net = lm.config, lm.net
        layers = list(net.layers)
        if cfg.moe_layers or getattr(net, "fused", False) or any(type(x) is not DecoderLayer for x in layers):
            raise ValueError(f"LoRA adapters are served for dense models on the CPU path; {cfg.architecture} "
                             f"on {lm.device} is not one")
        self.max_loras, self.max_rank = int(max_loras), int(max_rank)
        if self.max_loras < 1 or self.max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be positive (got {max_loras}, {max_rank})")
        self.layers = layers
        self.num_layers = cfg.num_layers
        self.shapes = target_shapes(cfg)
        dev = layers[0].dev
        q_span, kv_span, mlp_span, _ = tp_spans(cfg, dev.tp)
        self.spans = {"q_proj": q_span, "k_proj": kv_span, "v_proj": kv_span, "o_proj": q_span,
                      "gate_proj": mlp_span, "up_proj": mlp_span, "down_proj": mlp_span}
        self.q_mul = np.float32(q_scale(cfg))
        # the RMSNorm gammas the base weights fold (CPU): A of the targets after each norm takes them too
        self.gammas = [(None, None)] * cfg.num_layers
        if dev.fold_norm:
            src = SafetensorsWeights(lm.model_dir, progress=False)
            try:
                self.gammas = [(src.get(f"model.layers.{i}.input_layernorm.weight"),
                                src.get(f"model.layers.{i}.post_attention_layernorm.weight"))
                               for i in range(cfg.num_layers)]
            finally:
                src.close()
        cols = self.max_loras * self.max_rank
        for i, layer in enumerate(layers):
            for t, (_, split, a_name, b_name) in TARGETS.items():
                n_in, n_out = self._local_shape(t)
                setattr(layer, a_name, to_param(np.zeros((n_in, cols), np.float32), f"{layer.prefix}.lora.{a_name}"))
                setattr(layer, b_name, to_param(np.zeros((cols, n_out), np.float32), f"{layer.prefix}.lora.{b_name}"))
        # column j of the stacked A belongs to slot j // max_rank
        net.lora_cols = np.repeat(np.arange(self.max_loras, dtype=np.int32), self.max_rank)

    def _local_shape(self, target: str) -> tuple[int, int]:
        n_in, n_out = self.shapes[target]
        span = self.spans[target]
        if span is not None:
            if TARGETS[target][1] == "col":
                n_out = span[1] - span[0]
            else:
                n_in = span[1] - span[0]
        return n_in, n_out

    def weight_bytes(self) -> int:
        return 4 * self.max_loras * self.max_rank * self.num_layers * sum(
            sum(self._local_shape(t)) for t in TARGETS)

    def fold(self, layer: int, target: str, a: np.ndarray, b: np.ndarray, scale: float):
        """PEFT's A [r, in] and B [out, r] of one target -> this rank's (A' [in, r], B' [r, out]) with the scale
        and what the base weight folds applied, sharded like the base weight."""
        a_t = np.array(a.T, np.float32)
        b_t = np.array(b.T, np.float32) * np.float32(scale)
        module, split = TARGETS[target][:2]
        gamma = self.gammas[layer][0 if module == "self_attn" else 1]
        if gamma is not None and split == "col":      # after input_layernorm (q/k/v) or post_attention (gate/up)
            a_t *= gamma[:, None]
        if target == "q_proj":
            b_t *= self.q_mul
        span = self.spans[target]
        if span is not None:
            if split == "col":
                b_t = b_t[:, span[0]:span[1]]
            else:
                a_t = a_t[span[0]:span[1]]
        return a_t, b_t

    def write(self, slot: int, weights: dict) -> None:
        """Puts an adapter into ``slot``: ``weights[(layer, target)]`` = fold()'s (A', B'); the targets it lacks
        become zero there."""
        lo, hi = slot * self.max_rank, (slot + 1) * self.max_rank
        for i, layer in enumerate(self.layers):
            for t, (_, _, a_name, b_name) in TARGETS.items():
                pa, pb = getattr(layer, a_name), getattr(layer, b_name)
                a, b = pa.asnumpy(), pb.asnumpy()
                a[:, lo:hi] = 0.0
                b[lo:hi] = 0.0
                w = weights.get((i, t))
                if w is not None:
                    r = w[0].shape[1]
                    a[:, lo:lo + r] = w[0]
                    b[lo:lo + r] = w[1]
                ops.assign(pa, Tensor(a))   # in place: the compiled graphs hold these Parameters' memory
                ops.assign(pb, Tensor(b))


def lora_mask(lora_cols: np.ndarray, token_slots: np.ndarray | None, num_tokens: int) -> np.ndarray:
    """[T, L*R] float32: ones in the columns of each token's slot (none for -1, the base model)."""
    if token_slots is None:
        return np.zeros((num_tokens, lora_cols.size), np.float32)
    return (token_slots[:, None] == lora_cols[None, :]).astype(np.float32)
