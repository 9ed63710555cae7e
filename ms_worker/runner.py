"""Turns a step's work items into model inputs, runs the forward pass, and samples.

Continuous batching: decodes (one token each) run as one [B, 1] forward; prefills and prefill chunks run as a
second [B, Q] forward padded to the longest chunk. Both read and write the same paged KV cache through the block
ids vLLM scheduled, so any mix of new, chunked, resumed and decoding requests is served in one step. A forward
holds at most MAX_FORWARD_TOKENS padded tokens; bigger groups run as several forwards, in order.
"""

from __future__ import annotations

import numpy as np

from ms_worker.sampler import SampleResult, Sampler, prompt_logprobs_chunk
from ms_worker.state import WorkItem

# Padded tokens (B x Q after the model's power-of-two bucketing) in one forward. Each compiled bucket graph keeps
# host memory that grows with its tokens, and a step's activations (the attention scores are [B, heads, Q, L])
# with them too; past a few hundred tokens a bigger forward is no faster, it only costs memory.
MAX_FORWARD_TOKENS = 512


def split_forwards(items: list[WorkItem], padded_tokens, limit: int = MAX_FORWARD_TOKENS) -> list[list[WorkItem]]:
    """`items` as consecutive forwards of at most `limit` padded tokens (``padded_tokens(b, q)``: B x Q as the model
    pads them). An item longer than `limit` runs as pieces of `limit` tokens, one per forward, in order: each piece
    then reads the K/V its predecessors wrote."""
    pieces = [WorkItem(it.req, start, min(limit, it.start + it.count - start))
              for it in items for start in range(it.start, it.start + it.count, limit)]
    forwards: list[list[WorkItem]] = []
    for piece in pieces:
        group = forwards[-1] + [piece] if forwards else []
        if group and padded_tokens(len(group), max(p.count for p in group)) <= limit:
            forwards[-1] = group
        else:
            forwards.append([piece])
    return forwards


def build_inputs(items: list[WorkItem], block_size: int) -> dict[str, np.ndarray]:
    """Padded [B, Q] inputs for one forward over `items`. Padding slots and blocks are -1."""
    b = len(items)
    q = max(it.count for it in items)
    m = max(-(-(it.start + it.count) // block_size) for it in items)
    input_ids = np.zeros((b, q), np.int32)
    positions = np.zeros((b, q), np.int32)
    slots = np.full((b, q), -1, np.int32)
    tables = np.full((b, m), -1, np.int32)
    logits_idx = np.zeros((b,), np.int32)
    for i, it in enumerate(items):
        pos = np.arange(it.start, it.start + it.count, dtype=np.int32)
        blocks = np.asarray(it.req.block_ids, np.int32)
        need = -(-(it.start + it.count) // block_size)
        input_ids[i, : it.count] = it.req.token_ids[it.start : it.start + it.count]
        positions[i, : it.count] = pos
        slots[i, : it.count] = blocks[pos // block_size] * block_size + pos % block_size
        tables[i, :need] = blocks[:need]
        logits_idx[i] = it.count - 1
    return dict(input_ids=input_ids, positions=positions, slot_mapping=slots, block_tables=tables,
                logits_indices=logits_idx)


class ModelRunner:
    def __init__(self, model, block_size: int, sampler: Sampler):
        self.model = model
        self.block_size = block_size
        self.sampler = sampler

    def _forwards(self, items: list[WorkItem], all_positions: bool = False):
        """(piece, logits) for every piece of `items` (see split_forwards), in order; logits [vocab], or
        [count, vocab] with `all_positions`."""
        def padded_tokens(b: int, q: int) -> int:
            bp, qp, _ = self.model.bucket_shape(b, q, 1)
            return bp * qp

        for pieces in split_forwards(items, padded_tokens):
            logits = self.model.forward(**build_inputs(pieces, self.block_size), all_positions=all_positions)
            yield from zip(pieces, logits)

    def forward(self, items: list[WorkItem]) -> tuple[dict[int, np.ndarray], dict[int, tuple]]:
        """Logits rows of the items that sample this step, by id(item); and the completed prompt logprobs of
        the items whose prefill finished this step (requests that asked for them)."""
        lp = [it for it in items if it.wants_prompt_logprobs]
        rest = [it for it in items if not it.wants_prompt_logprobs]
        item_of = {id(it.req): it for it in items}   # a request has one item per step; pieces map back to it
        logits_of: dict[int, np.ndarray] = {}
        prompt_done: dict[int, tuple] = {}
        for group in ([it for it in rest if it.count == 1], [it for it in rest if it.count > 1]):
            for piece, row in self._forwards(group):
                if piece.samples:
                    logits_of[id(item_of[id(piece.req)])] = row
        for piece, rows in self._forwards(lp, all_positions=True):
            if piece.samples:
                logits_of[id(item_of[id(piece.req)])] = rows[piece.count - 1]
            done = prompt_logprobs_chunk(piece, rows[: piece.count])
            if done is not None:
                prompt_done[id(item_of[id(piece.req)])] = done
        return logits_of, prompt_done

    def sample(self, items: list[WorkItem], logits_of: dict[int, np.ndarray],
               allowed: dict[str, np.ndarray] | None = None) -> list[tuple[WorkItem, SampleResult | None]]:
        samplers = [it for it in items if it.samples]
        sampled: dict[int, SampleResult] = {}
        if samplers:
            rows = np.stack([logits_of[id(it)] for it in samplers])
            masks = [(allowed or {}).get(it.req.req_id) for it in samplers]
            res = self.sampler.sample(rows, [it.req for it in samplers], masks)
            sampled = {id(it): r for it, r in zip(samplers, res)}
        return [(it, sampled.get(id(it))) for it in items]
