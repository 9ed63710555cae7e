"""Token sampling on the host, from the logits of each sampling row (numpy, float32).

Greedy when temperature is 0; otherwise temperature, then top-k, top-p and min-p filtering, then a draw from the
request's own generator when it has a seed (so its tokens do not depend on what else is batched with it), or from
the worker's shared generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms_worker.state import Sampling

_EPS = 1e-5


@dataclass
class SampleResult:
    token: int
    logprob_token_ids: list[int] | None = None   # sampled token first, then the top-N
    logprobs: list[float] | None = None
    rank: int = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _filtered_probs(logits: np.ndarray, s: Sampling) -> np.ndarray:
    x = logits.astype(np.float64) / max(s.temperature, _EPS)
    if 0 < s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cut = int(np.searchsorted(cum, s.top_p)) + 1
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p = np.where(keep, p, 0.0)
    if s.min_p > 0.0:
        p = np.where(p < s.min_p * p.max(), 0.0, p)
    return p / p.sum()


class Sampler:
    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, params: list[Sampling], generators: list) -> list[SampleResult]:
        """logits: [N, vocab] float32, one row per request that samples this step."""
        out: list[SampleResult] = []
        need_lp = any(p.want_logprobs for p in params)
        logprobs_all = log_softmax(logits) if need_lp else None
        for i, s in enumerate(params):
            row = logits[i]
            if s.temperature <= _EPS:
                token = int(np.argmax(row))
            else:
                probs = _filtered_probs(row, s)
                rng = generators[i] if generators[i] is not None else self.rng
                token = int(rng.choice(probs.shape[-1], p=probs))
            res = SampleResult(token)
            if s.want_logprobs:
                lp = logprobs_all[i]
                top = np.argsort(-lp, kind="stable")[: s.logprobs] if s.logprobs > 0 else np.empty(0, np.int64)
                res.logprob_token_ids = [token] + [int(t) for t in top]
                res.logprobs = [float(lp[token])] + [float(lp[t]) for t in top]
                res.rank = int((lp > lp[token]).sum()) + 1
            out.append(res)
        return out
