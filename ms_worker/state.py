"""Per-request state held by id on the worker, updated by each step's deltas (like vLLM's InputBatch).

A step message names new requests once (prompt, sampling parameters, block ids), and afterwards only what
changed: new block ids, the computed-token count, and on resumption the full token list. `BatchState.apply`
turns one StepRequest into the list of work items the runner computes, and validates everything the front sent
against what the worker knows, so a bad message is refused before any state changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class StepError(ValueError):
    """A step message the worker cannot apply. It is refused whole; worker state is unchanged."""


LOGPROBS_MODES = frozenset(range(4))    # ms_rpc.v1.LogprobsMode: RAW_LOGPROBS .. PROCESSED_LOGITS


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: int = 0
    want_logprobs: bool = False
    logprobs_mode: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: int | None = None

    @classmethod
    def from_proto(cls, p) -> "Sampling":
        return cls(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p if p.top_p > 0 else 1.0,
            min_p=p.min_p,
            seed=p.seed if p.HasField("seed") else None,
            logprobs=p.logprobs,
            want_logprobs=p.want_logprobs,
            logprobs_mode=p.logprobs_mode,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty or 1.0,
            logit_bias=dict(p.logit_bias),
            allowed_token_ids=list(p.allowed_token_ids),
            bad_words=[list(w.token_ids) for w in p.bad_words if w.token_ids],
            min_tokens=p.min_tokens,
            stop_token_ids=list(p.stop_token_ids),
            prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        )

    def token_ids_used(self) -> list[int]:
        """Every token id the parameters name (checked against the vocabulary)."""
        ids = list(self.logit_bias) + self.allowed_token_ids + self.stop_token_ids
        return ids + [t for w in self.bad_words for t in w]


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]            # prompt + every sampled token so far
    num_prompt_tokens: int
    block_ids: list[int]
    sampling: Sampling
    num_computed_tokens: int = 0
    generator: np.random.Generator | None = field(default=None, repr=False)
    prompt_lp: tuple | None = field(default=None, repr=False)   # prompt logprobs accumulated over chunks


@dataclass
class WorkItem:
    """One request's share of a step: compute tokens [start, start + count) of `req.token_ids`."""

    req: RequestState
    start: int
    count: int

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.req.sampling.prompt_logprobs is not None and self.start + 1 < self.req.num_prompt_tokens

    @property
    def samples(self) -> bool:
        # A partial (chunked) prefill produces no token; the last chunk and every decode do.
        return self.start + self.count >= len(self.req.token_ids)


def check_sampling(req_id: str, p) -> None:
    """Refuse sampling parameters (a SamplingParams message) that no sampler can apply: the ranges vLLM's own
    SamplingParams accepts, minus what the sampler's arithmetic cannot take (NaN, inf). 0 stands for "unset" where
    the contract says so (top_p, repetition_penalty)."""
    def bad(name: str, value, want: str) -> StepError:
        return StepError(f"request {req_id!r}: sampling {name} {value!r} is not {want}")

    finite = math.isfinite
    if not (finite(p.temperature) and p.temperature >= 0.0):
        raise bad("temperature", p.temperature, "a finite number >= 0")
    if not (finite(p.top_p) and 0.0 <= p.top_p <= 1.0):
        raise bad("top_p", p.top_p, "in (0, 1] (0 = unset)")
    if p.top_k < -1:
        raise bad("top_k", p.top_k, ">= -1 (0 and -1 = disabled)")
    if not (finite(p.min_p) and 0.0 <= p.min_p <= 1.0):
        raise bad("min_p", p.min_p, "in [0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not (finite(v) and -2.0 <= v <= 2.0):
            raise bad(name, v, "in [-2, 2]")
    if not (finite(p.repetition_penalty) and p.repetition_penalty >= 0.0):
        raise bad("repetition_penalty", p.repetition_penalty, "a finite number > 0 (0 = unset)")
    if p.logprobs_mode not in LOGPROBS_MODES:
        raise bad("logprobs_mode", p.logprobs_mode, f"one of {sorted(LOGPROBS_MODES)}")
    nonfinite = [t for t, b in p.logit_bias.items() if not finite(b)]
    if nonfinite:
        raise bad("logit_bias", {t: p.logit_bias[t] for t in nonfinite[:3]}, "finite")


class BatchState:
    def __init__(self, num_blocks: int, vocab_size: int, max_model_len: int, max_num_seqs: int = 0,
                 max_num_batched_tokens: int = 0):
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # The front's scheduling budgets (from InitializeCache; 0 = not given): vLLM's scheduler never exceeds
        # them, so a step that does is refused rather than run as an arbitrarily large batch.
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.requests: dict[str, RequestState] = {}

    # -- validation helpers ---------------------------------------------------------------------------
    def _check_blocks(self, req_id: str, block_ids) -> list[int]:
        ids = list(block_ids)
        bad = [b for b in ids if b < 0 or b >= self.num_blocks]
        if bad:
            raise StepError(f"request {req_id!r}: block ids {bad[:5]} outside the KV cache (0..{self.num_blocks - 1})")
        return ids

    def _check_tokens(self, req_id: str, token_ids) -> list[int]:
        ids = list(token_ids)
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise StepError(f"request {req_id!r}: token ids {bad[:5]} outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def _check_length(self, req_id: str, tokens: list[int], num_prompt_tokens: int) -> None:
        """A request's token list (prompt + outputs) as the front sent it: within max_model_len, and never shorter
        than the prompt the worker holds (all_token_ids always starts with the whole prompt)."""
        if len(tokens) > self.max_model_len:
            raise StepError(f"request {req_id!r}: {len(tokens)} tokens exceed max_model_len {self.max_model_len}")
        if len(tokens) < num_prompt_tokens:
            raise StepError(f"request {req_id!r}: {len(tokens)} tokens are fewer than its prompt of "
                            f"{num_prompt_tokens}")

    def _check_span(self, req: RequestState, start: int, count: int, num_blocks: int, block_size: int) -> None:
        rid = req.req_id
        if count <= 0:
            raise StepError(f"request {rid!r}: scheduled {count} tokens")
        if start + count > len(req.token_ids):
            raise StepError(
                f"request {rid!r}: asked to compute tokens {start}..{start + count} but only "
                f"{len(req.token_ids)} are known to the worker"
            )
        if start + count > self.max_model_len:
            raise StepError(f"request {rid!r}: {start + count} tokens exceed max_model_len {self.max_model_len}")
        if start + count > num_blocks * block_size:
            raise StepError(
                f"request {rid!r}: {start + count} tokens need more than its {num_blocks} blocks of {block_size}"
            )

    # -- the delta ----------------------------------------------------------------------------------------
    def apply(self, step, block_size: int) -> list[WorkItem]:
        """Validate `step` fully, then apply it. Returns the work items in scheduling order."""
        # Phase 1: validate and build the new per-request values without touching state.
        finished = set(step.finished_req_ids)
        seen: set[str] = set()
        staged: list[tuple[str, RequestState, int, int]] = []   # (kind, state, start, count)
        for nr in step.new_requests:
            rid = nr.req_id
            if rid in seen:
                raise StepError(f"request {rid!r} scheduled twice in one step")
            seen.add(rid)
            if rid in self.requests and rid not in finished:
                raise StepError(f"request {rid!r} is already known to the worker; a new request must have a new id")
            tokens = self._check_tokens(rid, nr.prompt_token_ids)
            if not tokens:
                raise StepError(f"request {rid!r} has an empty prompt")
            self._check_length(rid, tokens, len(tokens))
            check_sampling(rid, nr.sampling)
            sampling = Sampling.from_proto(nr.sampling)
            self._check_tokens(rid, sampling.token_ids_used())
            req = RequestState(rid, tokens, len(tokens), self._check_blocks(rid, nr.block_ids), sampling,
                               num_computed_tokens=nr.num_computed_tokens)
            self._check_span(req, nr.num_computed_tokens, nr.num_scheduled_tokens, len(req.block_ids), block_size)
            staged.append(("new", req, nr.num_computed_tokens, nr.num_scheduled_tokens))

        updates = []
        for cr in step.cached_requests:
            rid = cr.req_id
            if rid in seen:
                raise StepError(f"request {rid!r} scheduled twice in one step")
            seen.add(rid)
            old = None if rid in finished else self.requests.get(rid)
            if old is None:
                raise StepError(f"request {rid!r} is not known to the worker (never sent, or already finished)")
            tokens = list(old.token_ids)
            if cr.all_token_ids:
                tokens = self._check_tokens(rid, cr.all_token_ids)
            if cr.new_token_ids:
                new = self._check_tokens(rid, cr.new_token_ids)
                tokens = tokens[: cr.num_computed_tokens] + new if cr.num_computed_tokens < len(tokens) else tokens + new
            if cr.all_token_ids or cr.new_token_ids:
                self._check_length(rid, tokens, old.num_prompt_tokens)
            if cr.resumed:
                blocks = self._check_blocks(rid, cr.new_block_ids)
            else:
                blocks = old.block_ids + self._check_blocks(rid, cr.new_block_ids)
            probe = RequestState(rid, tokens, old.num_prompt_tokens, blocks, old.sampling)
            self._check_span(probe, cr.num_computed_tokens, cr.num_scheduled_tokens, len(blocks), block_size)
            updates.append((old, tokens, blocks, cr.num_computed_tokens, cr.num_scheduled_tokens))

        total = sum(s[3] for s in staged) + sum(u[4] for u in updates)
        if step.total_num_scheduled_tokens and total != step.total_num_scheduled_tokens:
            raise StepError(
                f"per-request scheduled tokens add up to {total}, the step says {step.total_num_scheduled_tokens}"
            )
        n = len(staged) + len(updates)
        if self.max_num_seqs and n > self.max_num_seqs:
            raise StepError(f"{n} requests scheduled in one step, more than max_num_seqs {self.max_num_seqs}")
        if self.max_num_batched_tokens and total > self.max_num_batched_tokens:
            raise StepError(f"{total} tokens scheduled in one step, more than max_num_batched_tokens "
                            f"{self.max_num_batched_tokens}")

        # Phase 2: commit.
        for rid in step.finished_req_ids:
            self.requests.pop(rid, None)
        items: list[WorkItem] = []
        for _, req, start, count in staged:
            if req.sampling.seed is not None:
                req.generator = np.random.default_rng(req.sampling.seed)
            self.requests[req.req_id] = req
            items.append(WorkItem(req, start, count))
        for old, tokens, blocks, start, count in updates:
            old.token_ids, old.block_ids, old.num_computed_tokens = tokens, blocks, start
            items.append(WorkItem(old, start, count))
        return items

    def record_sampled(self, item: WorkItem, token: int) -> None:
        item.req.num_computed_tokens = item.start + item.count
        item.req.token_ids.append(int(token))

    def record_partial(self, item: WorkItem) -> None:
        item.req.num_computed_tokens = item.start + item.count
