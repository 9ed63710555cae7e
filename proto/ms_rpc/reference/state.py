"""The requests a worker holds, by id, and how a StepRequest's deltas change them.

`Requests.apply(step)` checks the whole step against what the worker holds and its limits first, then applies it:
a step it refuses (StepRefused) changes nothing. With refuse_alone, a request whose delta is bad is left out of
the step and dropped, and the others go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class StepRefused(ValueError):
    """A step (or with refuse_alone, one request's delta) the worker cannot apply; nothing was changed."""


@dataclass
class Request:
    req_id: str
    num_prompt: int
    sampling: object                       # ms_rpc.v1 SamplingParams
    tokens: list[int]                      # prompt + every output token so far
    blocks: list[int]
    generator: np.random.Generator | None = None   # a seeded request's own
    prompt_rows: dict = field(default_factory=dict)  # prompt position -> its logprob row, until the prefill ends

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]


@dataclass
class Scheduled:
    """Compute tokens [start, start + count) of `req`; it samples when that reaches its last token."""

    req: Request
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count >= len(self.req.tokens)


@dataclass
class Plan:
    scheduled: list[Scheduled]
    refused: dict[str, str]                # req_id -> why, requests refused alone


@dataclass(frozen=True)
class Limits:
    num_blocks: int
    block_size: int
    vocab_size: int
    max_model_len: int
    max_num_seqs: int            # 0 = not given
    max_num_batched_tokens: int  # 0 = not given

    @property
    def max_blocks(self) -> int:
        return -(-self.max_model_len // self.block_size)


def check_sampling(rid: str, p, vocab: int) -> None:
    """Sampling parameters the sampler cannot apply: the ranges vLLM accepts, finite numbers, token ids in the
    vocabulary."""
    def refuse(name, value, want):
        raise StepRefused(f"request {rid!r}: sampling {name} {value!r} is not {want}")

    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        refuse("temperature", p.temperature, "a finite number >= 0")
    if not (math.isfinite(p.top_p) and 0 <= p.top_p <= 1):
        refuse("top_p", p.top_p, "in (0, 1] (0 = unset)")
    if p.top_k < -1:
        refuse("top_k", p.top_k, ">= -1")
    if not (math.isfinite(p.min_p) and 0 <= p.min_p <= 1):
        refuse("min_p", p.min_p, "in [0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not (math.isfinite(v) and -2 <= v <= 2):
            refuse(name, v, "in [-2, 2]")
    if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty >= 0):
        refuse("repetition_penalty", p.repetition_penalty, "a finite number > 0 (0 = unset)")
    if p.logprobs_mode not in range(4):
        refuse("logprobs_mode", p.logprobs_mode, "a LogprobsMode")
    if not all(math.isfinite(b) for b in p.logit_bias.values()):
        refuse("logit_bias", dict(p.logit_bias), "finite")
    ids = [*p.logit_bias, *p.allowed_token_ids, *p.stop_token_ids, *(t for w in p.bad_words for t in w.token_ids),
           *p.logprob_token_ids]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        refuse("token ids", bad[:5], f"in the vocabulary (0..{vocab - 1})")


class Requests:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.held: dict[str, Request] = {}

    def __len__(self) -> int:
        return len(self.held)

    # -- checks of one delta -----------------------------------------------------------------------------------
    def _tokens(self, rid: str, ids) -> list[int]:
        ids = list(ids)
        bad = [t for t in ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise StepRefused(f"request {rid!r}: token ids {bad[:5]} outside the vocabulary "
                              f"(0..{self.limits.vocab_size - 1})")
        if len(ids) > self.limits.max_model_len:
            raise StepRefused(f"request {rid!r}: {len(ids)} tokens exceed max_model_len {self.limits.max_model_len}")
        return ids

    def _blocks(self, rid: str, ids, already: int) -> list[int]:
        L = self.limits
        bad = [b for b in ids if not 0 <= b < L.num_blocks]
        if bad:
            raise StepRefused(f"request {rid!r}: block ids {bad[:5]} outside the KV cache (0..{L.num_blocks - 1})")
        if already + len(ids) > L.max_blocks:
            raise StepRefused(f"request {rid!r}: {already + len(ids)} blocks exceed max_model_len's {L.max_blocks} "
                              f"blocks of {L.block_size}")
        return list(ids)

    def _span(self, rid: str, n_tokens: int, start: int, count: int, n_blocks: int, drafts) -> None:
        if len(drafts):
            raise StepRefused(f"request {rid!r}: speculative drafts, which this worker does not verify")
        if count <= 0:
            raise StepRefused(f"request {rid!r}: scheduled {count} tokens")
        if start + count > n_tokens:
            raise StepRefused(f"request {rid!r}: asked to compute tokens {start}..{start + count} but only "
                              f"{n_tokens} are known to the worker")
        if start + count > n_blocks * self.limits.block_size:
            raise StepRefused(f"request {rid!r}: {start + count} tokens need more than its {n_blocks} blocks of "
                              f"{self.limits.block_size}")

    def _stage_new(self, d, finished) -> tuple:
        rid = d.req_id
        if rid in self.held and rid not in finished:
            raise StepRefused(f"request {rid!r} is already held; a new request needs a new id")
        tokens = self._tokens(rid, d.prompt_token_ids)
        if not tokens:
            raise StepRefused(f"request {rid!r} has an empty prompt")
        check_sampling(rid, d.sampling, self.limits.vocab_size)
        blocks = self._blocks(rid, d.block_ids, 0)
        self._span(rid, len(tokens), d.num_computed_tokens, d.num_scheduled_tokens, len(blocks), d.draft_token_ids)
        return rid, tokens, blocks, d

    def _stage_cached(self, d, finished) -> tuple:
        rid = d.req_id
        req = None if rid in finished else self.held.get(rid)
        if req is None:
            raise StepRefused(f"request {rid!r} is not held by the worker (never sent, finished or refused)")
        tokens = None
        if d.all_token_ids:
            tokens = self._tokens(rid, d.all_token_ids)
        if d.new_token_ids:
            base = tokens if tokens is not None else req.tokens
            new = list(d.new_token_ids)
            joined = base[:d.num_computed_tokens] + new if d.num_computed_tokens < len(base) else base + new
            tokens = self._tokens(rid, joined)
        if tokens is not None and len(tokens) < req.num_prompt:
            raise StepRefused(f"request {rid!r}: {len(tokens)} tokens are fewer than its prompt of {req.num_prompt}")
        n_tokens = len(req.tokens) if tokens is None else len(tokens)
        already = 0 if d.resumed else len(req.blocks)
        blocks = self._blocks(rid, d.new_block_ids, already)
        self._span(rid, n_tokens, d.num_computed_tokens, d.num_scheduled_tokens, already + len(blocks),
                   d.draft_token_ids)
        return req, tokens, blocks, d

    # -- the step ------------------------------------------------------------------------------------------------
    def apply(self, step) -> Plan:
        L = self.limits
        finished = set(step.finished_req_ids)
        seen: set[str] = set()
        refused: dict[str, str] = {}
        staged = []                        # (is_new, staged tuple), in scheduling order
        for is_new, deltas in ((True, step.new_requests), (False, step.cached_requests)):
            for d in deltas:
                if d.req_id in seen:
                    raise StepRefused(f"request {d.req_id!r} scheduled twice in one step")
                seen.add(d.req_id)
                try:
                    staged.append((is_new, (self._stage_new if is_new else self._stage_cached)(d, finished)))
                except StepRefused as e:
                    if not step.refuse_alone:
                        raise
                    refused[d.req_id] = str(e)
        deltas = [*step.new_requests, *step.cached_requests]
        total = sum(d.num_scheduled_tokens for d in deltas)
        if total != step.total_num_scheduled_tokens:
            raise StepRefused(f"per-request scheduled tokens add up to {total}, the step says "
                              f"{step.total_num_scheduled_tokens}")
        if L.max_num_seqs and len(deltas) > L.max_num_seqs:
            raise StepRefused(f"{len(deltas)} requests scheduled in one step, more than max_num_seqs "
                              f"{L.max_num_seqs}")
        if L.max_num_batched_tokens and total > L.max_num_batched_tokens:
            raise StepRefused(f"{total} tokens scheduled in one step, more than max_num_batched_tokens "
                              f"{L.max_num_batched_tokens}")

        for rid in (*step.finished_req_ids, *refused):
            self.held.pop(rid, None)
        scheduled = []
        for is_new, s in staged:
            if is_new:
                rid, tokens, blocks, d = s
                p = d.sampling
                req = Request(rid, len(tokens), p, tokens, blocks,
                              np.random.default_rng(p.seed) if p.HasField("seed") else None)
                self.held[rid] = req
            else:
                req, tokens, blocks, d = s
                if tokens is not None:
                    req.tokens = tokens
                req.blocks = blocks if d.resumed else req.blocks + blocks
            scheduled.append(Scheduled(req, d.num_computed_tokens, d.num_scheduled_tokens))
        return Plan(scheduled, refused)
