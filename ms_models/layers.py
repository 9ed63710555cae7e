"""Reusable MindSpore building blocks for decoder-only LLMs with a paged KV cache.

Written for MindSpore 2.10's CPU backend (see shared/notes/mindspore_cpu.md):

* fp32 only; plain ops (the RmsNorm, RoPE, FlashAttention, PagedAttention and
  ReshapeAndCache kernels do not exist on CPU);
* linear weights stored [in, out] and multiplied with ``ops.matmul`` (no per-call
  transpose); the lm head keeps the HF [vocab, hidden] layout with a
  ``MatMul(transpose_b=True)`` (measured as fast, and tied embeddings need no copy);
* per-step tensors (RoPE cos/sin, KV write indices, attention mask bias) are built once
  per step on the host at full shape and shared by all layers: MindSpore's broadcasting
  element-wise kernels and strided copies are slow on CPU;
* KV cache: one Parameter per layer for K and one for V, memory layout
  [kv_heads, num_blocks + 1, block_size, head_dim] held as 2-D rows
  [kv_heads * (num_blocks + 1) * block_size, head_dim]; row = (h * (num_blocks + 1) +
  block) * block_size + offset. Writes use ``ScatterUpdate`` on rows (in place, cost
  independent of the cache size: ``scatter_nd_update`` copies the whole cache on every
  call on CPU, ~5 ms per 25 MB); reads gather rows with host-computed indices
  [B, kv_heads, L] giving [B, kv_heads, L, head_dim] directly (for decode, the query
  [B, heads*hd] is then [B, kv_heads, group, hd] without a transpose). The extra last
  block is scratch: padding tokens write there and padding block-table entries read it.

The blocks are plain functions of tensors (weights included), called from an
architecture's layer Cell, which owns the Parameters. Functions, unlike nested Cells,
inline into one graph cheaply: a 30-layer model compiles in about half the time and
runs faster than the same model built from one Cell per linear/norm.
The device switch lives in one place: :class:`DeviceOps`. On Ascend the same model runs
MindSpore's fused kernels instead (:class:`FusedKernels`, :func:`fused_rotary`,
:func:`fused_attention`, :func:`build_fused_attention_metadata`) in bf16/fp16, with vLLM's
[blocks, block_size, kv_heads, head_dim] cache; everything above describes the CPU path.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

__all__ = [
    "MASK_VALUE", "DeviceOps", "to_param", "new_kv_cache", "param_bytes",
    "rms_norm", "head_rms_norm", "linear", "embedding", "lm_head", "vocab_parallel_embedding", "gather_logits",
    "apply_rotary", "gated_mlp", "paged_attention", "FusedKernels", "fused_rotary", "fused_attention",
    "build_fused_attention_metadata",
    "rope_inv_freq", "RotaryEmbedding", "build_attention_metadata",
]

# Additive attention-mask value: large but finite, so a row with every key masked
# (padding) gives a uniform softmax instead of NaN.
MASK_VALUE = -1e30

_bmm = ops.BatchMatMul()
_bmm_tb = ops.BatchMatMul(transpose_b=True)
_mm_tb = ops.MatMul(transpose_b=True)
_scatter_update = ops.ScatterUpdate()


class FusedKernels:
    """Factories of the MindSpore kernels the fused (Ascend) path calls, each returning a callable with the
    documented contract of MindSpore 2.10's primitive (none has a CPU kernel: tests pass an object with the same
    methods built from plain ops, tests/test_fused_path.py). The query is pre-scaled (1/sqrt(head_dim) folded
    into q_proj), hence scale 1.0.

    * ``rms_norm(eps)``: RmsNorm; ``(x [..., D], gamma [D]) -> (y, rstd)``.
    * ``rope()``: RotaryPositionEmbedding, mode 0 (rotate_half); ``(x [1, T, N, D], cos [1, T, 1, D], sin, 0)``
      (layout BSND) ``-> x'``.
    * ``reshape_and_cache()``: ReshapeAndCache; ``(key [T, N, D], value, key_cache [blocks, block_size, N, D],
      value_cache, slot_mapping [T] int32)``: writes token t at slot ``slot_mapping[t]`` of both caches in place.
    * ``paged_attention(heads, kv_heads)``: PagedAttention; ``(query [B, heads, D], key_cache, value_cache,
      block_tables [B, M] int32, context_lens [B] int32) -> [B, heads, D]``: one query per sequence over keys
      ``0..context_lens[b]-1`` read through its block table.
    * ``flash_attention(heads)``: FlashAttentionScore, layout BSH; ``(q [B, S1, heads*D], k [B, S2, kv_heads*D],
      v, None, None, None, attn_mask [B, 1, S1, S2] uint8: 1 = discard) -> (max, sum, _, out [B, S1, heads*D])``.
    """

    @staticmethod
    def rms_norm(eps):
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.RmsNorm(float(eps))

    @staticmethod
    def rope():
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.RotaryPositionEmbedding()

    @staticmethod
    def reshape_and_cache():
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.ReshapeAndCache()

    @staticmethod
    def paged_attention(num_heads, num_kv_heads):
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.PagedAttention(int(num_heads), 1.0, int(num_kv_heads))

    @staticmethod
    def flash_attention(num_heads):
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.FlashAttentionScore(int(num_heads), scale_value=1.0, input_layout="BSH")


_MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


class DeviceOps:
    """The single place where the device chooses kernels, dtype and KV-cache layout.

    cpu (what runs here): fp32; plain-op RMSNorm whose gamma the model builder folds into the following
    linear weights (``fold_norm``), RoPE as a rotate_half matmul, the KV cache as kv-head-major rows written
    with ``ScatterUpdate`` and attention as gathers + batched matmuls (paged_attention).
    ascend (``fused``): MindSpore's fused kernels (``kernels``, FusedKernels) in fp16/bf16 (default bf16):
    RmsNorm (gamma kept), RotaryPositionEmbedding, ReshapeAndCache into vLLM's [blocks, block_size,
    kv_heads, head_dim] cache, PagedAttention for decodes, FlashAttentionScore over the block-table gathered
    keys for prefills and sliding windows (fused_attention). No NPU exists here: tests run this path with
    plain-op stand-ins of the kernels' contracts (``kernels=``; fp32 is allowed only with such stand-ins).
    ``tp``: this process's tensor-parallel rank and size (ms_models.parallel.TensorParallel;
    default: one process holds the whole model).
    """

    def __init__(self, device: str = "cpu", tp=None, dtype: str | None = None, kernels=None):
        from .parallel import TensorParallel
        from .runtime import resolve_dtype

        device = str(device).lower()
        if device not in ("cpu", "ascend"):
            raise ValueError(f"unsupported device {device!r} (expected 'cpu' or 'ascend')")
        self.device = device
        self.fused = device == "ascend"
        self.dtype_name = resolve_dtype(device, dtype, stand_ins=kernels is not None)
        self.dtype = _MS_DTYPES[self.dtype_name]
        self.kernels = (kernels or FusedKernels()) if self.fused else None
        self.fold_norm = not self.fused
        self.tp = tp if tp is not None else TensorParallel()

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == ms.float32 else 2


def to_param(arr, name: str, dtype=None):
    """numpy array -> non-trainable Parameter, fp32 or ``dtype`` (one copy; ``name`` must be unique in
    the graph). ``None`` and Parameters pass through (optional weights such as biases)."""
    if arr is None or isinstance(arr, Parameter):
        return arr
    a = np.ascontiguousarray(arr, dtype=np.float32)
    t = ms.from_numpy(a) if dtype in (None, ms.float32) else Tensor(a, dtype)
    return Parameter(t, name=name, requires_grad=False)


def new_kv_cache(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int, name: str, dev=None):
    """(k, v) zero cache Parameters; the last block (``num_blocks``) is scratch for padding tokens.
    cpu: [kv_heads * (num_blocks + 1) * block_size, head_dim] rows (= [kv_heads, num_blocks + 1,
    block_size, head_dim] in memory); fused (``dev.fused``): [num_blocks + 1, block_size, kv_heads, head_dim]
    in ``dev.dtype`` (the layout of ReshapeAndCache / PagedAttention)."""
    if dev is not None and dev.fused:
        shape, dtype = (num_blocks + 1, block_size, num_kv_heads, head_dim), dev.dtype
    else:
        shape, dtype = (num_kv_heads * (num_blocks + 1) * block_size, head_dim), None
    return (to_param(np.zeros(shape, np.float32), name + ".k_cache", dtype),
            to_param(np.zeros(shape, np.float32), name + ".v_cache", dtype))


def param_bytes(p) -> int:
    return int(np.prod(p.shape)) * (4 if p.dtype == ms.float32 else 2) if p is not None else 0


# ----------------------------------------------------------------------------- graph functions
def expand_to(t, shape):
    """``t`` tiled to ``shape`` (same rank; its size-1 dims repeated), for an element-wise op.

    MindSpore's CPU broadcasting binary kernels (``[T, D] * [T, 1]``, ``[T, D] * [D]``) keep
    about two output-sized buffers of their own for as long as the compiled graph lives, one
    set per graph (per bucket shape): 0.5 MiB per token of a bucket for SmolLM2's norms alone.
    A Tile output is an ordinary intermediate, freed and reused within the step, and from a
    few tokens up Tile + a same-shape kernel is also faster than the broadcasting kernel."""
    return ops.tile(t, tuple(s // d for s, d in zip(shape, t.shape)))


def rms_norm(x, eps, weight=None, fused=None):
    """x / sqrt(mean(x^2) + eps) [* weight]; ``weight=None``: gamma folded elsewhere.
    ``fused``: the RmsNorm kernel (FusedKernels.rms_norm(eps)), with ``weight``."""
    if fused is not None:
        return fused(x, weight)[0]
    y = x * expand_to(ops.rsqrt(ops.mean(x * x, -1, True) + eps), x.shape)
    if weight is not None:
        y = y * expand_to(weight.reshape((1,) * (x.ndim - 1) + weight.shape), x.shape)
    return y


def head_rms_norm(x, head_dim, eps, weight, fused=None):
    """RMSNorm over each head of x [T, n*hd] (Qwen3's q/k norm). ``weight``: the gamma tiled
    to [n*hd] (plain ops), or [hd] for the fused kernel ``fused``."""
    T, D = x.shape
    if fused is not None:
        return fused(x.reshape(T * (D // head_dim), head_dim), weight)[0].reshape(T, D)
    x3 = x.reshape(T, D // head_dim, head_dim)
    y = x3 * expand_to(ops.rsqrt(ops.mean(x3 * x3, -1, True) + eps), x3.shape)
    return y.reshape(T, D) * expand_to(weight.reshape(1, D), (T, D))


def linear(x, weight, bias=None):
    """x @ weight (+ bias); weight stored [in, out]."""
    y = ops.matmul(x, weight)
    if bias is not None:
        y = y + bias
    return y


def embedding(ids, table):
    """Token lookup; table [vocab, hidden]."""
    return ops.gather(table, ids, 0)


def lm_head(x, table):
    """x @ table^T with table [vocab, hidden] (HF layout; the embedding when tied)."""
    return _mm_tb(x, table)


def vocab_parallel_embedding(ids, table, start, all_reduce):
    """Tensor parallel (ms_models.parallel): token lookup in this rank's vocabulary rows ``table``
    [Vp, hidden] (global ids start..start+Vp-1); other ids give zeros, and the AllReduce sums the
    ranks' rows into the full embedding."""
    local = ids - start
    inside = ops.logical_and(local >= 0, local < table.shape[0])
    local = ops.select(inside, local, ops.zeros_like(local))
    return all_reduce(ops.gather(table, local, 0) * ops.expand_dims(ops.cast(inside, table.dtype), -1))


def gather_logits(local, all_gather, size, vocab):
    """Tensor parallel: this rank's logits [B, Vp] -> every rank's, [B, vocab]. AllGather stacks the
    ranks on dim 0 ([size*B, Vp], rank-major), reordered to [B, size*Vp] and cut to ``vocab``
    (the padding rows) when size*Vp > vocab. Every rank gets the same bytes."""
    B, vp = local.shape
    full = all_gather(local).reshape(size, B, vp).transpose(1, 0, 2).reshape(B, size * vp)
    if size * vp != vocab:
        full = full[:, :vocab]
    return full


def gated_mlp(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
    """down(silu(gate(x)) * up(x)); separate gate/up matmuls (no slicing of a fused output)."""
    return linear(ops.silu(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up), w_down, b_down)


def apply_rotary(x, cos, sin, rot, head_dim):
    """Neox RoPE on x [T, n*hd]: x*cos + rotate_half(x)*sin, with cos/sin given full shape
    [T, n*hd] and rotate_half as a small [hd, hd] matmul (``rot``), since slice + cat are
    slow strided copies on MindSpore CPU."""
    xr = ops.matmul(x.reshape(-1, head_dim), rot).reshape(x.shape)
    return x * cos + xr * sin


def paged_attention(q, k, v, k_cache, v_cache, write_rows, read_rows, attn_bias, q_perm, o_perm, num_kv_heads,
                    head_dim):
    """Writes this step's K/V into the paged cache, then attends over the cache.

    q [T, heads*hd] (RoPE'd and pre-scaled by 1/sqrt(hd)), k/v [T, kv_heads*hd], T = B*Q.
    write_rows [T, kv_heads]: cache row of each new token's K/V per kv head;
    read_rows [B, kv_heads, L]: cache rows of each request's key positions 0..L-1 (through
    its block table); attn_bias [B, kv_heads, Q*group, L] additive mask; q_perm / o_perm: the
    row orders that take q to kv-head-major and the output back (see
    build_attention_metadata). GQA: query head h uses kv head h // group.
    Returns [T, heads*hd].

    With Q > 1 the two layout changes are row gathers, not transposes: MindSpore's CPU
    Transpose keeps output-sized buffers for the life of each compiled graph (0.3 MiB per
    token of a prefill bucket for SmolLM2) and is slower than gathering rows of g*hd floats.
    """
    kvh, hd = num_kv_heads, head_dim
    T = q.shape[0]
    B = read_rows.shape[0]
    Q = T // B
    g = q.shape[1] // (kvh * hd)
    _scatter_update(k_cache, write_rows, k.reshape(T, kvh, hd))
    _scatter_update(v_cache, write_rows, v.reshape(T, kvh, hd))
    kk = ops.gather(k_cache, read_rows, 0)  # [B, kvh, L, hd]
    vv = ops.gather(v_cache, read_rows, 0)
    if Q == 1:  # decode: [B, heads*hd] is already [B, kvh, group, hd] (static shape: no transpose)
        qq = q.reshape(B, kvh, g, hd)
    else:
        qq = ops.gather(q.reshape(T * kvh, g * hd), q_perm, 0).reshape(B, kvh, Q * g, hd)
    p = ops.softmax(_bmm_tb(qq, kk) + attn_bias, -1)
    o = _bmm(p, vv)  # [B, kvh, Q*g, hd]
    if Q == 1:
        return o.reshape(T, kvh * g * hd)
    return ops.gather(o.reshape(B * kvh * Q, g * hd), o_perm, 0).reshape(T, kvh * g * hd)


def fused_rotary(x, cos, sin, rope, head_dim):
    """Neox RoPE on x [T, n*hd] with the fused kernel ``rope`` (FusedKernels.rope), layout BSND:
    x as [1, T, n, hd], cos/sin [T, hd] as [1, T, 1, hd] (no transpose, cos/sin not tiled per head)."""
    T, D = x.shape
    c = ops.cast(cos, x.dtype).reshape(1, T, 1, head_dim)
    s = ops.cast(sin, x.dtype).reshape(1, T, 1, head_dim)
    return rope(x.reshape(1, T, D // head_dim, head_dim), c, s, 0).reshape(T, D)


def fused_attention(q, k, v, k_cache, v_cache, slots, block_tables, context_lens, attn_mask, write, paged, flash,
                    num_kv_heads, head_dim):
    """The fused path of paged_attention: ``write`` (ReshapeAndCache) puts this step's K/V at ``slots`` [T] of
    the caches [blocks + 1, block_size, kv_heads, hd]; then a decode batch (``context_lens`` [B] given, Q == 1)
    runs ``paged`` (PagedAttention) over its block tables [B, M]; otherwise (prefill, chunked prefill, sliding
    window) the keys 0..M*block_size-1 of each sequence are gathered through its block table ([B, L,
    kv_heads*hd]: whole blocks, a reshape and no transpose) and ``flash`` (FlashAttentionScore, BSH) runs with
    ``attn_mask`` [B, 1, Q, L] (1 = discard). q [T, heads*hd] pre-scaled; returns [T, heads*hd]."""
    T, D = q.shape
    B, M = block_tables.shape
    kvh, hd = num_kv_heads, head_dim
    # the attention must read the cache after this write: ops.depend orders it explicitly (the caches are
    # Parameters, which MindSpore's side-effect tracking orders too; vLLM-MindSpore, whose caches are graph
    # inputs, does the same)
    q = ops.depend(q, write(k.reshape(T, kvh, hd), v.reshape(T, kvh, hd), k_cache, v_cache, slots))
    if context_lens is not None:
        return paged(q.reshape(T, D // hd, hd), k_cache, v_cache, block_tables, context_lens).reshape(T, D)
    L = M * k_cache.shape[1]
    kk = ops.gather(k_cache, block_tables, 0).reshape(B, L, kvh * hd)
    vv = ops.gather(v_cache, block_tables, 0).reshape(B, L, kvh * hd)
    return flash(q.reshape(B, T // B, D), kk, vv, None, None, None, attn_mask)[3].reshape(T, D)


# ----------------------------------------------------------------------------- host side (numpy)
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float64), with HF "linear" / "llama3" scaling."""
    inv = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return np.where(medium, smoothed, out)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding:
    """Host side of neox-style RoPE (rotate_half): per-token cos/sin in numpy."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        self.head_dim = head_dim
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)

    def cos_sin(self, positions: np.ndarray):
        """positions [T] -> cos, sin [T, head_dim] float32."""
        f = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        f = np.concatenate([f, f], -1)
        return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)

    @staticmethod
    def full_shape(cos: np.ndarray, sin: np.ndarray, num_heads: int):
        """[T, hd] -> [T, num_heads*hd] (the layout of a projection's output)."""
        return np.tile(cos, (1, num_heads)), np.tile(sin, (1, num_heads))

    @staticmethod
    def rotate_half_matrix(head_dim: int) -> np.ndarray:
        """R with x @ R == rotate_half(x) == cat(-x2, x1)."""
        h = head_dim // 2
        r = np.zeros((head_dim, head_dim), np.float32)
        r[np.arange(h) + h, np.arange(h)] = -1.0
        r[np.arange(h), np.arange(h) + h] = 1.0
        return r


def build_attention_metadata(positions: np.ndarray, slot_mapping: np.ndarray, block_tables: np.ndarray,
                             num_blocks: int, block_size: int, num_kv_heads: int, group: int,
                             sliding_window: int | None = None):
    """Per-step attention inputs, shared by all layers (numpy, padded shapes).

    positions, slot_mapping: [B, Q] (slot -1 = padding token); block_tables [B, M] (-1 = padding).
    Cache rows (see new_kv_cache): row(h, block, off) = (h * (num_blocks + 1) + block) *
    block_size + off. Returns
      write_rows [B*Q, kvh] int32: where each token's K/V goes (padding tokens -> the
        scratch block ``num_blocks``);
      read_rows [B, kvh, M*block_size] int32: the rows of key positions 0..L-1 of each
        request (padding table entries -> scratch);
      bias [B, kvh, Q*group, M*block_size] float32 additive mask: query (b, q) sees key j
        iff j <= positions[b, q] (and, with ``sliding_window`` W, j > positions[b, q] - W);
      q_perm [B*kvh*Q] int32: for each (b, h, q), the row (b*Q + q)*kvh + h of q viewed as
        [T*kvh, group*hd] (token-major -> kv-head-major);
      o_perm [B*Q*kvh] int32: for each (b, q, h), the row (b*kvh + h)*Q + q of the attention
        output viewed as [B*kvh*Q, group*hd] (back to token-major).
    Decode (Q == 1) needs no reordering: q_perm and o_perm are then None, since a graph input
    that the graph does not use makes a MindSpore CPU graph markedly slower (+60% measured on
    a 1,200-kernel graph), while None is a compile-time constant.
    """
    B, Q = positions.shape
    M = block_tables.shape[1]
    T, L = B * Q, M * block_size
    heads = np.arange(num_kv_heads, dtype=np.int64) * (num_blocks + 1)
    s = slot_mapping.reshape(T).astype(np.int64)
    real = s >= 0
    blk = np.where(real, s // block_size, num_blocks)
    off = np.where(real, s % block_size, np.arange(T) % block_size)
    write_rows = ((heads[None, :] + blk[:, None]) * block_size + off[:, None]).astype(np.int32)
    bt = np.where(block_tables >= 0, block_tables, num_blocks).astype(np.int64)  # [B, M]
    read_rows = ((heads[None, :, None] + bt[:, None, :]) * block_size)[..., None] + np.arange(block_size)
    read_rows = read_rows.reshape(B, num_kv_heads, L).astype(np.int32)
    keys, pos = np.arange(L, dtype=np.int64)[None, None, :], positions.astype(np.int64)[:, :, None]
    allowed = keys <= pos
    if sliding_window:
        allowed &= keys > pos - int(sliding_window)
    bias = np.where(allowed, np.float32(0.0), np.float32(MASK_VALUE)).astype(np.float32)  # [B, Q, L]
    bias = np.broadcast_to(bias[:, None, :, None, :], (B, num_kv_heads, Q, group, L)).reshape(
        B, num_kv_heads, Q * group, L)
    if Q == 1:
        return write_rows, read_rows, np.ascontiguousarray(bias), None, None
    rows = np.arange(T * num_kv_heads, dtype=np.int32)
    q_perm = rows.reshape(B, Q, num_kv_heads).transpose(0, 2, 1).reshape(-1)
    o_perm = rows.reshape(B, num_kv_heads, Q).transpose(0, 2, 1).reshape(-1)
    return write_rows, read_rows, np.ascontiguousarray(bias), q_perm, o_perm


def build_fused_attention_metadata(positions: np.ndarray, slot_mapping: np.ndarray, block_tables: np.ndarray,
                                   num_blocks: int, block_size: int, sliding_window: int | None = None):
    """Per-step inputs of fused_attention (numpy, padded shapes; arguments as build_attention_metadata's).
    Returns
      slots [B*Q] int32: each token's cache slot (block * block_size + offset); padding tokens -> the scratch
        block ``num_blocks``;
      block_tables [B, M] int32, padding entries -> the scratch block;
      context_lens [B] int32 = position + 1 for a decode batch (Q == 1, no sliding window: PagedAttention),
        else None;
      attn_mask [B, 1, Q, M*block_size] uint8 (1 = key j hidden from query (b, q): j > positions[b, q], or out
        of the sliding window) when context_lens is None, else None.
    Padding tokens sit at position 0 and see key 0 (of their sequence, or the scratch block), so no row of the
    softmax is all masked."""
    B, Q = positions.shape
    T, L = B * Q, block_tables.shape[1] * block_size
    s = slot_mapping.reshape(T).astype(np.int64)
    slots = np.where(s >= 0, s, num_blocks * block_size + np.arange(T) % block_size).astype(np.int32)
    bt = np.where(block_tables >= 0, block_tables, num_blocks).astype(np.int32)
    if Q == 1 and not sliding_window:
        return slots, bt, (positions[:, 0].astype(np.int64) + 1).astype(np.int32), None
    keys, pos = np.arange(L, dtype=np.int64)[None, None, :], positions.astype(np.int64)[:, :, None]
    hidden = keys > pos
    if sliding_window:
        hidden |= keys <= pos - int(sliding_window)
    return slots, bt, None, np.ascontiguousarray(hidden[:, None].astype(np.uint8))
