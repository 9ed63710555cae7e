"""Architecture-independent runner: the paged KV cache, one flat forward per step, the compiled graphs.

A step runs as two graphs: the body (embedding, every decoder layer, over all T tokens of the step, T padded to a
token bucket) and the head (final norm and lm head over the S rows whose logits are wanted, S padded to a power of
two). Both depend on nothing but those two sizes, so warm-up compiles them all and serving compiles nothing (on the
CPU; the fused path's body also depends on the step's kernel path, see CausalLM.warmup).
"""
from __future__ import annotations

import gc
import logging
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from .batch import FORWARD_OVERHEAD_TOKENS, LOGITS_BUCKETS, FlatBatch, logits_bucket, token_bucket, token_buckets, \
    token_parts
from .config import ModelConfig
from .parallel import TensorParallel

__all__ = ["CausalLM", "MAX_GRAPH_TOKENS"]

log = logging.getLogger("ms_models")

# Tokens of the largest body graph; a step with more runs as consecutive forwards (FlatBatch.split). Activations
# grow by about 40 KiB per token for SmolLM2 (hidden 576, MLP 1536: the MLP's three [T, 1536] buffers dominate) and
# a graph's own buffers with them; beyond a few thousand tokens a bigger forward is no faster.
MAX_GRAPH_TOKENS = 2048


class _Body(nn.Cell):
    """The body graph's top-level Cell, made anew with each KV cache (MindSpore binds a compiled graph to the
    Parameters it saw, so new caches need a new Cell)."""

    def __init__(self, net: nn.Cell):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, *inputs):
        return self.net.body(*inputs)


class _Head(_Body):
    def construct(self, x, rows):
        return self.net.head(x, rows)


class CausalLM:
    """A loaded model: weights + paged KV cache; ``forward(FlatBatch)`` runs one step and returns the logits of
    the batch's ``logits_indices`` rows."""

    def __init__(self, config: ModelConfig, net: nn.Cell, device: str = "cpu", use_jit: bool = True,
                 model_dir: str | None = None, tp: TensorParallel | None = None):
        self.config = config
        self.tp = tp or TensorParallel()   # this process's rank, group size and expert placement
        self.net = net
        self.net.set_train(False)
        self.device = device
        self.use_jit = bool(use_jit)
        self.model_dir = model_dir
        self.num_blocks: int | None = None
        self.block_size: int | None = None
        self.max_num_seqs = self.max_blocks = 0
        self.buckets: tuple[int, ...] = ()
        # a step just over a bucket runs as two forwards rather than padded (batch.token_parts); measured on CPU only
        self.split_overhead = FORWARD_OVERHEAD_TOKENS if device == "cpu" else 0
        self.max_logits_rows = 1
        self._gen = 0
        self._body = self._head = None
        self.compiled: set = set()       # graph keys run at least once with the current cache
        self.compiling_since = 0.0       # time.monotonic() when the graph being compiled started; 0 = none
        self.graphs_compiled = 0         # for ever (metrics)
        self.lora = None                 # ms_models.lora.LoraSlots once enable_lora() ran
        self._max = None                 # the all-gather of _agree

    def enable_lora(self, max_loras: int, max_rank: int):
        """Gives every layer ``max_loras`` LoRA slots of rank ``max_rank`` (ms_models.lora; all empty) and returns
        them; every step then carries each token's slot. Before allocate_kv_cache: the graphs take the slots."""
        from .lora import LoraSlots

        if self.lora is None or (self.lora.max_loras, self.lora.max_rank) != (max_loras, max_rank):
            self.lora = LoraSlots(self, max_loras, max_rank)
        return self.lora

    # ------------------------------------------------------------------ sizes
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes of K+V for one block, summed over all layers."""
        return sum(layer.kv_cache_bytes_per_block(int(block_size)) for layer in self.net.cache_layers())

    def weight_bytes(self) -> int:
        """Bytes of all weight Parameters (a tied embedding counted once)."""
        return self.net.weight_bytes()

    def kv_caches(self) -> list:
        """[(k_cache, v_cache)] Parameters per layer, [num_blocks + 1, block_size, kv_heads, head_dim] (vLLM's
        layout; the last block is scratch for padding)."""
        return [(layer.k_cache, layer.v_cache) for layer in self.net.cache_layers()]

    # ------------------------------------------------------------------ cache
    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_num_seqs: int = 256,
                          max_model_len: int | None = None, max_num_batched_tokens: int = MAX_GRAPH_TOKENS,
                          rows_per_seq: int = 1) -> None:
        """Creates per-layer K/V caches (see kv_caches) and fixes the graphs' shapes: token buckets up to
        min(max_num_batched_tokens, MAX_GRAPH_TOKENS), at most ``max_num_seqs`` requests per step, each with up to
        ``rows_per_seq`` logits rows (1 + speculative drafts), block tables of ceil(max_model_len / block_size)
        entries. Calling it again replaces the caches and drops all graphs."""
        num_blocks, block_size = int(num_blocks), int(block_size)
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive (got {num_blocks}, {block_size})")
        self._gen += 1
        if self._body is not None:
            self._release()
        for layer in self.net.cache_layers():
            layer.allocate_kv_cache(num_blocks, block_size, f"g{self._gen}")
        self.num_blocks, self.block_size = num_blocks, block_size
        max_len = int(max_model_len or self.config.max_position_embeddings)
        self.max_blocks = -(-max_len // block_size)
        # a step holds at most max_num_seqs requests of at most max_len tokens each
        self.buckets = token_buckets(min(int(max_num_batched_tokens), MAX_GRAPH_TOKENS,
                                         max(int(max_num_seqs), 1) * max_len))
        self.max_num_seqs = max(min(int(max_num_seqs), self.buckets[-1]), 1)   # a step has a token per request
        rows = min(self.max_num_seqs * max(int(rows_per_seq), 1), self.buckets[-1])
        self.max_logits_rows = logits_bucket(min(rows, LOGITS_BUCKETS[-1]))
        body, head = _Body(self.net), _Head(self.net)
        body.set_train(False)
        head.set_train(False)
        self._body = ms.jit(body.construct) if self.use_jit else body.construct
        self._head = ms.jit(head.construct) if self.use_jit else head.construct

    # ------------------------------------------------------------------ forward
    def forward(self, batch: FlatBatch) -> np.ndarray:
        """Logits [S, vocab] float32 of ``batch.logits_indices`` (a step longer than the largest graph, or just
        over a bucket, runs as consecutive forwards: batch.token_parts)."""
        if self._body is None:
            raise RuntimeError("allocate_kv_cache() must be called before forward()")
        parts = batch.split(token_parts(batch.num_tokens, self.buckets, self.split_overhead))
        sizes = [token_bucket(p.num_tokens, self.buckets) for p in parts]
        if self.tp.dp_experts:
            parts, sizes = self._agree_forwards(parts, sizes)
        outs = [self._forward_part(part, Tp) for part, Tp in zip(parts, sizes)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    __call__ = forward

    def dummy_forward(self) -> None:
        """This engine's part of a step it has nothing for, with experts over data-parallel engines (their sparse
        layers hold collectives over all of them): one forward of a token that writes nothing."""
        self.forward(self.dummy_batch(1, 0))

    def _agree_forwards(self, parts: list, sizes: list) -> tuple[list, list]:
        """Experts over data-parallel engines: every engine runs as many forwards as the one with the most (dummy
        ones added) and each forward at the largest token bucket of the engines'. One exchange for a step of one
        forward (the count and the first bucket), one more per further forward."""
        n, first = self._agree(len(parts), sizes[0])
        parts = parts + [self.dummy_batch(1, 0)] * (n - len(parts))
        sizes = sizes + [1] * (n - len(sizes))
        return parts, [first] + [self._agree(s)[0] for s in sizes[1:]]

    def _agree(self, *values: int) -> list[int]:
        """The largest of each of ``values`` (counts below 2**24) over the cluster's ranks, gathered outside the
        graphs."""
        if self._max is None:
            from mindspore import ops

            self._max = ops.AllGather()   # MindSpore's CPU AllReduce sums floats only
        got = self._max(Tensor(np.array([values], np.float32))).asnumpy()   # [ranks, len(values)]
        return [int(v) for v in got.max(0)]

    def _pad(self, batch: FlatBatch, Tp: int) -> FlatBatch:
        """``batch`` padded to Tp tokens (a token bucket), with min(Tp, max_num_seqs) request rows and full-width
        block tables; padding rows belong to no request and write nothing (slot -1)."""
        T, R = batch.num_tokens, batch.num_reqs
        Rp = max(min(Tp, self.max_num_seqs), R)
        M = batch.block_tables.shape[1]
        if M > self.max_blocks:
            raise ValueError(f"block tables of {M} blocks exceed max_model_len's {self.max_blocks}")

        def pad(a, n, value):
            out = np.full((n,) + a.shape[1:], value, np.int32)
            out[:a.shape[0]] = a
            return out

        bt = np.full((Rp, self.max_blocks), -1, np.int32)
        bt[:R, :M] = batch.block_tables
        return FlatBatch(pad(batch.input_ids, Tp, 0), pad(batch.positions, Tp, 0), pad(batch.slot_mapping, Tp, -1),
                         pad(batch.query_start_loc, Rp + 1, T), pad(batch.seq_lens, Rp, 0), bt, batch.logits_indices,
                         None if batch.lora_slots is None else pad(batch.lora_slots, Tp, -1))

    def _forward_part(self, batch: FlatBatch, Tp: int) -> np.ndarray:
        padded = self._pad(batch, Tp)
        step = self.net.prepare_inputs(padded, self.num_blocks, self.block_size, batch.num_reqs)
        # None inputs are constants of the graph: the fused path's kernel path (layers.build_fused_attention_metadata)
        # leaves some None, so its body graphs are keyed by the token bucket and which inputs are None (CPU: none)
        nones = tuple(i for i, a in enumerate(step) if a is None)
        hidden = self._run(("body", padded.num_tokens, nones), self._body,
                           [None if a is None else Tensor(a) for a in step])
        rows = batch.logits_indices
        if rows.size == 0:
            return np.zeros((0, self.config.vocab_size), np.float32)
        out = []
        for lo in range(0, rows.size, self.max_logits_rows):
            chunk = rows[lo:lo + self.max_logits_rows]
            S = logits_bucket(chunk.size)
            idx = np.zeros(S, np.int32)
            idx[:chunk.size] = chunk
            logits = self._run(("head", S), self._head, [hidden, Tensor(idx)])
            out.append(logits.asnumpy()[:chunk.size])
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _run(self, key: tuple, fn, inputs: list):
        """Runs a graph, logging its compilation on first use."""
        if key in self.compiled:
            return fn(*inputs)
        t0 = time.perf_counter()
        self.compiling_since = time.monotonic() if self.use_jit else 0.0
        try:
            out = fn(*inputs)
        finally:
            self.compiling_since = 0.0
        self.compiled.add(key)
        if self.use_jit:
            self.graphs_compiled += 1
            log.info("compiled the %s graph of %d rows in %.1f s", key[0], key[1], time.perf_counter() - t0)
        return out

    def dummy_batch(self, num_tokens: int, logits_rows: int = 1) -> FlatBatch:
        """A batch of ``num_tokens`` tokens that writes nothing (slot -1) and reads only the scratch block, split
        into as many requests as a step may hold; logits of its first ``logits_rows`` rows (warm-up, liveness)."""
        T = int(num_tokens)
        n = min(T, self.max_num_seqs)
        counts = np.full(n, T // n, np.int32)
        counts[:T % n] += 1
        qsl = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        bt = np.full((n, -(-int(counts.max()) // self.block_size)), self.num_blocks, np.int32)
        return FlatBatch(np.zeros(T, np.int32), np.concatenate([np.arange(c) for c in counts]).astype(np.int32),
                         np.full(T, -1, np.int32), qsl, counts, bt, np.arange(logits_rows, dtype=np.int32) % T)

    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One forward of ``num_tokens`` tokens (at most the largest graph's) with the logits of ``num_seqs`` rows:
        what a step's activations take at most (vLLM's profile run). Without a KV cache, it runs on a temporary
        one-block cache that it frees again."""
        temporary = self._body is None
        if temporary:
            self.allocate_kv_cache(1, 16, max_num_seqs=num_seqs, max_model_len=num_tokens,
                                   max_num_batched_tokens=num_tokens)
        try:
            T = min(int(num_tokens), self.buckets[-1])
            self.forward(self.dummy_batch(T, min(int(num_seqs), T, self.max_logits_rows)))
        finally:
            if temporary:
                self._release()

    def _release(self) -> None:
        """Drops the KV cache and the graphs compiled with it."""
        self._body = self._head = None
        self.compiled.clear()
        self.num_blocks = self.block_size = None
        for layer in self.net.cache_layers():
            layer.k_cache = layer.v_cache = None
        ms.ms_memory_recycle()
        gc.collect()

    def warmup(self) -> dict:
        """Compiles every graph a step can need: the body per token bucket, the head per logits bucket up to
        max_logits_rows (max_num_seqs as a power of two; prompt logprobs run in chunks of that many rows), with dummy batches. Returns {key: s}.
        On the fused path the dummy batches (prefills) compile the FlashAttentionScore body of each bucket only; its
        PagedAttention bodies (decodes, mixed batches) compile on first use."""
        times = {}
        rows = self.max_logits_rows
        keys = [(T, min(logits_bucket(T), rows)) for T in self.buckets]
        keys += [(1, S) for S in LOGITS_BUCKETS if S <= rows]
        for T, S in keys:
            if any(k[:2] == ("body", T) for k in self.compiled) and ("head", S) in self.compiled:
                continue
            t0 = time.perf_counter()
            self.forward(self.dummy_batch(T, S))
            times[(T, S)] = time.perf_counter() - t0
        return times
