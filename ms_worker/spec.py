"""Speculative decoding with n-gram drafts, on the worker, where each request's token history already lives.

- ``propose_ngram``: vLLM's NgramProposer (v1/spec_decode/ngram_proposer.py) in numpy: the longest suffix of
  ``max_n`` down to ``min_n`` tokens that occurred earlier in the request's tokens (the earliest such occurrence),
  and the at most ``k`` tokens that followed it; never past max_model_len.
- ``Position``: a request as seen at one scored position of a step: its tokens up to that position, the drafts
  before it included, so that the sampler's penalties, bad words and min_tokens see what vLLM's rejection sampler
  sees (output tokens + the preceding drafts).
- ``accept``: the tokens a request emits from its per-position samples (the sampler's ``drafts`` argument draws
  them by vLLM's rejection rule): the accepted drafts, then the first differing token, or the bonus token.
- ``DraftBudget``: which of the proposed drafts get a row in the next step. A draft costs a row whether it is
  accepted or not, and a step's time moves with its token bucket (SmolLM2 on a 2-vCPU AMD EPYC: 8 decode rows
  54 ms, 8 requests x 4 verify rows 88 ms, 32 decode rows 113 ms): a draft is worth its row only while the tokens the step is expected to emit per second of
  step time grow with it. Outputs do not depend on it (drafts only decide how many tokens a step may emit).
"""

from __future__ import annotations

import numpy as np

from ms_models.batch import token_bucket
from ms_rpc.v1 import FEATURE_SPEC_DECODE_NGRAM as FEATURE, SPEC_METHOD_NGRAM as METHOD  # noqa: F401 (service)
from ms_worker.state import RequestState


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int, max_model_len: int) -> np.ndarray:
    """Drafts for a request whose tokens so far are ``tokens`` (1-D int array)."""
    t = np.asarray(tokens)
    total = t.shape[0]
    k = min(k, max_model_len - total)
    if total < min_n or k <= 0 or max_n <= 0:
        return t[:0]
    # ends[i]: a candidate occurrence ends at index ends[i] (<= total - 2); its match with the suffix grows a token
    # at a time while it lasts (at most max_n).
    ends = np.flatnonzero(t[:total - 1] == t[total - 1])
    length = 0
    while ends.size and length + 1 < max_n:
        prev = ends - (length + 1)
        ok = prev >= 0
        ok[ok] = t[prev[ok]] == t[total - 2 - length]
        if not ok.any():
            break
        ends = ends[ok]
        length += 1
    matched = length + 1 if ends.size else 0
    if matched < min_n:
        return t[:0]
    start = int(ends[0]) + 1                      # the earliest of the longest matches
    return t[start:start + min(k, total - start)]


class Position:
    """Request ``req`` at its scored position ``n``: the sampler reads its first ``n`` tokens as its history."""

    __slots__ = ("req", "n")

    def __init__(self, req: RequestState, n: int):
        self.req, self.n = req, n

    @property
    def req_id(self) -> str:
        return self.req.req_id

    @property
    def sampling(self):
        return self.req.sampling

    @property
    def generator(self):
        return self.req.generator

    @property
    def num_prompt_tokens(self) -> int:
        return self.req.num_prompt_tokens

    @property
    def token_ids(self) -> np.ndarray:
        return self.req.table.token_ids[self.req.row, :self.n]


def accept(drafts: list[int], samples: list[int]) -> int:
    """How many of ``samples`` (one per draft position, then the bonus position) the request emits: each draft
    position's sample is the draft itself when accepted (the sampler draws a rejected position's token from the
    target without the draft), so the emitted tokens run up to and including the first sample that differs from
    its draft, or all of them."""
    for j, d in enumerate(drafts):
        if samples[j] != d:
            return j + 1
    return len(drafts) + 1


class DraftBudget:
    """Keeps, of the drafts proposed after a step, those that maximise the next step's expected tokens per second.

    - Step cost: seconds of forward + sample per token bucket, as this worker measured them (a moving average; a
      bucket not run yet is assumed to cost what the next smaller measured one does, so it gets tried once).
    - Acceptance: a request's i-th draft is accepted with probability a^i, where a is its share of accepted
      drafts among those tried (a draft after a rejected one is not tried), over its last ~10 sampled steps, with
      the share over all requests (last ~100 steps) as the prior: a request without drafts drifts back to the
      prior, so drafting is tried again when the text turns repetitive.
    - Choice: the next step holds ``base_rows`` rows besides drafts; the drafts, most likely accepted first, are
      kept up to the bucket whose (base_rows + expected accepted drafts) / cost is highest (or none)."""

    REQUEST_DECAY = 0.9
    GLOBAL_DECAY = 0.99
    PRIOR = 2.0          # the prior's weight in a request's estimate, in tried drafts

    def __init__(self, buckets: tuple[int, ...]):
        self.buckets = buckets
        self.cost: dict[int, float] = {}          # token bucket -> seconds a step of it takes
        self.hits, self.tries = 1.0, 2.0          # over all requests (prior: a = 0.5)

    def record_step(self, num_tokens: int, seconds: float) -> None:
        if not 0 < num_tokens <= self.buckets[-1]:
            return
        b = token_bucket(num_tokens, self.buckets)
        c = self.cost.get(b)
        self.cost[b] = seconds if c is None else c + (0.5 if seconds < c else 0.2) * (seconds - c)

    def observe(self, req: RequestState, drafted: int, accepted: int) -> None:
        """Request ``req`` sampled a step in which ``accepted`` of its ``drafted`` drafts were accepted."""
        tried = accepted + (accepted < drafted)
        req.draft_hits = self.REQUEST_DECAY * req.draft_hits + accepted
        req.draft_tries = self.REQUEST_DECAY * req.draft_tries + tried
        self.hits += accepted
        self.tries += tried

    def _cost(self, bucket: int) -> float | None:
        known = [self.cost[b] for b in self.buckets if b <= bucket and b in self.cost]
        return self.cost.get(bucket, known[-1] if known else None)

    def choose(self, proposals: list[tuple[RequestState, np.ndarray]], base_rows: int) -> list[np.ndarray]:
        """The drafts to propose: a prefix of each request's ``proposals`` entry."""
        self.hits = self.GLOBAL_DECAY * self.hits + (1 - self.GLOBAL_DECAY) * 1.0
        self.tries = self.GLOBAL_DECAY * self.tries + (1 - self.GLOBAL_DECAY) * 2.0
        sizes = np.array([len(d) for _, d in proposals], np.int64)
        total = int(sizes.sum())
        base_cost = self._cost(token_bucket(base_rows, self.buckets)) if 0 < base_rows <= self.buckets[-1] else None
        if not total or base_cost is None or base_rows + total > self.buckets[-1]:
            return [d for _, d in proposals]
        prior = self.hits / self.tries
        owner = np.repeat(np.arange(len(proposals)), sizes)
        position = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes) + 1
        rate = np.array([(req.draft_hits + self.PRIOR * prior) / (req.draft_tries + self.PRIOR)
                         for req, _ in proposals])
        gain = rate[owner] ** position
        order = np.argsort(-gain, kind="stable")    # a request's earlier drafts first (their gain is not lower)
        expected = np.concatenate([[0.0], np.cumsum(gain[order])])
        best, best_rate = 0, base_rows / base_cost
        for b in self.buckets:
            if b <= base_rows:
                continue
            m = min(b - base_rows, total)
            cost = self._cost(b)
            if (base_rows + expected[m]) / cost > best_rate:
                best, best_rate = m, (base_rows + expected[m]) / cost
            if m == total:
                break
        keep = np.bincount(owner[order[:best]], minlength=len(proposals))
        return [d[:k] for (_, d), k in zip(proposals, keep)]
