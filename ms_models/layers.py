"""Reusable MindSpore building blocks for decoder-only LLMs with a paged KV cache.

Written for MindSpore 2.10's CPU backend (see shared/notes/mindspore_cpu.md):

* fp32 only; plain ops (the RmsNorm, RoPE, FlashAttention, PagedAttention and
  ReshapeAndCache kernels do not exist on CPU);
* linear weights stored [in, out] and multiplied with ``ops.matmul`` (no per-call
  transpose), or, in graphs of at most 8 token rows (decode), with the SmallMatMul kernel
  (ms_models.kernels; MindSpore's MatMul runs so few rows on one thread); the lm head keeps the HF
  [vocab, hidden] layout with a ``MatMul(transpose_b=True)`` (measured as fast, and tied embeddings need
  no copy), or the kernel's transposed form for few rows;
* attention is one custom operator per layer (ms_models.kernels, C++ through ``ops.Custom``):
  RoPE on q and k, the K/V write into the paged cache and causal attention over each
  request's blocks, for the whole flat token batch of a step; its per-step inputs (cos/sin,
  slots, query start offsets, sequence lengths, block tables) are built once on the host and
  shared by all layers;
* KV cache: one Parameter per layer for K and one for V, [num_blocks + 1, block_size,
  kv_heads, head_dim] (vLLM's layout) on both devices; the extra last block is scratch
  (padding tokens write there on the fused path; the CPU kernel skips them).

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
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

__all__ = [
    "MASK_VALUE", "DeviceOps", "tp_all_reduce", "EngineSum", "to_param", "new_kv_cache", "param_bytes",
    "rms_norm", "head_rms_norm", "linear", "embedding", "lm_head", "vocab_parallel_embedding", "gather_logits",
    "gated_mlp", "gate_up", "qkv_linear", "norm_gate_up", "norm_qkv_linear", "linear_add", "eps_tensor",
    "FusedKernels", "fused_rotary", "fused_attention", "build_fused_attention_metadata",
    "flash_causal_mask", "FLASH_MAX_SEQS", "PAGED_MASK_VALUE",
    "rope_inv_freq", "RotaryEmbedding",
]

# Additive attention-mask value: large but finite, so a row with every key masked
# (padding) gives a uniform softmax instead of NaN.
MASK_VALUE = -1e30

_mm_tb = ops.MatMul(transpose_b=True)


class FusedKernels:
    """Factories of the MindSpore kernels the fused (Ascend) path calls, each returning a callable with the
    documented contract of MindSpore 2.10's primitive (none has a CPU kernel: tests pass an object with the same
    methods built from plain ops, tests/test_fused_path.py). The query is pre-scaled (1/sqrt(head_dim) folded
    into q_proj), hence scale 1.0. T: the step's (padded) token count; contracts as fused_attention uses them:

    * ``rms_norm(eps)``: RmsNorm; ``(x [..., D], gamma [D]) -> (y, rstd)``.
    * ``rope()``: RotaryPositionEmbedding, mode 0 (rotate_half); ``(x [1, T, N, D], cos [1, T, 1, D], sin, 0)``
      (layout BSND) ``-> x'``.
    * ``reshape_and_cache()``: ReshapeAndCache; ``(key [T, N, D], value, key_cache [blocks, block_size, N, D],
      value_cache, slot_mapping [T] int32)``: writes token t at slot ``slot_mapping[t]`` of both caches in place;
      value and value_cache None (optional in the contract): the key cache only (MLA's latent rows).
    * ``paged_attention(heads, kv_heads)``: PagedAttention (gen_ops_prim.PagedAttention's docstring), mask_mode
      MASK_DEFAULT; ``(query [T, heads, D], key_cache, value_cache, block_tables [B, M] int32, context_lens [B]
      int32, antiquant_scale=None, antiquant_offset=None, attn_mask, q_seq_lens) -> [T, heads, D]``. Sequence b
      reads keys ``0..context_lens[b]-1`` through its block table. Without ``q_seq_lens`` (and ``attn_mask``):
      one query per sequence (B == T, decode). With ``q_seq_lens`` [B] int32 ("the query length of each
      sequence"): sequence b owns the next ``q_seq_lens[b]`` query rows and ``attn_mask`` [T, >= max context]
      ("the lookahead mask", one row per query token over key positions, additive, in the query's dtype:
      0 / -10000 as vLLM-MindSpore builds it for PagedAttention with query lengths > 1) hides the keys each row
      must not see (causal, sliding window).
      ``paged_attention(heads, 1, mla_v_dim)`` (multi-head latent attention, as vLLM-MindSpore runs DeepSeek):
      one cache row per token (the latent and the rope key, D = kv_lora_rank + qk_rope_head_dim), passed as both
      key_cache and value_cache; the value is the first ``mla_v_dim`` (kv_lora_rank) dims of the key row and the
      output is ``[T, heads, mla_v_dim]``.
    * ``flash_attention(heads)``: FlashAttentionScore (gen_ops_prim.FlashAttentionScore's docstring, and
      ops.flash_attention_score's), input_layout "TND", sparse_mode 3 (rightDownCausal), next_tokens 0;
      ``(q [T1, heads, D], k [T2, kv_heads, D], v, None, None, None, attn_mask [2048, 2048] uint8 (the
      compressed lower-triangular mask sparse_mode 3 requires; 1 = discard), None, actual_seq_qlen [B] int64,
      actual_seq_kvlen [B] int64) -> (max, sum, _, out [T1, heads, D])``. ``actual_seq_*len`` are cumulative
      (non-decreasing, the last equal to T1 / T2; a Tensor is allowed per ops.flash_attention_score), no
      sequence of keys is empty, B <= 1024, D a multiple of 16.

    The routed experts of a mixture-of-experts layer (moe.fused_experts), dropless, E experts, T tokens, top k:

    * ``moe_gating_top_k_softmax()``: MoeGatingTopKSoftmax; ``(x [T, E], finished=None, k) -> (y [T, k], expert_idx
      [T, k] int32, row_idx [T, k] int32)``: the k largest of softmax(x) per row, descending, and their experts.
    * ``moe_init_routing_v2()``: MoeInitRoutingV2; ``(x [T, H], expert_idx [T, k], active_num 0, expert_capacity 0,
      expert_num E, drop_pad_mode 0, expert_tokens_count_or_cumsum_flag 1, expert_tokens_before_capacity_flag False)
      -> (expanded_x [T*k, H], expanded_row_idx [T*k] int32, expert_tokens_cumsum [E] int32, _)``: the T*k
      (token, choice) pairs sorted by expert; pair p = t*k + j is row ``expanded_row_idx[p]`` of expanded_x;
      ``expert_tokens_cumsum[e]``: the rows of experts 0..e.
    * ``grouped_matmul()``: GroupedMatmul(split_item 3, group_type 0); ``([x [M, K]], [w [E, K, N]], None x 5,
      group_list [E] int64) -> [y [M, N]]``: rows ``group_list[e-1] .. group_list[e]-1`` times w[e]; the last
      group_list value is M, or less with expert parallel (a rank's E local experts, as vLLM-MindSpore's
      tensor + expert parallel mode calls it): the rows past it are not computed, their content undefined.
    * ``moe_token_unpermute()``: MoeTokenUnpermute; ``(permuted_tokens [T*k, H], sorted_indices [T*k] int32,
      probs [T, k]) -> [T, H]``: out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t*k + j]].
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
    def paged_attention(num_heads, num_kv_heads, mla_v_dim=0):
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.PagedAttention(int(num_heads), 1.0, int(num_kv_heads), mla_v_dim=int(mla_v_dim))

    @staticmethod
    def flash_attention(num_heads):
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.FlashAttentionScore(int(num_heads), scale_value=1.0, pre_tokens=FLASH_PRE_TOKENS, next_tokens=0,
                                        input_layout="TND", sparse_mode=3)

    @staticmethod
    def moe_gating_top_k_softmax():
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.MoeGatingTopKSoftmax()

    @staticmethod
    def moe_init_routing_v2():
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.MoeInitRoutingV2()

    @staticmethod
    def grouped_matmul():
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.GroupedMatmul(split_item=3, group_type=0)

    @staticmethod
    def moe_token_unpermute():
        from mindspore.ops.auto_generate import gen_ops_prim as prim
        return prim.MoeTokenUnpermute()


# FlashAttentionScore in layout TND: pre_tokens must be >= the longest query sequence (the default, INT32_MAX), the
# compressed causal mask is [2048, 2048] and at most 1024 sequences may be given (MindSpore 2.10's docstring).
FLASH_PRE_TOKENS = 2147483647
FLASH_MASK_SIZE = 2048
FLASH_MAX_SEQS = 1024
# PagedAttention's additive mask value for hidden keys (vLLM-MindSpore's LowerTriangularMask: 0 / -10000 for
# PagedAttention with query lengths > 1, bf16 and fp16 alike)
PAGED_MASK_VALUE = -10000.0
_FLASH_MASK = None


def flash_causal_mask():
    """The constant [2048, 2048] uint8 upper-triangular mask (1 = discard) FlashAttentionScore's sparse_mode 3
    takes (one Tensor per process; a Cell attribute, hence a constant of the compiled graph)."""
    global _FLASH_MASK
    if _FLASH_MASK is None:
        _FLASH_MASK = Tensor(np.triu(np.ones((FLASH_MASK_SIZE, FLASH_MASK_SIZE), np.uint8), 1))
    return _FLASH_MASK


_MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


class DeviceOps:
    """The single place where the device chooses kernels, dtype and KV-cache layout.

    cpu (what runs here): fp32; plain-op RMSNorm whose gamma the model builder folds into the following
    linear weights (``fold_norm``); RoPE, cache write and attention in one custom kernel (``attention_kernel``,
    ms_models.kernels).
    ascend (``fused``): MindSpore's fused kernels (``kernels``, FusedKernels) in fp16/bf16 (default bf16):
    RmsNorm (gamma kept), RotaryPositionEmbedding, ReshapeAndCache into vLLM's [blocks, block_size,
    kv_heads, head_dim] cache, then per step (build_fused_attention_metadata) FlashAttentionScore (TND, actual
    sequence lengths) for pure prefills and PagedAttention for everything else, with per-sequence query lengths
    and a mask for mixed batches (fused_attention). No NPU exists here: tests run this path with
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
        self.attention_kernel = None if self.fused else _cpu_attention_kernel
        if not self.fused and os.environ.get("MS_SMALL_MATMUL", "1") != "0":
            _use_small_matmul()
        self.fold_norm = not self.fused
        self.tp = tp if tp is not None else TensorParallel()

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == ms.float32 else 2


def _cpu_attention_kernel():
    """The CPU attention kernel: RoPE, paged cache write and ragged attention in one op (ms_models.kernels)."""
    from .kernels import paged_attention_op
    return paged_attention_op()


def _use_small_matmul() -> None:
    global _small_matmul, _small_matmul_t, _small_matmul3, _small_gate_up, _small_matmul_add, _small_norm_mm3
    global _small_norm_gate_up, _SMALL_MATMUL_ROWS
    from .kernels import SMALL_MATMUL_ROWS, small_matmul_op
    _small_matmul, _small_matmul_t = small_matmul_op("mm"), small_matmul_op("t")
    _small_matmul3, _small_gate_up = small_matmul_op("mm3"), small_matmul_op("gate_up")
    _small_matmul_add = small_matmul_op("mm_add")
    _small_norm_mm3, _small_norm_gate_up = small_matmul_op("norm_mm3"), small_matmul_op("norm_gate_up")
    _SMALL_MATMUL_ROWS = SMALL_MATMUL_ROWS


def tp_all_reduce(tp):
    """The sum over this engine's tensor-parallel ranks (after a row-parallel layer), or None without tensor
    parallel: MindSpore's AllReduce when the cluster is the engine's ranks, EngineSum when it holds every
    data-parallel engine's (ms_models.parallel)."""
    if not tp.enabled:
        return None
    return EngineSum(tp) if tp.dp_experts else ops.AllReduce()


class EngineSum(nn.Cell):
    """The sum of x [T, ...] over one engine's N ranks of a cluster shared by data-parallel engines (whose CPU
    collectives run on the whole cluster only): an AllGather of every rank's x, then the engine's N parts added in
    rank order, so that its ranks hold the same sum bit for bit. Every engine runs it with the same T."""

    def __init__(self, tp):
        super().__init__(auto_prefix=False)
        self.gather = ops.AllGather()
        self.first = tp.dp_rank * tp.size   # the engine's first cluster rank
        self.size = tp.size

    def construct(self, x):
        T = x.shape[0]
        parts = self.gather(x)
        y = parts[self.first * T:(self.first + 1) * T]
        for i in range(1, self.size):
            y = y + parts[(self.first + i) * T:(self.first + i + 1) * T]
        return y


def to_param(arr, name: str, dtype=None):
    """numpy array -> non-trainable Parameter, fp32 or ``dtype`` (one copy; ``name`` must be unique in
    the graph). ``None`` and Parameters pass through (optional weights such as biases)."""
    if arr is None or isinstance(arr, Parameter):
        return arr
    a = np.ascontiguousarray(arr, dtype=np.float32)
    t = ms.from_numpy(a) if dtype in (None, ms.float32) else Tensor(a, dtype)
    return Parameter(t, name=name, requires_grad=False)


def new_kv_cache(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int, name: str, dev=None):
    """(k, v) zero cache Parameters [num_blocks + 1, block_size, kv_heads, head_dim] (vLLM's layout) in the
    device's dtype; the last block (``num_blocks``) is scratch for padding tokens."""
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    dtype = dev.dtype if dev is not None else None
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


# The CPU path's products for the few rows of a decode step (ms_models.kernels.small_matmul_op; MindSpore's MatMul
# runs them on one thread), set when a CPU model is built (DeviceOps) unless MS_SMALL_MATMUL=0.
_small_matmul = _small_matmul_t = _small_matmul3 = _small_gate_up = _small_matmul_add = None
_small_norm_mm3 = _small_norm_gate_up = None
_SMALL_MATMUL_ROWS = 0   # kernels.SMALL_MATMUL_ROWS once set


def _plus(y, bias):
    return y if bias is None else y + bias


def _few_rows(x):
    """Whether the CPU kernel takes this product: set, and a 2-D f32 x of at most _SMALL_MATMUL_ROWS rows (static
    shapes: decided when the graph compiles)."""
    return _small_matmul is not None and x.ndim == 2 and x.shape[0] <= _SMALL_MATMUL_ROWS and x.dtype == ms.float32


def linear(x, weight, bias=None):
    """x @ weight (+ bias); weight stored [in, out]; few rows (_few_rows) through the CPU kernel."""
    if _few_rows(x):
        y = _small_matmul(x, weight)
    else:
        y = ops.matmul(x, weight)
    return _plus(y, bias)


def linear_add(x, weight, r, bias=None):
    """r + linear(x, weight, bias) (a row-parallel product and the residual add); few rows without a bias in one
    kernel call."""
    if _few_rows(x) and bias is None:
        return _small_matmul_add(x, weight, r)
    return r + linear(x, weight, bias)


def qkv_linear(x, wq, wk, wv, bq=None, bk=None, bv=None):
    """linear() of one x by three weights (a layer's q, k, v); few rows in one kernel call."""
    if not _few_rows(x):
        return linear(x, wq, bq), linear(x, wk, bk), linear(x, wv, bv)
    q, k, v = _small_matmul3(x, wq, wk, wv)
    return _plus(q, bq), _plus(k, bk), _plus(v, bv)


def norm_qkv_linear(x, eps, eps_t, gamma, wq, wk, wv, bq=None, bk=None, bv=None):
    """qkv_linear(rms_norm(x, eps, gamma), ...); few rows with the gamma folded into the weights (None) in one
    kernel call (``eps_t``: eps as a [1] f32 tensor)."""
    if not _few_rows(x) or gamma is not None:
        return qkv_linear(rms_norm(x, eps, gamma), wq, wk, wv, bq, bk, bv)
    q, k, v = _small_norm_mm3(x, eps_t, wq, wk, wv)
    return _plus(q, bq), _plus(k, bk), _plus(v, bv)


def gate_up(x, w_gate, w_up, b_gate=None, b_up=None):
    """silu(gate(x)) * up(x), a gated MLP's input to down; few rows without biases in one kernel call."""
    if _few_rows(x) and b_gate is None and b_up is None:
        return _small_gate_up(x, w_gate, w_up)
    return ops.silu(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up)


def norm_gate_up(x, eps, eps_t, gamma, w_gate, w_up, b_gate=None, b_up=None):
    """gate_up(rms_norm(x, eps, gamma), ...); few rows, the gamma folded (None) and no biases in one kernel call."""
    if _few_rows(x) and gamma is None and b_gate is None and b_up is None:
        return _small_norm_gate_up(x, eps_t, w_gate, w_up)
    return gate_up(rms_norm(x, eps, gamma), w_gate, w_up, b_gate, b_up)


def eps_tensor(eps: float) -> ms.Tensor:
    """An RMSNorm's eps as the [1] f32 tensor the norm_* kernels take (a constant of the graph)."""
    return ms.Tensor(np.array([eps], np.float32))


def embedding(ids, table):
    """Token lookup; table [vocab, hidden]."""
    return ops.gather(table, ids, 0)


def lm_head(x, table):
    """x @ table^T with table [vocab, hidden] (HF layout; the embedding when tied); few rows through the CPU
    kernel as in linear()."""
    if _few_rows(x):
        return _small_matmul_t(x, table)
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
    """down(silu(gate(x)) * up(x)); separate gate/up weights (no slicing of a fused output)."""
    return linear(gate_up(x, w_gate, w_up, b_gate, b_up), w_down, b_down)


def fused_rotary(x, cos, sin, rope, head_dim):
    """Neox RoPE on x [T, n*hd] with the fused kernel ``rope`` (FusedKernels.rope), layout BSND:
    x as [1, T, n, hd], cos/sin [T, hd] as [1, T, 1, hd] (no transpose, cos/sin not tiled per head)."""
    T, D = x.shape
    c = ops.cast(cos, x.dtype).reshape(1, T, 1, head_dim)
    s = ops.cast(sin, x.dtype).reshape(1, T, 1, head_dim)
    return rope(x.reshape(1, T, D // head_dim, head_dim), c, s, 0).reshape(T, D)


def fused_attention(q, k, v, k_cache, v_cache, slots, block_tables, context_lens, q_seq_lens, attn_mask,
                    actual_seq_lens, flash_mask, write, paged, flash, num_kv_heads, head_dim):
    """The fused path of the attention over a flat batch of T tokens (q [T, heads*hd] pre-scaled, k/v
    [T, kv_heads*hd]; returns [T, heads*hd]). Inputs: build_fused_attention_metadata's, whose None inputs select
    the kernel path when the graph is compiled.

    ``write`` (ReshapeAndCache) first puts this step's K/V at ``slots`` [T] of the caches [blocks + 1,
    block_size, kv_heads, hd]; the query depends on it explicitly, so the attention runs after the write
    (vLLM-MindSpore orders it the same way). Then:

    * ``actual_seq_lens`` given (a pure prefill: every request starts at position 0, no sliding window): ``flash``
      (FlashAttentionScore, TND, rightDownCausal) on the step's own K/V: sequences by cumulative lengths, no
      cache read, no [B, Q, L] mask. Its contract wants every sequence non-empty and the lengths to sum to T:
      ``actual_seq_lens`` [R'] describes T + R' rows, the T tokens followed by R' zero rows appended here, so
      the padded requests and padding tokens form non-empty sequences of their own (or trail the last request,
      invisible to it under the causal mask); the first T output rows are kept.
    * else ``paged`` (PagedAttention) over ``block_tables`` [T, M] and ``context_lens`` [T] (one entry per
      sequence; T entries, room for any request count): without ``q_seq_lens`` one query per entry (a batch of
      decodes); with ``q_seq_lens`` [T] (chunked prefills, prefix-cache hits, decodes mixed with prefills,
      sliding windows) each entry owns q_seq_lens[e] consecutive query rows and ``attn_mask`` [T, M*block_size]
      uint8 (1 = hidden), turned here into the kernel's additive mask in the query's dtype (PAGED_MASK_VALUE).
    """
    T, D = q.shape
    kvh, hd = num_kv_heads, head_dim
    k3, v3 = k.reshape(T, kvh, hd), v.reshape(T, kvh, hd)
    q = ops.depend(q.reshape(T, D // hd, hd), write(k3, v3, k_cache, v_cache, slots))
    if actual_seq_lens is not None:
        n = actual_seq_lens.shape[0]

        def extend(x):
            return ops.concat((x, ops.zeros((n,) + x.shape[1:], x.dtype)), 0)

        out = flash(extend(q), extend(k3), extend(v3), None, None, None, flash_mask, None, actual_seq_lens,
                    actual_seq_lens)[3]
        return out[:T].reshape(T, D)
    mask = None if attn_mask is None else ops.cast(attn_mask, q.dtype) * PAGED_MASK_VALUE
    return paged(q, k_cache, v_cache, block_tables, context_lens, None, None, mask, q_seq_lens).reshape(T, D)


# ----------------------------------------------------------------------------- host side (numpy)
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float64), with HF "linear" / "llama3" / "yarn" scaling (yarn's attention
    factor is the model's to apply: ms_models.mla)."""
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
    if kind == "yarn":  # HF's _compute_yarn_parameters: interpolated below the ramp, extrapolated above it
        old = float(scaling["original_max_position_embeddings"])

        def dim_of(rotations):
            return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(float(theta)))

        low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0, 1)
        return inv / factor * ramp + inv * (1 - ramp)
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

    def cos_sin_half(self, positions: np.ndarray) -> np.ndarray:
        """positions [T] -> [T, head_dim] float32: cos then sin of the head_dim/2 frequencies (the attention
        kernel's RoPE input)."""
        f = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        return np.concatenate([np.cos(f), np.sin(f)], -1).astype(np.float32)


def build_fused_attention_metadata(batch, num_blocks: int, block_size: int, num_reqs: int,
                                   sliding_window: int | None = None):
    """Per-step inputs of fused_attention (numpy) for a padded FlatBatch (model.CausalLM._pad: T tokens, R'
    request rows) whose first ``num_reqs`` requests are real. Returns ``(slots, block_tables, context_lens,
    q_seq_lens, attn_mask, actual_seq_lens)``; the kernel path is chosen here, per step, and the unused inputs
    are None (compile-time constants: one graph per token bucket and path, model.CausalLM keys them so):

    * slots [T] int32: each token's cache slot; padding tokens (slot -1) -> the scratch block ``num_blocks``
      (never a request's block), always.
    * pure prefill (every request starts at position 0, no sliding window, R' <= FLASH_MAX_SEQS):
      FlashAttentionScore on the step's K/V. ``actual_seq_lens`` [R'] int64, cumulative, over T + R' rows (the
      step's tokens and R' zero rows fused_attention appends): the real requests' lengths, then one row for each
      padded request (the last takes the remaining rows), or, with no padded request, the remaining rows trail
      the last request (rows after a token's own are hidden from it by the causal mask). Every sequence is
      non-empty, as the TND contract requires. Everything else None.
    * otherwise PagedAttention over T entries: request r < R is entry r (its block table row with -1 -> the
      scratch block, context_lens = seq_lens[r], q_seq_lens = its query length); each padding token is an entry
      of one query over the first key of the scratch block; the remaining entries have no query (q_seq_lens 0,
      context 1 on the scratch block). ``block_tables`` [T, M] int32, ``context_lens`` [T] int32.
      - a batch of decodes (every query length 1, no sliding window): q_seq_lens and attn_mask None (entry =
        token, the documented decode form);
      - anything else (decodes with prefill chunks, chunks over earlier context or a prefix-cache hit, sliding
        windows): q_seq_lens [T] int32 and attn_mask [T, M*block_size] uint8, 1 = key position j hidden from
        token t: j > positions[t] or, with a sliding window W, j <= positions[t] - W (padding tokens sit at
        position 0 and see key 0).

    Why PagedAttention for the mixed batches: MindSpore 2.10 documents its q_seq_lens ("the query length of each
    sequence") and the per-token attn_mask, and vLLM-MindSpore runs chunked prefill and prefix caching that way;
    FlashAttentionScore would need the keys gathered through the block tables first. Why FlashAttentionScore for
    pure prefills: the keys are the step's own, no cache read and no mask beyond the constant causal one."""
    T, R, Rp = batch.num_tokens, int(num_reqs), batch.num_reqs
    M = batch.block_tables.shape[1]
    qsl = batch.query_start_loc.astype(np.int64)
    qlen = np.diff(qsl[:R + 1])
    real = int(qsl[R])
    if R < 1 or (qlen < 1).any():
        raise ValueError("every real request must compute at least one token")
    s = batch.slot_mapping.astype(np.int64)
    slots = np.where(s >= 0, s, num_blocks * block_size + np.arange(T) % block_size).astype(np.int32)
    start = batch.seq_lens[:R].astype(np.int64) - qlen
    if not sliding_window and (start == 0).all() and Rp <= FLASH_MAX_SEQS:
        lens = np.zeros(Rp, np.int64)
        lens[:R] = qlen
        spare = T - real + Rp
        lens[R:] = 1
        lens[-1] += spare - (Rp - R)
        return slots, None, None, None, None, np.cumsum(lens)
    bt = np.full((T, M), num_blocks, np.int32)
    bt[:R] = np.where(batch.block_tables[:R] >= 0, batch.block_tables[:R], num_blocks)
    context_lens = np.ones(T, np.int32)
    context_lens[:R] = batch.seq_lens[:R]
    if not sliding_window and real == R:
        return slots, bt, context_lens, None, None, None
    q_seq_lens = np.zeros(T, np.int32)
    q_seq_lens[:R] = qlen
    q_seq_lens[R:R + T - real] = 1
    keys, pos = np.arange(M * block_size, dtype=np.int64)[None, :], batch.positions.astype(np.int64)[:, None]
    hidden = keys > pos
    if sliding_window:
        hidden |= keys <= pos - int(sliding_window)
    return slots, bt, context_lens, q_seq_lens, hidden.astype(np.uint8), None
