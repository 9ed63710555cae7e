"""A step's plan -> one forward of the model (or the simulator) -> tokens, logprobs and prompt logprobs.

The forward computes logits only for the rows that need them: each sampling request's last scheduled token, and
the prompt positions of requests that asked for prompt logprobs. Sampling is a second phase, so that a deferred
step (Execute with defer_sampling) can be sampled later with the front's grammar bitmask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Chunk
from .sampler import Sampled, Sampler, prompt_logprobs, prompt_rows
from .state import Plan


@dataclass
class Forward:
    logits: np.ndarray          # [rows, vocab]
    sample_row: list[int]       # per scheduled request: its row in logits, -1 when it does not sample
    prompt: list                # per scheduled request: its prompt logprobs once complete, else None


@dataclass
class Output:
    tokens: list[int]
    sampled: Sampled | None
    prompt: tuple | None


class Runner:
    def __init__(self, backend, sampler: Sampler):
        """`backend`: forward(chunks, logits_rows) -> logits, over a KV cache it holds (model.Decoder,
        simulate.Simulator)."""
        self.backend = backend
        self.sampler = sampler

    def forward(self, plan: Plan) -> Forward:
        chunks, rows, sample_row, lp_rows = [], [], [], []
        offset = 0
        for s in plan.scheduled:
            req = s.req
            chunks.append(Chunk(np.asarray(req.tokens[s.start:s.start + s.count], np.int64), s.start,
                                np.asarray(req.blocks, np.int64)))
            lp = None
            if req.sampling.HasField("prompt_logprobs") and s.start < req.num_prompt:
                lp = (len(rows), len(prompt_rows(s.start, s.count, req.num_prompt)))
                rows.extend(offset + p - s.start for p in prompt_rows(s.start, s.count, req.num_prompt))
            lp_rows.append(lp)
            sample_row.append(len(rows) if s.samples else -1)
            if s.samples:
                rows.append(offset + s.count - 1)
            offset += s.count
        logits = self.backend.forward(chunks, np.asarray(rows, np.int64)) if chunks else None
        prompt = [None if lp is None else prompt_logprobs(s.req, s.start, s.count, logits[lp[0]:lp[0] + lp[1]])
                  for s, lp in zip(plan.scheduled, lp_rows)]
        return Forward(logits, sample_row, prompt)

    def sample(self, plan: Plan, fwd: Forward, allowed: dict[str, np.ndarray]) -> list[Output]:
        """Samples each request whose prefill is complete (`allowed[req_id]`: its grammar mask) and records the
        token in its state; one output per scheduled request, in order."""
        outs = []
        for s, row, prompt in zip(plan.scheduled, fwd.sample_row, fwd.prompt):
            if row < 0:
                outs.append(Output([], None, prompt))
                continue
            got = self.sampler.sample(s.req, fwd.logits[row], allowed.get(s.req.req_id))
            s.req.tokens.append(got.token)
            outs.append(Output([got.token], got, prompt))
        return outs

    def probe(self) -> np.ndarray:
        """One token at position 0 through the model without the KV cache: the liveness forward."""
        return self.backend.forward([Chunk(np.zeros(1, np.int64), 0, None)], np.zeros(1, np.int64))
