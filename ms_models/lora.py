"""LoRA in the flat batch: several adapters and the base model in one forward.

The targets that share an input form a group (q/k/v on the attention norm's output, gate/up on the MLP norm's,
o, down). Each group holds every resident adapter's A stacked: A_g [in, n*L*R] (n targets, L slots of rank R =
the largest rank; an adapter of rank r < R and a free slot are zero columns). A step gives every token its slot
(-1 = base) as a mask with ones in the columns of the token's slot, and each group's input x becomes
    [x, (x @ A_g) * mask]
while each target's base weight W [in, out] becomes [W; B_t] with B_t [n*L*R, out] holding its own adapters' B
rows (zero rows in the other targets' columns). Then one matmul gives x @ W + ((x @ A_t) * mask) @ B_t: one
forward mixes base tokens and any of the L adapters with three extra ops per group (shrink, mask, concat) and
static shapes (punica's shrink / expand, the per-token adapter index as a mask; the expand rides on the base
matmul). The adapter's scale is folded into B, and so is whatever the base weight folds (the RMSNorm gamma into A
of q/k/v/gate/up on the CPU, the attention scale into B of q). Loading an adapter into a slot rewrites that slot's
columns and rows in place (compiled graphs stay valid).
Tensor parallel: column-parallel targets (q, k, v, gate, up) hold B's columns of this rank's output features,
row-parallel ones (o, down) A's rows of its input features and all of B; their partial products join the layer's
all-reduce ((sum of partial x @ A) @ B is what the all-reduce sums).
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

from .layers import to_param

__all__ = ["TARGETS", "GROUPS", "LoraSlots", "lora_input", "target_shapes", "lora_masks"]

# PEFT target module -> (module under the HF layer, tensor-parallel split, DecoderLayer's base weight attribute)
TARGETS = {
    "q_proj": ("self_attn", "col", "wq"),
    "k_proj": ("self_attn", "col", "wk"),
    "v_proj": ("self_attn", "col", "wv"),
    "o_proj": ("self_attn", "row", "wo"),
    "gate_proj": ("mlp", "col", "wg"),
    "up_proj": ("mlp", "col", "wu"),
    "down_proj": ("mlp", "row", "wd"),
}
# DecoderLayer's stacked-A attribute -> the targets that share its input, in column order
GROUPS = {"la_qkv": ("q_proj", "k_proj", "v_proj"), "la_o": ("o_proj",), "la_gu": ("gate_proj", "up_proj"),
          "la_d": ("down_proj",)}


def lora_input(x, la, mask):
    """[x, (x @ la) * mask]: a group's input widened by each token's adapter columns (LoRA off: x)."""
    if mask is None:
        return x
    return ops.concat((x, ops.matmul(x, la) * mask), -1)


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
        if getattr(net, "lora_cols", None) is not None:
            raise ValueError("LoRA slots exist already (the worker must restart to change --max-loras or "
                             "--max-lora-rank)")
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
        # target -> (its group's A attribute, its column offset in the group, the group's width)
        self.place = {t: (g, j * cols, len(ts) * cols) for g, ts in GROUPS.items() for j, t in enumerate(ts)}
        self.base_in = {}
        for layer in layers:
            for g, ts in GROUPS.items():
                n_in = self._local_shape(ts[0])[0]
                setattr(layer, g, to_param(np.zeros((n_in, len(ts) * cols), np.float32), f"{layer.prefix}.lora.{g}"))
            for t, (_, _, w_name) in TARGETS.items():
                w = getattr(layer, w_name)
                self.base_in[t] = w.shape[0]
                aug = np.concatenate([w.asnumpy(), np.zeros((self.place[t][2], w.shape[1]), np.float32)])
                setattr(layer, w_name, to_param(aug, w.name))   # [W; B rows of every slot]
        # column j of a group's stacked A belongs to slot (j % cols) // max_rank
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
        """The A and B of every slot (B rows of the other targets of a group, zeros, counted too)."""
        return 4 * self.num_layers * sum(self._local_shape(ts[0])[0] * len(ts) * self.max_loras * self.max_rank
                                         + sum(self._local_shape(t)[1] * self.place[t][2] for t in ts)
                                         for ts in GROUPS.values())

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
        become zero there. A's columns and B's rows are written in place."""
        R = self.max_rank
        for i, layer in enumerate(self.layers):
            for g, ts in GROUPS.items():
                pa = getattr(layer, g)
                a = pa.asnumpy()
                for t in ts:
                    w_name = TARGETS[t][2]
                    lo = self.place[t][1] + slot * R
                    b = np.zeros((R, self._local_shape(t)[1]), np.float32)
                    a[:, lo:lo + R] = 0.0
                    w = weights.get((i, t))
                    if w is not None:
                        r = w[0].shape[1]
                        a[:, lo:lo + r] = w[0]
                        b[:r] = w[1]
                    rows = np.arange(self.base_in[t] + lo, self.base_in[t] + lo + R, dtype=np.int32)[:, None]
                    ops.scatter_nd_update(getattr(layer, w_name), Tensor(rows), Tensor(b))
                ops.assign(pa, Tensor(a))   # in place: the compiled graphs hold these Parameters' memory


def lora_masks(lora_cols: np.ndarray, token_slots: np.ndarray | None, num_tokens: int) -> tuple:
    """(mask [T, L*R], its two- and three-fold tiles) float32: ones in the columns of each token's slot (none for
    -1, the base model), for groups of one, two and three targets."""
    if token_slots is None:
        m = np.zeros((num_tokens, lora_cols.size), np.float32)
    else:
        m = (token_slots[:, None] == lora_cols[None, :]).astype(np.float32)
    return m, np.tile(m, (1, 2)), np.tile(m, (1, 3))
