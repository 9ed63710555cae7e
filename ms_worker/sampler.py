"""Token sampling on the host, from the logits of each sampling row (numpy, float32), in vLLM's order:

grammar bitmask -> (raw logprobs) -> allowed_token_ids -> bad words -> min_tokens -> logit_bias -> repetition,
frequency and presence penalties -> greedy argmax, or temperature -> min_p -> top-k -> top-p -> draw.

A seeded request draws from its own generator, so its tokens do not depend on what else is batched with it;
others draw from the worker's shared generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms_worker.state import RequestState

_EPS = 1e-5
RAW_LOGPROBS, RAW_LOGITS, PROCESSED_LOGPROBS, PROCESSED_LOGITS = range(4)


@dataclass
class SampleResult:
    token: int
    logprob_token_ids: list[int] | None = None   # sampled token first, then the top-N
    logprobs: list[float] | None = None
    rank: int = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def apply_penalties_and_biases(row: np.ndarray, req: RequestState) -> np.ndarray:
    """Everything before the draw that can change the greedy token (steps 3-6 of vLLM's sampler)."""
    s = req.sampling
    output = req.token_ids[req.num_prompt_tokens:]
    if s.allowed_token_ids:
        mask = np.ones_like(row, dtype=bool)
        mask[s.allowed_token_ids] = False
        row[mask] = -np.inf
    for word in s.bad_words:
        prefix = word[:-1]
        if len(word) <= len(output) + 1 and (not prefix or output[-len(prefix):] == prefix):
            row[word[-1]] = -np.inf
    if s.min_tokens and len(output) < s.min_tokens and s.stop_token_ids:
        row[s.stop_token_ids] = -np.inf
    if s.logit_bias:
        ids = np.fromiter(s.logit_bias.keys(), np.int64)
        row[ids] += np.fromiter(s.logit_bias.values(), np.float32)
    if s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        vocab = row.shape[-1]
        counts = np.bincount(np.asarray(output, np.int64), minlength=vocab)[:vocab]
        if s.repetition_penalty != 1.0:
            seen = counts > 0
            seen[np.asarray(req.token_ids[: req.num_prompt_tokens], np.int64)] = True
            rp = np.float32(s.repetition_penalty)
            row[:] = np.where(seen, np.where(row > 0, row / rp, row * rp), row)
        row -= np.float32(s.frequency_penalty) * counts
        row -= np.float32(s.presence_penalty) * (counts > 0)
    return row


def _truncate(x: np.ndarray, req: RequestState) -> np.ndarray:
    """temperature-scaled logits -> min_p, top-k, top-p masks (masked entries are -inf)."""
    s = req.sampling
    if s.min_p > 0.0:
        p = np.exp(x - x.max())
        x = np.where(p < s.min_p * p.max(), -np.inf, x)
    if 0 < s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x < kth, -np.inf, x)
    if s.top_p < 1.0:
        order = np.argsort(x, kind="stable")                 # ascending, as vLLM's top-p
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        drop = np.cumsum(p) <= 1.0 - s.top_p
        drop[-1] = False                                     # always keep the most likely token
        x = x.copy()
        x[order[drop]] = -np.inf
    return x


def prompt_logprobs_chunk(item, logits: np.ndarray) -> tuple | None:
    """Logprobs of the prompt tokens this chunk predicts (as vLLM: row j scores prompt token j+1), accumulated on
    the request; returns (token_ids, logprobs, ranks) arrays of shape [P-1, N+1] once the prompt is complete."""
    req, s = item.req, item.req.sampling
    p = req.num_prompt_tokens
    n = min(s.prompt_logprobs, logits.shape[-1])     # -1 (all) arrives as 2**32 - 1
    if req.prompt_lp is None:
        req.prompt_lp = (np.zeros((p - 1, n + 1), np.int32), np.zeros((p - 1, n + 1), np.float32),
                         np.zeros((p - 1,), np.int32))
    ids, lps, ranks = req.prompt_lp
    k = min(item.count, p - 1 - item.start)
    if k > 0:
        x = logits[:k].astype(np.float32)
        scores = x if s.logprobs_mode in (RAW_LOGITS, PROCESSED_LOGITS) else log_softmax(x)
        targets = np.asarray(req.token_ids[item.start + 1: item.start + 1 + k], np.int64)
        rows = np.arange(k)
        picked = scores[rows, targets]
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :n]
        sl = slice(item.start, item.start + k)
        ids[sl, 0], lps[sl, 0] = targets, picked
        ids[sl, 1:], lps[sl, 1:] = top, np.take_along_axis(scores, top, axis=-1)
        ranks[sl] = (scores >= picked[:, None]).sum(-1)
    if item.start + item.count >= p:
        req.prompt_lp = None
        return ids, lps, ranks
    return None


class Sampler:
    def __init__(self, seed: int | None = None):
        """``seed``: of the shared generator that requests without their own seed draw from (CacheConfig's
        sampling_seed); None or 0 = a random one. Tensor-parallel ranks get the same seed and sample the same
        steps in the same order from the same (all-gathered) logits, so their draws, and the tokens they record
        in each request's state, stay identical."""
        self.rng = np.random.default_rng(seed or None)

    def sample(self, logits: np.ndarray, reqs: list[RequestState],
               allowed: list[np.ndarray | None] | None = None) -> list[SampleResult]:
        """logits: [N, vocab] float32, one row per request that samples this step; `allowed[i]` is a boolean
        grammar mask for row i (None = unconstrained)."""
        out: list[SampleResult] = []
        for i, req in enumerate(reqs):
            s = req.sampling
            row = np.array(logits[i], dtype=np.float32)
            if allowed is not None and allowed[i] is not None:
                row[~allowed[i]] = -np.inf
            raw = row.copy() if s.want_logprobs else None
            row = apply_penalties_and_biases(row, req)
            if s.temperature < _EPS:
                token = int(np.argmax(row))
                processed = row
            else:
                processed = _truncate(row / np.float32(s.temperature), req)
                p = np.exp(processed.astype(np.float64) - processed.max())
                rng = req.generator if req.generator is not None else self.rng
                # Exponential race (as vLLM): argmax p / E with E ~ Exp(1) draws the token with probability p.
                token = int(np.argmax(p / rng.exponential(size=p.shape[-1])))
            res = SampleResult(token)
            if s.want_logprobs:
                mode = s.logprobs_mode
                base = raw if mode in (RAW_LOGPROBS, RAW_LOGITS) else processed
                lp = log_softmax(base) if mode in (RAW_LOGPROBS, PROCESSED_LOGPROBS) else base
                top = np.argsort(-lp, kind="stable")[: s.logprobs] if s.logprobs > 0 else np.empty(0, np.int64)
                res.logprob_token_ids = [token] + [int(t) for t in top]
                res.logprobs = [float(lp[token])] + [float(lp[t]) for t in top]
                res.rank = int((lp >= lp[token]).sum())       # as vLLM: ties count
            out.append(res)
        return out
