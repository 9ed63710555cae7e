"""Architecture-independent runner: KV-cache allocation, shape bucketing, jit, forward."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from collections import OrderedDict
from typing import Iterable

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from . import runtime
from .config import ModelConfig

__all__ = ["CausalLM", "next_bucket", "DEFAULT_GRAPH_MEMORY"]

log = logging.getLogger("ms_models")

# Host memory for compiled bucket graphs (see _GraphCache). Measured on SmolLM2-135M: a decode graph costs
# about 46 MiB, a prefill graph 50-250 MiB (growing with its tokens); the worker target is RSS <= weights +
# KV cache + 700 MiB, of which MindSpore itself and the Python process take about 450.
DEFAULT_GRAPH_MEMORY = 160 << 20
# A bucket without a graph runs in a compiled bigger one (see CausalLM._bucket_to_run) until asked this often.
COMPILE_AFTER = 8
# Under tensor parallelism each graph is booked at this cost, the same on every rank (measured costs differ a little
# between ranks, and the ranks' cache decisions must not): a SmolLM2 graph measures 51-70 MiB per rank at TP=3.
TP_GRAPH_COST = 64 << 20


def next_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_bytes() -> int:
    """Bytes malloc'd and not freed (glibc mallinfo2), else the resident set size.

    Compiled graphs live in malloc'd memory, and a graph compiled after others were dropped
    mostly reuses their freed heap, so RSS growth would undercount it; heap in use does not."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    except (OSError, AttributeError):  # not glibc >= 2.33
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _compiled_phases() -> set:
    """The phases (compiled-graph keys) of every ms.jit graph of this process."""
    from mindspore.graph.api import ms_compile_cache

    return set(ms_compile_cache)


def _drop_graphs(phases: set) -> None:
    """Frees compiled graphs (MindSpore 2.10 internals: what its own auto-dynamic-shape cache does to drop a
    graph), then hands the freed heap back to the OS (the graphs live in malloc'd memory, not in MindSpore's
    pool, and glibc keeps freed memory otherwise)."""
    from mindspore._c_expression import GraphExecutor_, JitExecutor_
    from mindspore.graph.api import ms_compile_cache

    for executor in (JitExecutor_.get_instance(), GraphExecutor_.get_instance()):
        executor.del_net_res(None, set(phases))
    ms_compile_cache.difference_update(phases)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _GraphCache:
    """The bucket graphs compiled with the current KV cache, least recently used first.

    MindSpore keeps every compiled graph until told to drop it, and each costs host memory: about 30 KB per
    kernel (a 30-layer decoder is ~1,600 kernels, ~46 MiB whatever the shape) plus buffers some CPU kernels keep
    per graph. One graph per (B, Q, M) bucket made the worker's RSS grow with every new batch size and context
    length. Each graph's cost is the heap its compilation and first run leave allocated; the total stays within a
    budget. Dropping a graph is not free: MindSpore 2.10 never frees about an eighth of each compilation (~6 MiB
    per SmolLM2 graph, in its frontend), so a cache that drops and recompiles the same shapes leaks. Hence the
    policy (CausalLM._bucket_to_run): a batch without its own graph runs padded in a compiled bigger one (a
    cover); a new graph compiles only when it fits beside the others, or when nothing covers the batch, and then
    the graphs it covers go first. Every shape once covered stays covered, so compiling stops.
    """

    def __init__(self):
        self._graphs: OrderedDict = OrderedDict()  # key -> (phases, bytes)
        self.compiled = self.dropped = 0           # graphs compiled and dropped, for ever (metrics)

    def __contains__(self, key) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def bytes(self) -> int:
        return sum(cost for _, cost in self._graphs.values())

    @property
    def largest(self) -> int:
        return max((cost for _, cost in self._graphs.values()), default=0)

    def cover(self, key):
        """The compiled key with the fewest padded tokens (then blocks) that can run ``key``'s batch: no
        smaller in B, Q or M, and the same all_positions; None if there is none."""
        fits = [k for k in self._graphs if k[3] == key[3] and all(a >= b for a, b in zip(k[:3], key[:3]))]
        return min(fits, key=lambda k: (k[0] * k[1], k[2]), default=None)

    def join(self, key):
        """The bucket to compile for ``key``, which no graph covers, when the cache is full: the elementwise
        maximum of ``key`` and a kept graph's bucket (it covers both, and the kept graph is then dropped: every
        shape covered before stays covered) whose padded work B x Q x M is at most twice the larger of the two,
        the smallest such, a decode's (Q = 1) with a decode graph and a prefill's with a prefill graph if there
        is one; else ``key`` itself (then the least recently used graph goes)."""
        def work(k):
            return k[0] * k[1] * k[2]

        joins = []
        for k in self._graphs:
            j = tuple(max(a, b) for a, b in zip(key[:3], k[:3])) + (key[3],)
            if k[3] == key[3] and work(j) <= 2 * max(work(key), work(k)):
                joins.append(((k[1] == 1) != (key[1] == 1), work(j), j))   # a decode with a decode first
        return min(joins)[2] if joins else key

    def touch(self, key) -> bool:
        """Marks ``key`` used now; False if it has no graph yet."""
        if key not in self._graphs:
            return False
        self._graphs.move_to_end(key)
        return True

    def fits_another(self, budget: int) -> bool:
        """Whether one more graph (as costly as the costliest so far) fits in ``budget`` beside the others."""
        return self.bytes + self.largest <= budget

    def make_room(self, key, budget: int) -> None:
        """Before compiling ``key``: drops graphs while another would not fit in ``budget`` (see _drop_one), so
        that the compilation's own peak does not come on top of them."""
        while self._graphs and not self.fits_another(budget):
            self._drop_one(key, budget)

    def add(self, key, phases: set, cost: int, budget: int) -> None:
        """Records a new graph, then drops others while over ``budget`` (its cost was more than expected)."""
        self._graphs[key] = (phases, max(int(cost), 0))
        self.compiled += 1
        while self.bytes > budget and len(self._graphs) > 1:
            self._drop_one(key, budget)

    def _drop_one(self, key, budget: int) -> None:
        """Drops the least recently used graph that ``key`` covers (its batches can run in ``key``'s), else the
        least recently used other one."""
        others = [k for k in self._graphs if k != key]
        covered = [k for k in others if k[3] == key[3] and all(a >= b for a, b in zip(key[:3], k[:3]))]
        old_key = (covered or others)[0]
        old, _ = self._graphs.pop(old_key)
        _drop_graphs(old)
        self.dropped += 1
        log.info("dropped the graph of bucket %s (graph memory budget %.0f MiB%s)", old_key, budget / 2**20,
                 f"; {key} covers it" if covered else "")

    def clear(self) -> None:
        for phases, _ in self._graphs.values():
            _drop_graphs(phases)
        self._graphs.clear()


class _Runner(nn.Cell):
    """Fresh top-level Cell per KV-cache allocation.

    MindSpore caches compiled graphs per Cell instance and binds the Parameters it saw at
    compile time; a new runner makes the next jit compile pick up the new cache Parameters.
    """

    def __init__(self, net: nn.Cell):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, *inputs):
        return self.net(*inputs)


class CausalLM:
    """A loaded model: weights + paged KV cache, one ``forward`` per scheduled batch.

    ``forward`` pads (B, Q, M) to power-of-two buckets (at least ``min_buckets``) and runs
    the whole network as one ``ms.jit`` graph per bucket shape; at most ``graph_memory`` bytes
    of compiled graphs are kept, and a batch without its own graph runs padded in a bigger one
    (see _bucket_to_run).
    """

    def __init__(self, config: ModelConfig, net: nn.Cell, device: str = "cpu", use_jit: bool = True,
                 model_dir: str | None = None, min_buckets: tuple = (1, 1, 1),
                 graph_memory: int = DEFAULT_GRAPH_MEMORY):
        self.config = config
        self.net = net
        self.net.set_train(False)
        self.device = device
        self.use_jit = bool(use_jit)
        self.model_dir = model_dir
        self.min_buckets = tuple(int(x) for x in min_buckets)
        self.graph_memory = int(graph_memory)
        self.num_blocks: int | None = None
        self.block_size: int | None = None
        self._gen = 0
        self._runner = None
        self._fn = None
        self.graphs = _GraphCache()  # bucket shapes compiled with the current cache
        self._asked: dict = {}       # uncompiled bucket -> times asked for (see _bucket_to_run)

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
            self.graphs.clear()
            self._asked.clear()
            self._runner = self._fn = None
            for layer in self.net.cache_layers():
                layer.k_cache = layer.v_cache = None
            ms.ms_memory_recycle()
            gc.collect()
        for layer in self.net.cache_layers():
            layer.allocate_kv_cache(num_blocks, block_size, f"g{self._gen}")
        self.num_blocks, self.block_size = num_blocks, block_size
        # MindSpore's memory pool mallocs its first block (1 GiB of address space, resident only as
        # used) at the first op: a tiny op now keeps it out of the first graph's measured cost
        (Tensor(np.zeros(1, np.float32)) + 1).asnumpy()
        self._runner = _Runner(self.net)
        self._runner.set_train(False)
        self._fn = ms.jit(self._runner.construct) if self.use_jit else self._runner.construct

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

        return self._forward(ids, pos, slots, bt, li, self._bucket_to_run(self.bucket_shape(B, Q, M), all_positions),
                             all_positions)

    __call__ = forward

    def _bucket_to_run(self, shape: tuple, all_positions: bool) -> tuple:
        """The bucket to run a batch of bucket ``shape`` in: its own graph if compiled; else the compiled bucket
        with the fewest padded tokens that covers it (no smaller in B, Q or M), unless the shape has been asked
        for COMPILE_AFTER times and its graph fits in the budget beside the others; ``shape`` itself (to compile)
        when nothing covers it. Batch sizes and context lengths that last a few steps (requests arriving or
        finishing one by one) then cost some padding, not a 2-3 s compilation, and a full cache never drops a
        graph to make room for a shape it can already run (see _GraphCache). Under tensor parallelism every rank
        makes the same choices (their graphs all-reduce, so they must run the same shapes): the decisions depend
        only on the shapes asked for, and graphs are booked at TP_GRAPH_COST each, not their measured cost."""
        key = (*shape, all_positions)
        if not self.use_jit or key in self.graphs:
            return shape
        cover = self.graphs.cover(key)
        if cover is None:
            return shape if self.graphs.fits_another(self.graph_memory) else self.graphs.join(key)[:3]
        asked = self._asked[key] = self._asked.get(key, 0) + 1
        if asked >= COMPILE_AFTER and self.graphs.fits_another(self.graph_memory):
            return shape
        return cover[:3]

    def _forward(self, ids, pos, slots, bt, li, shape: tuple, all_positions: bool) -> np.ndarray:
        """forward() of valid inputs, padded to bucket ``shape``."""
        B, Q = ids.shape
        M = bt.shape[1]
        nb, bs = self.num_blocks, self.block_size
        Bp, Qp, Mp = shape
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
        out = self._run((Bp, Qp, Mp, all_positions), [None if a is None else Tensor(a) for a in arrays])
        if all_positions:
            return out.asnumpy().reshape(Bp, Qp, -1)[:B, :Q]
        return out.asnumpy()[:B]

    def _run(self, key: tuple, inputs: list):
        """Runs the graph of bucket ``key``, compiling it on first use (after dropping others if the cache is
        full) and recording its cost in ``graphs``."""
        if not self.use_jit or self.graphs.touch(key):
            return self._fn(*inputs)
        self.graphs.make_room(key, self.graph_memory)
        before, heap, t0 = _compiled_phases(), _heap_bytes(), time.perf_counter()
        out = self._fn(*inputs)  # blocking mode: the graph has run when this returns
        cost = _heap_bytes() - heap
        booked = TP_GRAPH_COST if runtime.current_tp()[1] > 1 else cost
        self.graphs.add(key, _compiled_phases() - before, booked, self.graph_memory)
        self._asked.pop(key, None)
        log.info("compiled bucket %s in %.1f s (%.0f MiB); %d graphs kept, %.0f MiB", key, time.perf_counter() - t0,
                 cost / 2**20, len(self.graphs), self.graphs.bytes / 2**20)
        return out

    def warmup(self, shapes: Iterable) -> dict:
        """Runs each (B, Q, M) bucket once with dummy inputs (writes only to the scratch
        block) so compilation happens before serving, in order, while another graph (as big as
        the biggest so far) fits in ``graph_memory``: warming more would only drop the first
        ones again. Returns {bucket: seconds}."""
        times = {}
        for B, Q, M in shapes:
            shape = self.bucket_shape(B, Q, M)
            if shape in times:
                continue
            if self.use_jit and not self.graphs.fits_another(self.graph_memory):
                break
            Bp, Qp, Mp = shape
            t0 = time.perf_counter()
            self._forward(np.zeros((Bp, Qp), np.int32), np.zeros((Bp, Qp), np.int32),
                          np.full((Bp, Qp), -1, np.int32), np.full((Bp, Mp), -1, np.int32),
                          np.zeros((Bp,), np.int32), shape, False)
            times[shape] = time.perf_counter() - t0
        return times
