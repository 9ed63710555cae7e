"""The shared decoder-only transformer (pre-norm, RoPE, GQA, gated SiLU MLP) in MindSpore.

Llama, Mistral, Qwen2 and Qwen3 differ only in features that :class:`ModelConfig` spells
out (q/k/v and o biases, MLP biases, per-head q/k RMSNorm, a sliding window, tied
embeddings, RoPE scaling); each architecture's module (``llama.py``, ``qwen2.py``, ...)
checks its config and calls :func:`build_decoder`. A feature a model lacks costs nothing:
its weights are ``None`` and the branch is resolved when the graph is compiled.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .config import ModelConfig
from .batch import FlatBatch
from .lora import GROUPS, lora_input, lora_masks
from .layers import (DeviceOps, RotaryEmbedding, build_fused_attention_metadata, embedding, eps_tensor,
                     flash_causal_mask, fused_attention, fused_rotary, gate_up, gated_mlp, gather_logits, head_rms_norm,
                     lm_head, linear, linear_add, new_kv_cache, norm_gate_up, norm_qkv_linear, param_bytes, qkv_linear,
                     rms_norm, to_param, tp_all_reduce, vocab_parallel_embedding)

__all__ = ["DecoderLayer", "FusedDecoderLayer", "DecoderModel", "build_decoder", "read_linear", "read_vocab_rows"]


class DecoderLayer(nn.Cell):
    """One decoder layer; owns its weights and (after allocate_kv_cache) its K/V cache.

    ``w``: numpy weights, linear ones [in, out]; ``ln1``/``ln2``/biases/``qn``/``kn`` may be
    None (folded gammas / no bias / no q-k norm). ``qn``/``kn``: the q/k RMSNorm gammas
    (``qn`` already times the attention scale), tiled to [heads*hd] (fused norm: [hd]).
    ``dev.fused``: the fused kernels of ``dev.kernels`` in ``dev.dtype`` (see layers.DeviceOps).
    """

    def __init__(self, cfg: ModelConfig, w: dict, prefix: str, dev: DeviceOps):
        super().__init__(auto_prefix=False)
        self.prefix = prefix
        self.dev = dev  # the KV cache's layout and dtype
        self.eps = float(cfg.rms_norm_eps)
        self.eps_t = eps_tensor(self.eps)
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        a, m = prefix + ".self_attn.", prefix + ".mlp."

        def param(key, name):
            return to_param(w.get(key), name, dev.dtype)

        self.ln1 = param("ln1", prefix + ".input_layernorm.weight")
        self.ln2 = param("ln2", prefix + ".post_attention_layernorm.weight")
        self.wq, self.bq = param("wq", a + "q_proj.weight"), param("bq", a + "q_proj.bias")
        self.wk, self.bk = param("wk", a + "k_proj.weight"), param("bk", a + "k_proj.bias")
        self.wv, self.bv = param("wv", a + "v_proj.weight"), param("bv", a + "v_proj.bias")
        self.wo, self.bo = param("wo", a + "o_proj.weight"), param("bo", a + "o_proj.bias")
        self.qn, self.kn = param("qn", a + "q_norm.weight"), param("kn", a + "k_norm.weight")
        self.wg, self.bg = param("wg", m + "gate_proj.weight"), param("bg", m + "gate_proj.bias")
        self.wu, self.bu = param("wu", m + "up_proj.weight"), param("bu", m + "up_proj.bias")
        self.wd, self.bd = param("wd", m + "down_proj.weight"), param("bd", m + "down_proj.bias")
        if dev.fused:  # kernel instances (Primitives, or a test's stand-in Cells) are attributes of the graph
            kern = dev.kernels
            self.norm_op, self.rope_op = kern.rms_norm(self.eps), kern.rope()
            self.write_op = kern.reshape_and_cache()
            self.paged_op = kern.paged_attention(cfg.num_heads, cfg.num_kv_heads)
            self.flash_op = kern.flash_attention(cfg.num_heads)
            self.flash_mask = flash_causal_mask()  # a constant of the graph, shared by the layers
            self.attn_op = None
        else:
            self.norm_op = self.rope_op = self.write_op = self.paged_op = self.flash_op = self.flash_mask = None
            self.attn_op = dev.attention_kernel()
        # tensor parallel: o_proj and down_proj are row-parallel, their partial sums are all-reduced
        self.all_reduce = tp_all_reduce(dev.tp)
        for a_name in GROUPS:   # LoRA slots' stacked A (ms_models.lora.LoraSlots), when enabled
            setattr(self, a_name, None)
        self.k_cache = None
        self.v_cache = None

    def allocate_kv_cache(self, num_blocks: int, block_size: int, tag: str) -> None:
        self.k_cache, self.v_cache = new_kv_cache(self.num_kv_heads, num_blocks, block_size, self.head_dim,
                                                  f"{self.prefix}.self_attn.{tag}", self.dev)

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return 2 * self.num_kv_heads * block_size * self.head_dim * self.dev.itemsize

    def construct(self, x, cos_sin, slots, query_start_loc, seq_lens, block_tables, params, m1=None, m2=None,
                  m3=None):
        """The CPU path; inputs: DecoderModel's per-step inputs (DecoderModel.prepare_inputs). The attention
        kernel (ms_models.kernels) applies RoPE to q and k, writes k and v into the paged cache and attends.
        ``m1``/``m2``/``m3``: with LoRA slots, each token's slot columns for groups of one, two and three targets
        (ms_models.lora); None: LoRA off, no extra ops."""
        if m3 is None:
            q, k, v = norm_qkv_linear(x, self.eps, self.eps_t, self.ln1, self.wq, self.wk, self.wv, self.bq, self.bk,
                                      self.bv)
        else:
            h = lora_input(rms_norm(x, self.eps, self.ln1), self.la_qkv, m3)
            q, k, v = qkv_linear(h, self.wq, self.wk, self.wv, self.bq, self.bk, self.bv)
        if self.qn is not None:  # Qwen3: RMSNorm per head, before RoPE
            q = head_rms_norm(q, self.head_dim, self.eps, self.qn)
            k = head_rms_norm(k, self.head_dim, self.eps, self.kn)
        o = self.attn_op(q, k, v, self.k_cache, self.v_cache, cos_sin, slots, query_start_loc, seq_lens,
                         block_tables, params)
        x = self.residual(x, lora_input(o, self.la_o, m1), self.wo, self.bo)
        if m1 is None:
            a = norm_gate_up(x, self.eps, self.eps_t, self.ln2, self.wg, self.wu, self.bg, self.bu)
        else:
            a = gate_up(lora_input(rms_norm(x, self.eps, self.ln2), self.la_gu, m2), self.wg, self.wu, self.bg,
                        self.bu)
        return self.residual(x, lora_input(a, self.la_d, m1), self.wd, self.bd)

    def residual(self, x, h, w, b):
        """x + h @ w (+ b), the partial sums all-reduced first under tensor parallel."""
        if self.all_reduce is None:
            return linear_add(h, w, x, b)
        return x + self.all_reduce(linear(h, w, b))


class FusedDecoderLayer(DecoderLayer):
    """The layer on the fused (Ascend) path: RoPE, cache write and attention by MindSpore's fused kernels.
    Only the RoPE and attention lines differ from DecoderLayer's, but each construct takes its own explicit
    inputs and is written out whole: on MindSpore CPU a layer taking the per-step inputs as ``*args`` made the
    first compiled SmolLM2 graph ~20 MiB bigger, and helper methods shared by both ~6-12 MiB (measured)."""

    def construct(self, x, cos, sin, slots, block_tables, context_lens, q_seq_lens, attn_mask, actual_seq_lens):
        """Inputs: DecoderModel's per-step inputs (layers.build_fused_attention_metadata; the None ones select
        the kernel path)."""
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
        y = gated_mlp(h, self.wg, self.wu, self.wd, self.bg, self.bu, self.bd)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        return x + y


class DecoderModel(nn.Cell):
    """Whole network as two graphs (model.CausalLM): ``body`` (embedding -> decoder layers over the step's T
    tokens, returning the residual stream [T, hidden]) and ``head`` (the final norm and lm head over the rows
    whose logits are wanted, returning [S, vocab] float32).

    body inputs: input_ids [T] int32, then the per-step inputs every layer gets (prepare_inputs):
    cpu: cos_sin [T, hd] (cos and sin of each token's position, half width each), slots [T] int32 (-1 = padding),
    query_start_loc [R + 1], seq_lens [R], block_tables [R, M] int32, params [2] int32 = (requests, sliding
    window) (the ms_models.kernels contract);
    fused (Ascend): cos, sin [T, hd], then layers.build_fused_attention_metadata's (slots, block_tables,
    context_lens, q_seq_lens, attn_mask, actual_seq_lens), some None depending on the kernel path of the step.
    """

    def __init__(self, cfg: ModelConfig, embed, layers: list, norm: np.ndarray, lm_head_w, dev: DeviceOps):
        """``embed`` / ``lm_head_w``: numpy arrays or Parameters; ``lm_head_w=None``: tied."""
        super().__init__(auto_prefix=False)
        self.config = cfg
        self.eps = float(cfg.rms_norm_eps)
        self.fused = dev.fused
        self.norm_op = dev.kernels.rms_norm(self.eps) if dev.fused else None
        self.cast_logits = dev.dtype != ms.float32
        self.embed = to_param(embed, "model.embed_tokens.weight", dev.dtype)
        self.layers = nn.CellList(layers)
        self.norm = to_param(norm, "model.norm.weight", dev.dtype)
        # tied: the lm head multiplies by the embedding Parameter itself (no copy)
        self.lm_head = self.embed if lm_head_w is None else to_param(lm_head_w, "lm_head.weight", dev.dtype)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # tensor parallel (ms_models.parallel): ``cfg`` holds this rank's heads; split by vocabulary
        # (TensorParallel.vocab_parallel), the embedding and the lm head hold its rows [vocab_start, vocab_start + Vp),
        # zero-padded
        self.tp_size = dev.tp.size
        self.vocab_size = cfg.vocab_size
        self.vocab_start = dev.tp.vocab_range(cfg.vocab_size)[0]
        self.all_reduce = ops.AllReduce() if dev.tp.vocab_parallel else None
        self.all_gather = ops.AllGather() if dev.tp.vocab_parallel else None
        self.lora_cols = None   # with LoRA slots (ms_models.lora.LoraSlots): the slot of each stacked A column

    # ---- protocol used by model.CausalLM
    def cache_layers(self):
        return list(self.layers)

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in self.get_parameters():
            if id(p) in seen or p.name.endswith((".k_cache", ".v_cache")):
                continue
            seen.add(id(p))
            total += param_bytes(p)
        return total

    def prepare_inputs(self, batch: FlatBatch, num_blocks: int, block_size: int, num_reqs: int) -> tuple:
        """The body's inputs (numpy) for a padded batch whose first ``num_reqs`` requests are real."""
        cfg = self.config
        if self.fused:
            cos, sin = self.rope.cos_sin(batch.positions)
            return (batch.input_ids, cos, sin, *build_fused_attention_metadata(batch, num_blocks, block_size,
                                                                               num_reqs, cfg.sliding_window))
        params = np.array([num_reqs, cfg.sliding_window or 0], np.int32)
        step = (batch.input_ids, self.rope.cos_sin_half(batch.positions), batch.slot_mapping,
                batch.query_start_loc, batch.seq_lens, batch.block_tables, params)
        if self.lora_cols is None:
            return step
        return step + lora_masks(self.lora_cols, batch.lora_slots, batch.num_tokens)

    def body(self, input_ids, *step):
        if self.all_reduce is not None:
            x = vocab_parallel_embedding(input_ids, self.embed, self.vocab_start, self.all_reduce)
        else:
            x = embedding(input_ids, self.embed)
        for layer in self.layers:
            x = layer(x, *step)
        return x

    def head(self, x, rows):
        x = rms_norm(ops.gather(x, rows, 0), self.eps, self.norm, self.norm_op)
        if self.all_gather is not None:
            logits = gather_logits(lm_head(x, self.lm_head), self.all_gather, self.tp_size, self.vocab_size)
        else:
            logits = lm_head(x, self.lm_head)
        if self.cast_logits:
            logits = ops.cast(logits, ms.float32)
        return logits


def q_scale(cfg: ModelConfig) -> float:
    """The attention scale folded into q_proj (1 with a q norm, whose gamma takes it)."""
    return 1.0 if cfg.qk_norm else cfg.head_dim ** -0.5


def tp_spans(cfg: ModelConfig, tp) -> tuple:
    """(q_span, kv_span, mlp_span, local config) of tensor-parallel rank ``tp``: the [start, stop) output features
    of q, of k/v and of gate/up (o and down: their input features) it holds; spans None without tensor parallel.
    With fewer KV heads than ranks, the rank's one KV head is the one its query heads read (TensorParallel.kv_heads)."""
    if not tp.enabled:
        return None, None, None, cfg
    heads = cfg.num_heads // tp.size
    kv0, kvn = tp.kv_heads(cfg.num_kv_heads)
    hd = cfg.head_dim
    q_span = (tp.rank * heads * hd, (tp.rank + 1) * heads * hd)
    kv_span = (kv0 * hd, (kv0 + kvn) * hd)
    mlp_span = tp.split(cfg.intermediate_size)
    return q_span, kv_span, mlp_span, dataclasses.replace(cfg, intermediate_size=mlp_span[1] - mlp_span[0],
                                                          num_heads=heads, num_kv_heads=kvn)


def _read(weights, name, dim=None, span=None, pad_to=None):
    """The HF tensor ``name``, whole (``span`` None) or its [start, stop) slice along ``dim``."""
    if span is None:
        return weights.get(name)
    return weights.get(name, dim=dim, start=span[0], stop=span[1], pad_to=pad_to)


def read_linear(weights, tp, name, has_bias=False, gamma=None, mul=1.0, col=None, row=None) -> tuple:
    """(weight [in, out], bias or None) of the HF linear ``name`` for tensor-parallel rank ``tp``: col=(start,
    stop): its output features (column-parallel); row=: its input features (row-parallel: the bias is added once,
    by rank 0, before the all-reduce); neither: whole. ``gamma`` (a preceding norm's) scales the input rows,
    ``mul`` the weight and bias."""
    w = _read(weights, name + ".weight", 0, col) if col else _read(weights, name + ".weight", 1, row)
    w = np.ascontiguousarray(w.T)  # [in, out], a copy we own
    if gamma is not None:
        w *= gamma[:, None]
    if mul != 1.0:
        w *= np.float32(mul)
    b = None
    if has_bias and not (row and tp.rank != 0):
        b = _read(weights, name + ".bias", 0, col)
        if mul != 1.0:
            b *= np.float32(mul)
    return w, b


def read_vocab_rows(weights, tp, name: str, vocab_size: int, dtype):
    """The embedding or lm head ``name`` as a Parameter: whole, or split by vocabulary (TensorParallel.vocab_parallel)
    this rank's rows, zero-padded to ceil(vocab / size) (TensorParallel.vocab_range)."""
    vstart, vstop, vpad = tp.vocab_range(vocab_size)
    return to_param(_read(weights, name, 0, (vstart, vstop) if tp.vocab_parallel else None, vpad), name, dtype)


def build_decoder(cfg: ModelConfig, weights, dev: DeviceOps, sparse_layer=None) -> DecoderModel:
    """Builds a DecoderModel from HF-named weights (``weights.get(name)`` -> a fresh fp32 numpy
    array in HF layout, which this function may modify).

    Linear weights are transposed to [in, out]; the attention scale 1/sqrt(head_dim) is
    folded into q_proj (weight and bias), or with a q norm into its gamma; with
    ``dev.fold_norm`` (CPU) the input / post-attention RMSNorm gammas are folded into the
    q/k/v and gate/up weights. Weights are read layer by layer: the numpy temporaries of
    one layer are freed before the next is read.

    Tensor parallel (``dev.tp``, see ms_models.parallel): only this rank's shard of each weight
    is read (``weights.get(name, dim=, start=, stop=, pad_to=)``): q/k/v/gate/up split along
    their output (HF dim 0), o/down along their input (HF dim 1; a bias stays with rank 0),
    embedding and lm head by vocabulary rows (when vocab_parallel), zero-padded to ceil(vocab / size); the layers are
    built with this rank's heads, KV heads and intermediate size.

    ``sparse_layer(prefix, gamma)``: for the layers in ``cfg.moe_layers``, reads that layer's MLP weights
    (``gamma``: the post-attention norm's, to fold, or None) and returns (layer class, weights), replacing the
    dense MLP (ms_models.moe).
    """
    tp = dev.tp
    scale = cfg.head_dim ** -0.5
    q_mul = q_scale(cfg)
    q_span, kv_span, mlp_span, lcfg = tp_spans(cfg, tp)

    lin = functools.partial(read_linear, weights, tp)

    def head_gamma(name, heads, mul=1.0):
        g = weights.get(name)
        if mul != 1.0:
            g *= np.float32(mul)
        return g if dev.fused else np.tile(g, heads)  # fused kernel: per head [hd]

    # The embedding and lm head first, each turned into its Parameter at once: the transient numpy
    # copy of the largest tensors then comes before the layers' weights exist, so the peak stays
    # close to the final size (weights + one layer's numpy temporaries).
    embed = read_vocab_rows(weights, tp, "model.embed_tokens.weight", cfg.vocab_size, dev.dtype)
    lm_head_w = None if cfg.tie_word_embeddings else read_vocab_rows(weights, tp, "lm_head.weight", cfg.vocab_size,
                                                                     dev.dtype)
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        ln1 = weights.get(p + ".input_layernorm.weight")
        ln2 = weights.get(p + ".post_attention_layernorm.weight")
        g1, g2 = (ln1, ln2) if dev.fold_norm else (None, None)
        w = {"ln1": None if dev.fold_norm else ln1, "ln2": None if dev.fold_norm else ln2}
        w["wq"], w["bq"] = lin(p + ".self_attn.q_proj", cfg.attention_bias, g1, q_mul, col=q_span)
        w["wk"], w["bk"] = lin(p + ".self_attn.k_proj", cfg.attention_bias, g1, col=kv_span)
        w["wv"], w["bv"] = lin(p + ".self_attn.v_proj", cfg.attention_bias, g1, col=kv_span)
        w["wo"], w["bo"] = lin(p + ".self_attn.o_proj", cfg.o_bias, row=q_span)
        if cfg.qk_norm:
            w["qn"] = head_gamma(p + ".self_attn.q_norm.weight", lcfg.num_heads, scale)
            w["kn"] = head_gamma(p + ".self_attn.k_norm.weight", lcfg.num_kv_heads)
        cls = FusedDecoderLayer if dev.fused else DecoderLayer
        if sparse_layer is not None and i in cfg.moe_layers:
            cls, mlp = sparse_layer(p, g2)
            w.update(mlp)
        else:
            w["wg"], w["bg"] = lin(p + ".mlp.gate_proj", cfg.mlp_bias, g2, col=mlp_span)
            w["wu"], w["bu"] = lin(p + ".mlp.up_proj", cfg.mlp_bias, g2, col=mlp_span)
            w["wd"], w["bd"] = lin(p + ".mlp.down_proj", cfg.mlp_bias, row=mlp_span)
        # numpy temporaries freed layer by layer
        layers.append(cls(lcfg, w, p, dev))
    return DecoderModel(lcfg, embed, layers, weights.get("model.norm.weight"), lm_head_w, dev)
