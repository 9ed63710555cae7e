"""A step's plan -> one flat token batch -> the model -> the sampler.

Every scheduled token of every request (decodes, prefill chunks, resumed requests) is one row of a single flat
batch, built with array operations from the requests' rows in BatchState; the model runs it as one forward (two
compiled graphs: body and head) and returns the logits of the rows that sample, plus every prompt row of requests
that asked for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms_models.batch import FlatBatch
from ms_worker.sampler import SampleResult, Sampler, prompt_logprobs_chunk
from ms_worker.state import BatchState, StepPlan


@dataclass
class ForwardOutput:
    """The model's output for a plan: ``logits`` rows, and per scheduled request (by index) the row of its
    sampling logits (-1 if it does not sample) and its completed prompt logprobs (None if none)."""

    logits: np.ndarray
    sample_row: np.ndarray
    prompt_logprobs: list


@dataclass
class RequestOutput:
    """A scheduled request's result: the sampled token (None for a partial prefill) and its logprobs."""

    token: int | None
    sample: SampleResult | None
    prompt_logprobs: tuple | None


def build_batch(plan: StepPlan, state: BatchState) -> tuple[FlatBatch, np.ndarray, list]:
    """The flat batch of ``plan``; also the logits row of each scheduled request's sample (-1: none) and, per
    request, the logits rows of its prompt-logprob positions (None: not asked)."""
    sched = plan.scheduled
    batch = FlatBatch.gather(state.token_ids, state.block_ids, [s.req.row for s in sched],
                             [s.start for s in sched], [s.count for s in sched], state.block_size)
    qsl = batch.query_start_loc
    samples = np.fromiter((s.samples for s in sched), bool, len(sched))

    # logits rows: each sampling request's last row, plus prompt-logprob rows (rare: per request)
    lp_rows: list = [None] * len(sched)
    picks = [qsl[1:][samples] - 1]
    for i, s in enumerate(sched):
        if s.wants_prompt_logprobs:
            k = min(s.count, s.req.num_prompt_tokens - 1 - s.start)
            lp_rows[i] = np.arange(qsl[i], qsl[i] + k)
            picks.append(lp_rows[i])
    li = np.unique(np.concatenate(picks)) if len(picks) > 1 else picks[0]
    sample_row = np.full(len(sched), -1, np.int64)
    sample_row[samples] = np.searchsorted(li, qsl[1:][samples] - 1)
    lp_rows = [None if r is None else np.searchsorted(li, r) for r in lp_rows]
    batch.logits_indices = li.astype(np.int32)
    return batch, sample_row, lp_rows


class ModelRunner:
    def __init__(self, model, state: BatchState, sampler: Sampler):
        self.model = model
        self.state = state
        self.sampler = sampler

    def forward(self, plan: StepPlan) -> ForwardOutput:
        batch, sample_row, lp_rows = build_batch(plan, self.state)
        logits = self.model.forward(batch)
        prompt = [None if r is None else prompt_logprobs_chunk(s, logits[r])
                  for s, r in zip(plan.scheduled, lp_rows)]
        return ForwardOutput(logits, sample_row, prompt)

    def sample(self, plan: StepPlan, out: ForwardOutput,
               allowed: dict[str, np.ndarray] | None = None) -> list[RequestOutput]:
        """Samples every request whose prefill is complete, records the tokens in the state and returns one
        output per scheduled request, in order."""
        idx = np.flatnonzero(out.sample_row >= 0)
        results: list[SampleResult] = []
        if idx.size:
            reqs = [plan.scheduled[i].req for i in idx]
            masks = [(allowed or {}).get(r.req_id) for r in reqs] if allowed else None
            results = self.sampler.sample(out.logits[out.sample_row[idx]], reqs, masks)
        sampled = dict(zip(idx.tolist(), results))
        outputs = []
        for i, s in enumerate(plan.scheduled):
            res = sampled.get(i)
            if res is not None:
                self.state.append_token(s.req, res.token)
            outputs.append(RequestOutput(None if res is None else res.token, res, out.prompt_logprobs[i]))
        return outputs
