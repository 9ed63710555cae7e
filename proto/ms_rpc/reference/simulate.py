"""--simulate-step-ms: a stand-in for a fast accelerator. No weights are loaded; every forward answers after the
given time with logits that peak at a deterministic token, a function of the previous token and its position
only, so that a request's tokens do not depend on its batch, chunking or preemption. The rest of the worker (state,
sampler, logprobs) is the real one."""

from __future__ import annotations

import time

import numpy as np

PEAK = 8.0      # the deterministic token's logit; every other token's is 0


def next_token(token: int, position: int, vocab: int) -> int:
    """The token the simulator predicts after `token` at `position` (ints or integer arrays)."""
    return (token * 7919 + position * 104729 + 13) % vocab


class Simulator:
    def __init__(self, cfg, step_ms: float):
        self.cfg = cfg
        self.step_s = step_ms / 1000.0
        self.block_size = 0

    def weight_bytes(self) -> int:
        return 0

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size       # nothing is cached: the logits need only the tokens

    def forward(self, chunks, logits_rows: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        ids = np.concatenate([ch.ids for ch in chunks])
        positions = np.concatenate([np.arange(ch.start, ch.start + len(ch.ids)) for ch in chunks])
        rows = np.asarray(logits_rows, np.int64)
        vocab = self.cfg.vocab_size
        logits = np.zeros((len(rows), vocab), np.float32)
        logits[np.arange(len(rows)), next_token(ids[rows], positions[rows], vocab)] = PEAK
        left = self.step_s - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return logits
