"""A step's plan -> one flat token batch -> the model -> the sampler.

Every scheduled token of every request (decodes, prefill chunks, resumed requests) is one row of a single flat
batch, built with array operations from the requests' rows in BatchState; the model runs it as one forward (two
compiled graphs: body and head) and returns the logits of the rows that sample, plus every prompt row of requests
that asked for prompt logprobs. A request with speculative drafts samples at each draft and after the last one
(its last 1 + drafts rows); it emits the accepted drafts and one more token (ms_worker.spec), and with a
speculative config every request that sampled gets its next drafts proposed from its tokens, as many of them as
pay for their rows (spec.DraftBudget, from the step times measured here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ms_models.batch import FlatBatch
from ms_worker.sampler import SampleResult, Sampler, prompt_logprobs_chunk
from ms_worker.spec import DraftBudget, Position, accept, propose_ngram
from ms_worker.state import BatchState, StepPlan


@dataclass
class ForwardOutput:
    """The model's output for a plan: ``logits`` rows, and per scheduled request (by index) the first row of its
    sampling logits (-1 if it does not sample; 1 + its drafts rows from there) and its completed prompt logprobs
    (None if none); the seconds the forward took."""

    logits: np.ndarray
    sample_row: np.ndarray
    prompt_logprobs: list
    seconds: float = 0.0


@dataclass
class RequestOutput:
    """A scheduled request's result: the tokens it emits (none for a partial prefill; the accepted drafts and
    one more with drafts) with their samples (logprobs), and the drafts proposed for its next step."""

    tokens: list[int]
    samples: list[SampleResult]
    prompt_logprobs: tuple | None
    drafts: list[int] | None = None


def build_batch(plan: StepPlan, state: BatchState) -> tuple[FlatBatch, np.ndarray, list]:
    """The flat batch of ``plan``; also the first logits row of each scheduled request's samples (-1: none; one
    row per draft and one after them) and, per request, the logits rows of its prompt-logprob positions (None: not
    asked)."""
    sched = plan.scheduled
    batch = FlatBatch.gather(state.token_ids, state.block_ids, [s.req.row for s in sched],
                             [s.start for s in sched], [s.count for s in sched], state.block_size)
    qsl = batch.query_start_loc
    samples = np.fromiter((s.samples for s in sched), bool, len(sched))

    # logits rows: each sampling request's last 1 + drafts rows, plus prompt-logprob rows (rare: per request)
    lp_rows: list = [None] * len(sched)
    n_rows = np.fromiter((len(s.drafts) + 1 for s in sched), np.int64, len(sched))[samples]
    first = qsl[1:][samples] - n_rows
    picks = [np.repeat(first, n_rows) + np.arange(int(n_rows.sum())) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)]
    for i, s in enumerate(sched):
        if s.wants_prompt_logprobs:
            k = min(s.count, s.req.num_prompt_tokens - 1 - s.start)
            lp_rows[i] = np.arange(qsl[i], qsl[i] + k)
            picks.append(lp_rows[i])
    li = np.unique(np.concatenate(picks)) if len(picks) > 1 else picks[0]
    sample_row = np.full(len(sched), -1, np.int64)
    sample_row[samples] = np.searchsorted(li, first)
    lp_rows = [None if r is None else np.searchsorted(li, r) for r in lp_rows]
    batch.logits_indices = li.astype(np.int32)
    return batch, sample_row, lp_rows


class ModelRunner:
    def __init__(self, model, state: BatchState, sampler: Sampler, speculative=None, draft_budget: bool = True):
        """``speculative``: ms_rpc.v1.SpeculativeConfig (method ngram) or None; ``draft_budget``: propose only the
        drafts that pay for their rows (else every draft the n-gram lookup finds, as vLLM's proposer does)."""
        self.model = model
        self.state = state
        self.sampler = sampler
        self.speculative = speculative
        self.budget = DraftBudget(model.buckets) if speculative is not None and draft_budget else None

    def forward(self, plan: StepPlan) -> ForwardOutput:
        t0 = time.perf_counter()
        batch, sample_row, lp_rows = build_batch(plan, self.state)
        loras = self.state.loras
        if loras is not None:   # each token's LoRA slot, the step's adapters put into slots first
            ids = [s.req.lora_id for s in plan.scheduled]
            slot_of = {0: -1, **loras.activate(i for i in ids if i)}
            counts = np.diff(batch.query_start_loc)
            batch.lora_slots = np.repeat(np.array([slot_of[i] for i in ids], np.int32), counts)
        logits = self.model.forward(batch)
        prompt = [None if r is None else prompt_logprobs_chunk(s, logits[r])
                  for s, r in zip(plan.scheduled, lp_rows)]
        return ForwardOutput(logits, sample_row, prompt, time.perf_counter() - t0)

    def sample(self, plan: StepPlan, out: ForwardOutput,
               allowed: dict[str, np.ndarray] | None = None) -> list[RequestOutput]:
        """Samples every request whose prefill is complete, records the tokens in the state and returns one
        output per scheduled request, in order. ``allowed[req_id]``: its grammar masks, [1 + drafts, vocab]."""
        t0 = time.perf_counter()
        idx = np.flatnonzero(out.sample_row >= 0).tolist()
        rows, reqs, drafts, masks = [], [], [], []
        for i in idx:
            s = plan.scheduled[i]
            mask = allowed.get(s.req.req_id) if allowed else None
            n = s.req.num_tokens
            for j in range(len(s.drafts) + 1):
                rows.append(out.sample_row[i] + j)
                reqs.append(Position(s.req, n + j) if s.drafts else s.req)
                drafts.append(s.drafts[j] if j < len(s.drafts) else -1)
                masks.append(None if mask is None else mask[j])
        results: list[SampleResult] = []
        if rows:
            results = self.sampler.sample(out.logits[rows], reqs, masks if allowed else None,
                                          drafts if len(rows) > len(idx) else None)
        outputs = [RequestOutput([], [], p) for p in out.prompt_logprobs]
        k = 0
        for i in idx:
            s = plan.scheduled[i]
            res = results[k:k + len(s.drafts) + 1]
            k += len(res)
            res = res[:accept(s.drafts, [r.token for r in res])]
            for r in res:
                self.state.append_token(s.req, r.token)
            outputs[i].tokens, outputs[i].samples = [r.token for r in res], res
            if self.budget is not None:
                self.budget.observe(s.req, len(s.drafts), len(res) - 1)
        if self.speculative is not None:
            self._propose(plan, idx, outputs, out.seconds + time.perf_counter() - t0)
        return outputs

    def _propose(self, plan: StepPlan, idx: list[int], outputs: list[RequestOutput], step_s: float) -> None:
        """The next drafts of the requests that sampled (the budget's choice of them). The next step is assumed
        to hold a row for each of them and the same prefill chunks as this one."""
        sc = self.speculative
        proposals = [(plan.scheduled[i].req,
                      propose_ngram(plan.scheduled[i].req.token_ids, sc.prompt_lookup_min, sc.prompt_lookup_max,
                                    sc.num_speculative_tokens, self.state.max_model_len)) for i in idx]
        if self.budget is not None:
            self.budget.record_step(sum(s.count for s in plan.scheduled), step_s)
            prefill = sum(s.count for s in plan.scheduled if not s.samples)
            drafts = self.budget.choose(proposals, len(idx) + prefill)
        else:
            drafts = [d for _, d in proposals]
        for i, d in zip(idx, drafts):
            outputs[i].drafts = d.tolist()
