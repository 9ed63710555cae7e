"""Turns a step's work items into model inputs, runs the forward pass, and samples.

Continuous batching: decodes (one token each) run as one [B, 1] forward; prefills and prefill chunks run as a
second [B, Q] forward padded to the longest chunk. Both read and write the same paged KV cache through the block
ids vLLM scheduled, so any mix of new, chunked, resumed and decoding requests is served in one step.
"""

from __future__ import annotations

import numpy as np

from ms_worker.sampler import SampleResult, Sampler, prompt_logprobs_chunk
from ms_worker.state import WorkItem


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

    def _forward(self, items: list[WorkItem]) -> np.ndarray:
        return self.model.forward(**build_inputs(items, self.block_size))

    def forward(self, items: list[WorkItem]) -> tuple[dict[int, np.ndarray], dict[int, tuple]]:
        """Logits rows of the items that sample this step, by id(item); and the completed prompt logprobs of
        the items whose prefill finished this step (requests that asked for them)."""
        lp = [it for it in items if it.wants_prompt_logprobs]
        rest = [it for it in items if not it.wants_prompt_logprobs]
        logits_of: dict[int, np.ndarray] = {}
        prompt_done: dict[int, tuple] = {}
        for group in ([it for it in rest if it.count == 1], [it for it in rest if it.count > 1]):
            if group:
                for it, row in zip(group, self._forward(group)):
                    if it.samples:
                        logits_of[id(it)] = row
        if lp:
            all_logits = self.model.forward(**build_inputs(lp, self.block_size), all_positions=True)
            for it, rows in zip(lp, all_logits):
                if it.samples:
                    logits_of[id(it)] = rows[it.count - 1]
                done = prompt_logprobs_chunk(it, rows[: it.count])
                if done is not None:
                    prompt_done[id(it)] = done
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
