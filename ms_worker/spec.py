"""Speculative decoding with n-gram drafts, on the worker, where each request's token history already lives.

- ``propose_ngram``: vLLM's NgramProposer (v1/spec_decode/ngram_proposer.py) in numpy: the longest suffix of
  ``max_n`` down to ``min_n`` tokens that occurred earlier in the request's tokens (the earliest such occurrence),
  and the at most ``k`` tokens that followed it; never past max_model_len.
- ``Position``: a request as seen at one scored position of a step: its tokens up to that position, the drafts
  before it included, so that the sampler's penalties, bad words and min_tokens see what vLLM's rejection sampler
  sees (output tokens + the preceding drafts).
- ``accept``: the tokens a request emits from its per-position samples (the sampler's ``drafts`` argument draws
  them by vLLM's rejection rule): the accepted drafts, then the first differing token, or the bonus token.
"""

from __future__ import annotations

import numpy as np

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
