"""--simulate-step-ms: a stand-in for a fast accelerator. No weights are loaded; the forward returns logits that
peak at a deterministic token, a function of the previous token and its position only, so that a request's tokens
do not depend on its batch, chunking or preemption. The rest of the worker (state, sampler, logprobs) is the real
one; the service answers each step after the given time (Service.min_step_s)."""

from __future__ import annotations

import numpy as np

PEAK = 8.0      # the deterministic token's logit; the others fall from 0 to -4 by token id (no ties)


def next_token(token: int, position: int, vocab: int) -> int:
    """The token the simulator predicts after `token` at `position` (ints or integer arrays)."""
    return (token * 7919 + position * 104729 + 13) % vocab


class Simulator:
    def __init__(self, cfg):
        self.cfg = cfg
        self.base = np.linspace(0.0, -4.0, cfg.vocab_size, dtype=np.float32)

    def weight_bytes(self) -> int:
        return 0

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Nothing is cached: the logits need only the tokens."""

    def forward(self, chunks, logits_rows: np.ndarray) -> np.ndarray:
        ids = np.concatenate([ch.ids for ch in chunks])
        positions = np.concatenate([np.arange(ch.start, ch.start + len(ch.ids)) for ch in chunks])
        rows = np.asarray(logits_rows, np.int64)
        vocab = self.cfg.vocab_size
        logits = np.repeat(self.base[None], len(rows), axis=0)
        logits[np.arange(len(rows)), next_token(ids[rows], positions[rows], vocab)] = PEAK
        return logits
