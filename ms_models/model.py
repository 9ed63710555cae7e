"""Architecture-independent runner: KV-cache allocation, shape bucketing, jit, forward."""
from __future__ import annotations

import gc
import time
from typing import Iterable

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from .config import ModelConfig

__all__ = ["CausalLM", "next_bucket"]


def next_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


class _Runner(nn.Cell):
    """Fresh top-level Cell per KV-cache allocation.

    MindSpore caches compiled graphs per Cell instance and binds the Parameters it saw at
    compile time; a new runner makes the next jit compile pick up the new cache Parameters.
    """

    def __init__(self, net: nn.Cell):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, cos_q, sin_q, cos_k, sin_k, write_rows, read_rows, attn_bias, logits_idx):
        return self.net(input_ids, cos_q, sin_q, cos_k, sin_k, write_rows, read_rows, attn_bias, logits_idx)


class CausalLM:
    """A loaded model: weights + paged KV cache, one ``forward`` per scheduled batch.

    ``forward`` pads (B, Q, M) to power-of-two buckets (at least ``min_buckets``) and runs
    the whole network as one ``ms.jit`` graph compiled once per bucket shape.
    """

    def __init__(self, config: ModelConfig, net: nn.Cell, device: str = "cpu", use_jit: bool = True,
                 model_dir: str | None = None, min_buckets: tuple = (1, 1, 1)):
        self.config = config
        self.net = net
        self.net.set_train(False)
        self.device = device
        self.use_jit = bool(use_jit)
        self.model_dir = model_dir
        self.min_buckets = tuple(int(x) for x in min_buckets)
        self.num_blocks: int | None = None
        self.block_size: int | None = None
        self._gen = 0
        self._runner = None
        self._fn = None
        self.compiled_shapes: set = set()  # bucket shapes already run with the current cache

    # ------------------------------------------------------------------ sizes
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes of K+V for one block, summed over all layers (fp32)."""
        return sum(layer.kv_cache_bytes_per_block(int(block_size)) for layer in self.net.cache_layers())

    def weight_bytes(self) -> int:
        """Bytes of all weight Parameters (fp32; a tied embedding counted once)."""
        return self.net.weight_bytes()

    def kv_caches(self) -> list:
        """[(k_cache, v_cache)] Parameters per layer, shape [kv_heads * (num_blocks + 1) *
        block_size, head_dim]: reshape to [kv_heads, num_blocks + 1, block_size, head_dim]
        (row = (head * (num_blocks + 1) + block) * block_size + offset)."""
        return [(layer.k_cache, layer.v_cache) for layer in self.net.cache_layers()]

    # ------------------------------------------------------------------ cache
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Creates per-layer K/V caches, [kv_heads, num_blocks + 1, block_size, head_dim] in
        memory (block ``num_blocks`` is scratch for padding writes; see kv_caches()).

        Calling it again replaces the caches and drops all compiled shapes (they recompile
        on first use)."""
        num_blocks, block_size = int(num_blocks), int(block_size)
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive (got {num_blocks}, {block_size})")
        self._gen += 1
        if self._runner is not None:
            # compiled graphs hold the old cache Parameters: drop them (all of this process's
            # compiled graphs; they recompile on next use) so the old caches can be freed
            self._runner = self._fn = None
            for layer in self.net.cache_layers():
                layer.k_cache = layer.v_cache = None
            ms.ms_memory_recycle()
            gc.collect()
        for layer in self.net.cache_layers():
            layer.allocate_kv_cache(num_blocks, block_size, f"g{self._gen}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._runner = _Runner(self.net)
        self._runner.set_train(False)
        self._fn = ms.jit(self._runner.construct) if self.use_jit else self._runner.construct
        self.compiled_shapes = set()

    # ------------------------------------------------------------------ forward
    def bucket_shape(self, B: int, Q: int, M: int) -> tuple:
        b0, q0, m0 = self.min_buckets
        return next_bucket(B, b0), next_bucket(Q, q0), next_bucket(M, m0)

    def forward(self, input_ids, positions, slot_mapping, block_tables, logits_indices,
                all_positions: bool = False) -> np.ndarray:
        """One model step over a padded per-request batch; returns logits [B, vocab] float32.

        input_ids, positions, slot_mapping: [B, Q] int (slot -1 = padding token);
        block_tables [B, M] int (-1 = padding); logits_indices [B] (q index per row).
        The K/V of every real token is written at its slot first; each token at position p
        then attends to keys 0..p of its own request, read back through its block table.
        """
        if self._fn is None:
            raise RuntimeError("allocate_kv_cache() must be called before forward()")
        ids = np.asarray(input_ids)
        pos = np.asarray(positions)
        slots = np.asarray(slot_mapping)
        bt = np.asarray(block_tables)
        li = np.asarray(logits_indices).reshape(-1)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, Q], got shape {ids.shape}")
        B, Q = ids.shape
        if B == 0 or Q == 0:
            raise ValueError("empty batch")
        if pos.shape != (B, Q) or slots.shape != (B, Q):
            raise ValueError(f"positions {pos.shape} and slot_mapping {slots.shape} must match input_ids {ids.shape}")
        if bt.ndim != 2 or bt.shape[0] != B or bt.shape[1] == 0:
            raise ValueError(f"block_tables must be [B={B}, M>0], got {bt.shape}")
        if li.shape != (B,):
            raise ValueError(f"logits_indices must be [B={B}], got {li.shape}")
        M = bt.shape[1]
        nb, bs = self.num_blocks, self.block_size
        real = slots >= 0
        if real.any():
            if slots.max() >= nb * bs:
                raise ValueError(f"slot_mapping has slot {int(slots.max())} >= num_blocks*block_size {nb * bs}")
            rp = pos[real]
            if rp.min() < 0 or rp.max() >= M * bs:
                raise ValueError(f"positions of real tokens must be in [0, M*block_size={M * bs})")
        if bt.max() >= nb:
            raise ValueError(f"block_tables has block id {int(bt.max())} >= num_blocks {nb}")
        if li.min() < 0 or li.max() >= Q:
            raise ValueError(f"logits_indices must be in [0, Q={Q})")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size})")

        Bp, Qp, Mp = self.bucket_shape(B, Q, M)
        p_ids = np.zeros((Bp, Qp), np.int32)
        p_ids[:B, :Q] = ids
        p_pos = np.zeros((Bp, Qp), np.int32)
        p_pos[:B, :Q] = pos
        p_slots = np.full((Bp, Qp), -1, np.int32)
        p_slots[:B, :Q] = slots
        p_bt = np.full((Bp, Mp), -1, np.int32)
        p_bt[:B, :M] = bt
        p_li = np.zeros((Bp,), np.int64)
        p_li[:B] = li
        if all_positions:                     # logits of every query position: [B, Q, vocab] (prompt logprobs)
            logits_flat = np.arange(Bp * Qp, dtype=np.int64)
        else:
            logits_flat = np.arange(Bp, dtype=np.int64) * Qp + p_li
        arrays = self.net.prepare_inputs(p_ids, p_pos, p_slots, p_bt, logits_flat, nb, bs)
        out = self._fn(*[Tensor(a) for a in arrays])
        self.compiled_shapes.add((Bp, Qp, Mp, all_positions))
        if all_positions:
            return out.asnumpy().reshape(Bp, Qp, -1)[:B, :Q]
        return out.asnumpy()[:B]

    __call__ = forward

    def warmup(self, shapes: Iterable) -> dict:
        """Runs each (B, Q, M) bucket once with dummy inputs (writes only to the scratch
        block) so compilation happens before serving. Returns {bucket: seconds}."""
        times = {}
        for B, Q, M in shapes:
            shape = self.bucket_shape(B, Q, M)
            if shape in times:
                continue
            Bp, Qp, Mp = shape
            t0 = time.perf_counter()
            self.forward(np.zeros((Bp, Qp), np.int32), np.zeros((Bp, Qp), np.int32),
                         np.full((Bp, Qp), -1, np.int32), np.full((Bp, Mp), -1, np.int32),
                         np.zeros((Bp,), np.int32))
            times[shape] = time.perf_counter() - t0
        return times
