"""Sampling one token per row of logits, in the contract's order (ms_rpc.v1 SamplingParams): grammar bitmask ->
(raw logprobs) -> allowed_token_ids -> bad_words -> min_tokens -> logit_bias -> repetition, frequency and presence
penalties -> greedy argmax, or temperature -> min_p -> top-k -> top-p -> a draw. A seeded request draws from its
own generator (so its tokens do not depend on its batch), the others from the worker's shared one.

Logprobs per row, in the request's LogprobsMode: the sampled token's, the top-N (ties by token id) or those of the
request's logprob_token_ids, and its rank (the number of tokens scoring at least as high).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .state import Request

GREEDY_BELOW = 1e-5                    # a temperature below this is greedy
RAW_LOGPROBS, RAW_LOGITS, PROCESSED_LOGPROBS, PROCESSED_LOGITS = range(4)


@dataclass
class Sampled:
    token: int
    logprob_ids: list[int] | None = None   # the sampled token, then the top-N or the logprob_token_ids
    logprobs: list[float] | None = None
    rank: int = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_n(row: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores of a row, highest first, ties by index (a stable argsort's first n), from
    the candidates at or above the n-th highest score."""
    n = min(n, row.shape[-1])
    if n <= 0:
        return np.empty(0, np.int64)
    if 8 * n >= row.shape[-1]:
        return np.argsort(-row, kind="stable")[:n]
    cand = np.flatnonzero(row >= np.partition(row, row.shape[-1] - n)[row.shape[-1] - n])
    return cand[np.lexsort((cand, -row[cand]))][:n]


def wants_logprobs(p) -> bool:
    return p.want_logprobs or len(p.logprob_token_ids) > 0


def _scores(x: np.ndarray, mode: int) -> np.ndarray:
    return x if mode in (RAW_LOGITS, PROCESSED_LOGITS) else log_softmax(x)


def _process(x: np.ndarray, req: Request, structured: bool) -> None:
    """allowed_token_ids, bad_words, min_tokens, logit_bias and the penalties, in place on one row. A
    ``structured`` row that min_tokens would leave with no token at all keeps its stop tokens (the grammar allows
    nothing else)."""
    p, out = req.sampling, req.output
    if p.allowed_token_ids:
        keep = np.zeros(x.shape, bool)
        keep[list(p.allowed_token_ids)] = True
        x[~keep] = -np.inf
    for word in p.bad_words:
        w = list(word.token_ids)
        if w and len(w) - 1 <= len(out) and (len(w) == 1 or out[len(out) - len(w) + 1:] == w[:-1]):
            x[w[-1]] = -np.inf
    if p.min_tokens and len(out) < p.min_tokens and p.stop_token_ids:
        stops = list(p.stop_token_ids)
        kept = x[stops]
        x[stops] = -np.inf
        if structured and np.isneginf(x).all():
            x[stops] = kept
    for t, b in p.logit_bias.items():
        x[t] += np.float32(b)
    rep = p.repetition_penalty or 1.0
    if rep != 1.0:
        seen = np.unique(np.asarray(req.tokens, np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / np.float32(rep), v * np.float32(rep))
    if (p.frequency_penalty or p.presence_penalty) and out:
        counts = np.bincount(np.asarray(out, np.int64), minlength=x.shape[-1])
        x -= np.float32(p.frequency_penalty) * counts + np.float32(p.presence_penalty) * (counts > 0)


def _truncate(x: np.ndarray, p) -> np.ndarray:
    """min_p, top-k, top-p on temperature-scaled logits: the tokens they drop become -inf."""
    if p.min_p > 0:
        prob = np.exp(x - x.max())
        x = np.where(prob < p.min_p * prob.max(), -np.inf, x).astype(np.float32)
    if 0 < p.top_k < x.shape[-1]:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x).astype(np.float32)
    if 0 < p.top_p < 1:
        order = np.argsort(x, kind="stable")             # ascending: the least likely tokens go first
        prob = np.exp(x[order] - x.max())
        drop = np.cumsum(prob / prob.sum()) <= 1 - p.top_p
        drop[-1] = False                                 # the most likely token always stays
        x = x.copy()
        x[order[drop]] = -np.inf
    return x


class Sampler:
    def __init__(self, seed: int):
        """`seed`: of the shared generator (CacheConfig.sampling_seed); 0 = a random one."""
        self.rng = np.random.default_rng(seed or None)

    def sample(self, req: Request, logits: np.ndarray, allowed: np.ndarray | None = None) -> Sampled:
        """The next token of `req` from its logits row [vocab]; `allowed`: its grammar bitmask row (booleans)."""
        p = req.sampling
        x = np.array(logits, np.float32)
        if allowed is not None:
            x[~allowed] = -np.inf
        raw = x.copy() if wants_logprobs(p) and p.logprobs_mode in (RAW_LOGPROBS, RAW_LOGITS) else None
        _process(x, req, allowed is not None)
        if p.temperature < GREEDY_BELOW:
            token = int(np.argmax(x))
        else:
            x = _truncate(x / np.float32(p.temperature), p)
            prob = np.exp(x.astype(np.float64) - x.max())
            rng = req.generator if req.generator is not None else self.rng
            cdf = np.cumsum(prob)
            token = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
            while prob[token] == 0:                      # a draw on a boundary never lands on a dropped token
                token -= 1
        out = Sampled(token)
        if wants_logprobs(p):
            base = raw if p.logprobs_mode in (RAW_LOGPROBS, RAW_LOGITS) else x
            scores = _scores(base, p.logprobs_mode)
            top = np.asarray(p.logprob_token_ids, np.int64) if p.logprob_token_ids else top_n(scores, p.logprobs)
            out.logprob_ids = [token, *top.tolist()]
            out.logprobs = [float(scores[token]), *scores[top].tolist()]
            out.rank = int((scores >= scores[token]).sum())
        return out


def prompt_rows(start: int, count: int, num_prompt: int) -> range:
    """The positions of a chunk [start, start + count) whose logits score a prompt token (the next one)."""
    return range(start, min(start + count, num_prompt - 1))


def prompt_logprobs(req: Request, start: int, count: int, logits: np.ndarray) -> tuple | None:
    """Logprobs of the prompt tokens that a chunk [start, start + count) predicts, from the logits rows [k, vocab] of
    its prompt_rows (row j scores prompt token start+j+1), kept on the request; in the chunk that completes the
    prompt, (token_ids, logprobs [P-1, N+1], ranks [P-1]) with N = min(prompt_logprobs, vocabulary)."""
    p = req.sampling
    n = min(p.prompt_logprobs, logits.shape[-1])
    scores = _scores(np.asarray(logits, np.float32), p.logprobs_mode)
    for j, row in enumerate(scores):
        target = req.tokens[start + j + 1]
        top = top_n(row, n)
        req.prompt_rows[start + j] = ([target, *top.tolist()], [float(row[target]), *row[top].tolist()],
                                      int((row >= row[target]).sum()))
    if start + count < req.num_prompt:
        return None
    rows = [req.prompt_rows[i] for i in range(req.num_prompt - 1)]
    req.prompt_rows = {}
    return (np.array([r[0] for r in rows], np.int32).reshape(-1, n + 1),
            np.array([r[1] for r in rows], np.float32).reshape(-1, n + 1), np.array([r[2] for r in rows], np.int32))
