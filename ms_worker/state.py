"""Per-request state on the worker, updated in place by each step's deltas (like vLLM's InputBatch).

A step message names new requests once (prompt, sampling parameters, block ids), and afterwards only what
changed: new block ids, the computed-token count, and on resumption the full token list. Every request owns a row
of preallocated arrays (its tokens, its block table); `BatchState.apply` validates a whole StepRequest against
what the worker knows, then writes the deltas into those rows and returns the step's `StepPlan`. A bad message is
refused before anything changes; nothing downstream validates again.
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
    logprob_token_ids: list[int] = field(default_factory=list)   # non-empty: logprobs of these, not the top-N

    @classmethod
    def from_proto(cls, p) -> "Sampling":
        return cls(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p if p.top_p > 0 else 1.0,
            min_p=p.min_p,
            seed=p.seed if p.HasField("seed") else None,
            logprobs=p.logprobs,
            want_logprobs=p.want_logprobs or len(p.logprob_token_ids) > 0,
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
            logprob_token_ids=list(p.logprob_token_ids),
        )

    def token_ids_used(self) -> list[int]:
        """Every token id the parameters name (checked against the vocabulary)."""
        ids = list(self.logit_bias) + self.allowed_token_ids + self.stop_token_ids + self.logprob_token_ids
        return ids + [t for w in self.bad_words for t in w]


@dataclass
class RequestState:
    """A request the worker holds. Its tokens and blocks live in row ``row`` of the BatchState's arrays."""

    req_id: str
    row: int
    num_prompt_tokens: int
    sampling: Sampling
    table: "BatchState" = field(repr=False)
    generator: np.random.Generator | None = field(default=None, repr=False)
    prompt_lp: tuple | None = field(default=None, repr=False)   # prompt logprobs accumulated over chunks
    lora_id: int = 0            # its LoRA adapter (ms_worker.lora); 0 = the base model
    draft_hits: float = 0.0     # its accepted and tried drafts over its recent steps (ms_worker.spec.DraftBudget)
    draft_tries: float = 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.table.num_tokens[self.row])

    @property
    def token_ids(self) -> np.ndarray:
        """Prompt + every sampled token so far (a view of the row)."""
        return self.table.token_ids[self.row, :self.num_tokens]

    @property
    def block_ids(self) -> np.ndarray:
        return self.table.block_ids[self.row, :self.table.num_blocks_of[self.row]]


@dataclass
class Scheduled:
    """One request's share of a step: compute tokens [start, start + count) of its row; the last len(drafts) of
    them are speculative drafts, written in the row after its num_tokens tokens (-1 padding as token 0)."""

    req: RequestState
    start: int
    count: int
    drafts: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        # A partial (chunked) prefill produces no token; the last chunk and every decode do.
        return self.start + self.count >= self.req.num_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        # every chunk that computes prompt tokens, the last one too when it is a single token (it completes them)
        return self.req.sampling.prompt_logprobs is not None and self.start < self.req.num_prompt_tokens


@dataclass
class StepPlan:
    """What a step computes, in the order the front scheduled it."""

    scheduled: list[Scheduled]
    refused: dict[str, str] = field(default_factory=dict)   # req_id -> why, for requests refused alone

    @property
    def num_tokens(self) -> int:
        return sum(s.count for s in self.scheduled)


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
    """Every request the worker holds, by id, with its tokens and block table in preallocated rows
    (``token_ids`` [rows, max_model_len], ``block_ids`` [rows, max_blocks], counts [rows]). Rows are reused
    when requests finish and the arrays grow (doubling) only if more requests are held at once than ever before
    (preempted requests keep their rows)."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int, max_model_len: int, max_num_seqs: int = 0,
                 max_num_batched_tokens: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        # The front's scheduling budgets (from InitializeCache; 0 = not given): vLLM's scheduler never exceeds
        # them, so a step that does is refused rather than run as an arbitrarily large batch.
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.requests: dict[str, RequestState] = {}
        self.loras = None   # the LoRA adapters the requests may name (ms_worker.lora.LoraManager); None = none
        rows = min(max(max_num_seqs, 8), 1024)   # a hint: the rows grow (see _take_row)
        self.token_ids = np.zeros((rows, max_model_len), np.int32)
        self.num_tokens = np.zeros(rows, np.int32)
        self.block_ids = np.zeros((rows, self.max_blocks), np.int32)
        self.num_blocks_of = np.zeros(rows, np.int32)
        self._free = list(range(rows - 1, -1, -1))

    def _take_row(self) -> int:
        if not self._free:
            n = self.num_tokens.shape[0]
            self.token_ids = np.concatenate([self.token_ids, np.zeros_like(self.token_ids)])
            self.block_ids = np.concatenate([self.block_ids, np.zeros_like(self.block_ids)])
            self.num_tokens = np.concatenate([self.num_tokens, np.zeros_like(self.num_tokens)])
            self.num_blocks_of = np.concatenate([self.num_blocks_of, np.zeros_like(self.num_blocks_of)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()

    def _drop(self, req_id: str) -> None:
        req = self.requests.pop(req_id, None)
        if req is not None:
            self._free.append(req.row)

    def _write_tokens(self, row: int, tokens) -> None:
        self.token_ids[row, :len(tokens)] = tokens
        self.num_tokens[row] = len(tokens)

    def _write_drafts(self, row: int, drafts: list[int]) -> None:
        """Drafts go after the row's tokens, uncounted: the forward reads them, accepted ones are appended in place
        (append_token), rejected ones are overwritten later."""
        if drafts:
            n = int(self.num_tokens[row])
            self.token_ids[row, n:n + len(drafts)] = np.maximum(drafts, 0)

    def _write_blocks(self, row: int, blocks, append: bool) -> None:
        n = int(self.num_blocks_of[row]) if append else 0
        self.block_ids[row, n:n + len(blocks)] = blocks
        self.num_blocks_of[row] = n + len(blocks)

    # -- validation helpers ---------------------------------------------------------------------------
    def _check_blocks(self, req_id: str, block_ids, already: int = 0) -> list[int]:
        ids = list(block_ids)
        bad = [b for b in ids if b < 0 or b >= self.num_blocks]
        if bad:
            raise StepError(f"request {req_id!r}: block ids {bad[:5]} outside the KV cache (0..{self.num_blocks - 1})")
        if already + len(ids) > self.max_blocks:
            raise StepError(f"request {req_id!r}: {already + len(ids)} blocks exceed max_model_len's "
                            f"{self.max_blocks} blocks of {self.block_size}")
        return ids

    def _check_drafts(self, req_id: str, drafts, num_tokens: int, start: int, count: int) -> list[int]:
        """Drafts are the tail of the step's query, after the request's last token, within the vocabulary (or -1,
        the scheduler's padding) and within max_model_len."""
        ids = list(drafts)
        if not ids:
            return ids
        bad = [t for t in ids if t < -1 or t >= self.vocab_size]
        if bad:
            raise StepError(f"request {req_id!r}: draft token ids {bad[:5]} outside the vocabulary "
                            f"(0..{self.vocab_size - 1}, or -1)")
        if start + count != num_tokens + len(ids):
            raise StepError(f"request {req_id!r}: {len(ids)} drafts must end the step's tokens {start}..{start + count}"
                            f" of a request with {num_tokens} tokens")
        if num_tokens + len(ids) > self.max_model_len:
            raise StepError(f"request {req_id!r}: {num_tokens} tokens and {len(ids)} drafts exceed max_model_len "
                            f"{self.max_model_len}")
        return ids

    def _check_tokens(self, req_id: str, token_ids) -> list[int]:
        ids = list(token_ids)
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise StepError(f"request {req_id!r}: token ids {bad[:5]} outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def _check_length(self, req_id: str, num_tokens: int, num_prompt_tokens: int) -> None:
        """A request's token count (prompt + outputs) as the front sent it: within max_model_len, and never
        fewer than the prompt the worker holds (all_token_ids always starts with the whole prompt)."""
        if num_tokens > self.max_model_len:
            raise StepError(f"request {req_id!r}: {num_tokens} tokens exceed max_model_len {self.max_model_len}")
        if num_tokens < num_prompt_tokens:
            raise StepError(f"request {req_id!r}: {num_tokens} tokens are fewer than its prompt of "
                            f"{num_prompt_tokens}")

    def _check_span(self, rid: str, num_tokens: int, start: int, count: int, num_blocks: int) -> None:
        if count <= 0:
            raise StepError(f"request {rid!r}: scheduled {count} tokens")
        if start + count > num_tokens:
            raise StepError(
                f"request {rid!r}: asked to compute tokens {start}..{start + count} but only "
                f"{num_tokens} are known to the worker"
            )
        if start + count > self.max_model_len:
            raise StepError(f"request {rid!r}: {start + count} tokens exceed max_model_len {self.max_model_len}")
        if start + count > num_blocks * self.block_size:
            raise StepError(
                f"request {rid!r}: {start + count} tokens need more than its {num_blocks} blocks of "
                f"{self.block_size}"
            )

    # -- the delta ----------------------------------------------------------------------------------------
    def apply(self, step) -> StepPlan:
        """Validate `step` fully, then write it into the rows. Returns the step's plan in scheduling order.

        A request whose delta is invalid refuses the whole step (StepError, nothing changes), or with
        step.refuse_alone only itself: it is left out of the plan, its state dropped, and the others go on."""
        # Phase 1: validate and stage the new per-request values without touching state.
        finished = set(step.finished_req_ids)
        seen: set[str] = set()
        refused: dict[str, str] = {}
        staged_new = []      # (req_id, tokens, blocks, sampling, start, count, drafts, lora_id)
        staged_cached = []   # (req, tokens or None, blocks, resumed, start, count, drafts)
        for deltas, stage, staged in ((step.new_requests, self._stage_new, staged_new),
                                      (step.cached_requests, self._stage_cached, staged_cached)):
            for delta in deltas:
                rid = delta.req_id
                if rid in seen:
                    raise StepError(f"request {rid!r} scheduled twice in one step")
                seen.add(rid)
                try:
                    staged.append(stage(delta, finished))
                except StepError as e:
                    if not step.refuse_alone:
                        raise
                    refused[rid] = str(e)

        total = sum(r.num_scheduled_tokens for r in (*step.new_requests, *step.cached_requests))
        if step.total_num_scheduled_tokens and total != step.total_num_scheduled_tokens:
            raise StepError(
                f"per-request scheduled tokens add up to {total}, the step says {step.total_num_scheduled_tokens}"
            )
        n = len(step.new_requests) + len(step.cached_requests)
        if self.max_num_seqs and n > self.max_num_seqs:
            raise StepError(f"{n} requests scheduled in one step, more than max_num_seqs {self.max_num_seqs}")
        if self.max_num_batched_tokens and total > self.max_num_batched_tokens:
            raise StepError(f"{total} tokens scheduled in one step, more than max_num_batched_tokens "
                            f"{self.max_num_batched_tokens}")

        loras = {x[-1] for x in staged_new} | {x[0].lora_id for x in staged_cached}
        loras.discard(0)
        if loras and len(loras) > self.loras.slots.max_loras:
            raise StepError(f"{len(loras)} LoRA adapters in one step, more than --max-loras "
                            f"{self.loras.slots.max_loras}")

        # Phase 2: commit.
        for rid in (*step.finished_req_ids, *refused):
            self._drop(rid)
        scheduled: list[Scheduled] = []
        for rid, tokens, blocks, sampling, start, count, drafts, lora_id in staged_new:
            req = RequestState(rid, self._take_row(), len(tokens), sampling, self, lora_id=lora_id)
            if sampling.seed is not None:
                req.generator = np.random.default_rng(sampling.seed)
            self._write_tokens(req.row, tokens)
            self._write_blocks(req.row, blocks, append=False)
            self._write_drafts(req.row, drafts)
            self.requests[rid] = req
            scheduled.append(Scheduled(req, start, count, drafts))
        for req, tokens, blocks, resumed, start, count, drafts in staged_cached:
            if tokens is not None:
                self._write_tokens(req.row, tokens)
            self._write_blocks(req.row, blocks, append=not resumed)
            self._write_drafts(req.row, drafts)
            scheduled.append(Scheduled(req, start, count, drafts))
        return StepPlan(scheduled, refused)

    def _stage_new(self, nr, finished: set[str]) -> tuple:
        """A new request's validated values, (req_id, tokens, blocks, sampling, start, count, drafts);
        StepError if bad."""
        rid = nr.req_id
        if rid in self.requests and rid not in finished:
            raise StepError(f"request {rid!r} is already known to the worker; a new request must have a new id")
        tokens = self._check_tokens(rid, nr.prompt_token_ids)
        if not tokens:
            raise StepError(f"request {rid!r} has an empty prompt")
        self._check_length(rid, len(tokens), len(tokens))
        check_sampling(rid, nr.sampling)
        sampling = Sampling.from_proto(nr.sampling)
        self._check_tokens(rid, sampling.token_ids_used())
        blocks = self._check_blocks(rid, nr.block_ids)
        drafts = self._check_drafts(rid, nr.draft_token_ids, len(tokens), nr.num_computed_tokens,
                                    nr.num_scheduled_tokens)
        self._check_span(rid, len(tokens) + len(drafts), nr.num_computed_tokens, nr.num_scheduled_tokens,
                         len(blocks))
        self._check_lora(rid, nr.lora_id)
        return rid, tokens, blocks, sampling, nr.num_computed_tokens, nr.num_scheduled_tokens, drafts, nr.lora_id

    def _check_lora(self, rid: str, lora_id: int) -> None:
        if lora_id and (self.loras is None or lora_id not in self.loras):
            raise StepError(f"request {rid!r}: LoRA adapter {lora_id} is not loaded on this worker"
                            + ("" if self.loras is not None else " (LoRA is not enabled)"))

    def _stage_cached(self, cr, finished: set[str]) -> tuple:
        """A cached request's validated values, (req, tokens or None, blocks, resumed, start, count, drafts)."""
        rid = cr.req_id
        old = None if rid in finished else self.requests.get(rid)
        if old is None:
            raise StepError(f"request {rid!r} is not known to the worker (never sent, or already finished)")
        self._check_lora(rid, old.lora_id)
        tokens = None
        if cr.all_token_ids:
            tokens = self._check_tokens(rid, cr.all_token_ids)
        if cr.new_token_ids:
            new = self._check_tokens(rid, cr.new_token_ids)
            base = tokens if tokens is not None else old.token_ids.tolist()
            tokens = base[: cr.num_computed_tokens] + new if cr.num_computed_tokens < len(base) else base + new
        n_tokens = old.num_tokens if tokens is None else len(tokens)
        if tokens is not None:
            self._check_length(rid, n_tokens, old.num_prompt_tokens)
        already = 0 if cr.resumed else int(self.num_blocks_of[old.row])
        blocks = self._check_blocks(rid, cr.new_block_ids, already)
        drafts = self._check_drafts(rid, cr.draft_token_ids, n_tokens, cr.num_computed_tokens,
                                    cr.num_scheduled_tokens)
        self._check_span(rid, n_tokens + len(drafts), cr.num_computed_tokens, cr.num_scheduled_tokens,
                         already + len(blocks))
        return old, tokens, blocks, cr.resumed, cr.num_computed_tokens, cr.num_scheduled_tokens, drafts

    def append_token(self, req: RequestState, token: int) -> None:
        """Records a token the worker sampled (the front sends only tokens it did not sample itself)."""
        n = req.num_tokens
        if n < self.max_model_len:
            self.token_ids[req.row, n] = token
            self.num_tokens[req.row] = n + 1
