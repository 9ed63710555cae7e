"""A minimal front for the kit: the handshake's results, step numbering, a block allocator and per-request
bookkeeping, so that checks schedule requests the way vLLM's scheduler does (new, cached, resumed, finished
deltas) and get every reply's envelope checked."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np

from ms_rpc.v1 import PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb

from .report import CheckFailed, expect
from .wire import Refused, Wire


@dataclass(frozen=True)
class Limits:
    """The cache and scheduling budgets the kit's InitializeCache sends (small: every check fits in them)."""

    block_size: int = 16
    num_blocks: int = 64
    max_model_len: int = 256
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 64


@dataclass
class Req:
    rid: str
    prompt: list[int]
    sampling: pb.SamplingParams
    out: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    known: bool = False          # the worker holds its state
    resume: bool = False         # preempted: the next delta replaces its tokens and block table
    results: list = field(default_factory=list)   # its RequestResult of every step that scheduled it

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.computed


def greedy(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, **kw)


class Session:
    def __init__(self, wire: Wire, limits: Limits = Limits()):
        self.wire = wire
        self.limits = limits
        self.info: pb.WorkerInfo | None = None
        self.model_dir: str | None = None          # the checkpoint the worker serves, when the kit is told
        self.bytes_per_block = 0
        self.last_step: pb.StepRequest | None = None
        self.cache_ready = False
        self.next_step = 1
        self.free = list(range(limits.num_blocks))
        self.live: dict[str, Req] = {}
        self._ids = 0
        self._refs: dict[tuple, list[int]] = {}

    # -- the model's facts ------------------------------------------------------------------------------------
    @property
    def vocab(self) -> int:
        expect(self.info is not None, "no WorkerInfo (Describe failed)")
        return self.info.model.vocab_size

    def prompt(self, n: int, seed: int) -> list[int]:
        """`n` token ids drawn with `seed` from the vocabulary, above its first 100 ids (special tokens live there)."""
        lo = 100 if self.vocab > 1000 else 1
        return np.random.default_rng(seed).integers(lo, min(self.vocab, 30000), n).tolist()

    # -- requests and blocks ------------------------------------------------------------------------------------
    def new_req(self, prompt: list[int], sampling: pb.SamplingParams | None = None, blocks=(), computed: int = 0,
                tag: str = "r") -> Req:
        self._ids += 1
        return Req(f"{tag}-{self._ids}", list(prompt), sampling or greedy(), blocks=list(blocks), computed=computed)

    def alloc(self, n: int) -> list[int]:
        expect(len(self.free) >= n, f"the kit ran out of its {self.limits.num_blocks} blocks (a check leaked some)")
        got, self.free = self.free[:n], self.free[n:]
        return got

    def release(self, blocks) -> None:
        """Freed blocks are handed out first again (so that a later request overwrites them, as in vLLM)."""
        self.free[:0] = blocks

    def _delta(self, req: Req, count: int):
        """The request's delta scheduling `count` tokens, and the blocks newly allocated for it."""
        bs = self.limits.block_size
        need = max(0, -(-(req.computed + count) // bs) - len(req.blocks))
        new = self.alloc(need)
        if not req.known:
            d = pb.NewRequest(req_id=req.rid, prompt_token_ids=req.prompt, sampling=req.sampling,
                              block_ids=req.blocks + new, num_computed_tokens=req.computed, num_scheduled_tokens=count)
        elif req.resume:
            d = pb.CachedRequest(req_id=req.rid, resumed=True, all_token_ids=req.tokens, new_block_ids=req.blocks + new,
                                 num_computed_tokens=req.computed, num_scheduled_tokens=count)
        else:
            d = pb.CachedRequest(req_id=req.rid, new_block_ids=new, num_computed_tokens=req.computed,
                                 num_scheduled_tokens=count)
        return d, new

    # -- steps --------------------------------------------------------------------------------------------------
    def build(self, sched: list[tuple[Req, int]], finished=(), **flags):
        """The StepRequest scheduling `sched` ((request, tokens) pairs) and finishing `finished`, and the function
        that records its result (`commit(reply)`) or gives back its blocks (`commit(None)`)."""
        msg = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=self.next_step,
                             total_num_scheduled_tokens=sum(c for _, c in sched), **flags)
        msg.finished_req_ids.extend(r.rid for r in finished)
        allocated = []
        for req, count in sched:
            d, new = self._delta(req, count)
            allocated.append(new)
            (msg.cached_requests if req.known else msg.new_requests).append(d)

        def commit(reply):
            if reply is None:
                for new in allocated:
                    self.release(new)
                return
            self.next_step += 1
            for r in finished:
                self.live.pop(r.rid, None)
                r.known = False
                self.release(r.blocks)
                r.blocks = []
            for (req, count), new in zip(sched, allocated):
                req.blocks += new
                req.computed += count
                req.known, req.resume = True, False
                self.live[req.rid] = req
            if not msg.defer_sampling:
                self.record(reply, sched)

        return msg, commit

    def record(self, reply: pb.StepResult, sched: list[tuple[Req, int]]) -> None:
        """Checks a sampled step's envelope (its step id and worker id, one result per scheduled request in
        scheduling order, one token each once its prefill is complete, none before) and appends the tokens."""
        expect(reply.worker_id == self.info.worker_id,
               f"step {reply.step_id}: worker_id {reply.worker_id!r}, Describe said {self.info.worker_id!r}")
        ids = [r.req_id for r in reply.results]
        want = [req.rid for req, _ in sched]
        expect(ids == want, f"step {reply.step_id}: results for {ids}, scheduled {want} (in this order)")
        for (req, _), res in zip(sched, reply.results):
            expect(not res.error, f"step {reply.step_id}: request {req.rid} refused: {res.error}")
            n = 1 if req.computed >= len(req.tokens) else 0
            got = list(res.sampled_token_ids)
            expect(len(got) == n, f"step {reply.step_id}: request {req.rid} got {len(got)} tokens {got[:4]}, "
                                  f"expected {n} ({req.computed} of {len(req.tokens)} tokens computed)")
            expect(all(0 <= t < self.vocab for t in got), f"step {reply.step_id}: token ids {got} outside the "
                                                          f"vocabulary of {self.vocab}")
            req.out += got
            req.results.append(res)

    def step(self, sched: list[tuple[Req, int]], finished=(), **flags) -> pb.StepResult:
        return self.send(*self.build(sched, finished, **flags))

    def send(self, msg: pb.StepRequest, commit, call=None) -> pb.StepResult:
        """Executes a built step (or waits for `call`, its Execute already sent) and commits its reply."""
        try:
            reply = self.wire.finish("Execute", call) if call is not None else self.wire.call("Execute", msg)
        except Refused:
            commit(None)
            raise
        self.last_step = msg
        expect(reply.step_id == msg.step_id, f"Execute of step {msg.step_id} answered for step {reply.step_id}")
        commit(reply)
        return reply

    def advance(self, reqs: list[Req], chunk: int = 0, **flags) -> pb.StepResult:
        """One step scheduling each request's remaining tokens (at most `chunk` of them when given)."""
        return self.step([(r, min(r.remaining, chunk) if chunk else r.remaining) for r in reqs], **flags)

    def finish(self, *reqs: Req) -> None:
        """A step that only finishes `reqs` (vLLM sends finished ids with the next step)."""
        self.step([], finished=[r for r in reqs if r.known])
        for r in reqs:        # a request the worker no longer holds (refused alone) still gives its blocks back
            self.release(r.blocks)
            r.blocks = []

    def preempt(self, req: Req) -> None:
        """vLLM's preemption by recomputation: its blocks go back to the pool; it resumes from token 0."""
        self.release(req.blocks)
        req.blocks, req.computed, req.resume = [], 0, True

    def generate(self, req: Req, n: int, chunk: int = 0, finish: bool = True) -> list[int]:
        """Runs `req` alone until it has `n` output tokens (prefill in chunks of `chunk` tokens when given)."""
        while len(req.out) < n:
            self.advance([req], chunk)
        if finish:
            self.finish(req)
        return req.out[:n]

    def reference(self, prompt: list[int], n: int) -> list[int]:
        """The worker's own greedy tokens for `prompt` (one-step prefill, then one decode per step), once per
        prompt: what every variant of the same request must reproduce."""
        key = (tuple(prompt), n)
        if key not in self._refs:
            self._refs[key] = self.generate(self.new_req(prompt, tag="ref"), n)
        return self._refs[key]

    def held(self, prompt_len: int, n: int, seed: int) -> tuple[Req, list[int]]:
        """A request past its prefill, held across a check, and the `n` tokens it must end with."""
        prompt = self.prompt(prompt_len, seed=seed)
        want = self.reference(prompt, n)
        req = self.new_req(prompt)
        self.advance([req])
        return req, want

    # -- refusals and the worker's own view ---------------------------------------------------------------------
    def worker_state(self) -> tuple[int, int]:
        """(next_step_id, requests_active) as the worker reports them (CheckLiveness)."""
        r = self.wire.call("CheckLiveness", pb.LivenessRequest(protocol_version=PROTOCOL_VERSION))
        return r.next_step_id, r.requests_active

    def expect_refused(self, call: str, request, code: grpc.StatusCode, what: str) -> Refused:
        """`call` with `request` must be refused with `code` and a message, and change nothing the worker reports:
        its next step and the requests it holds stay those of the steps the kit had sent."""
        try:
            reply = self.wire.call(call, request)
        except Refused as e:
            expect(e.code == code, f"{what}: {call} answered {e.code.name} ({e.details}), expected {code.name}")
            expect(bool(e.details.strip()), f"{what}: {call} refused ({code.name}) without a message")
            if self.cache_ready:
                want, got = (self.next_step, len(self.live)), self.worker_state()
                expect(got == want, f"{what}: refused, but the worker reports (next step, active requests) {got}, "
                                    f"expected {want}")
            return e
        raise CheckFailed(f"{what}: {call} was accepted ({type(reply).__name__}), expected {code.name}")

    def resync(self) -> None:
        """After a failed check: take the worker's step number and drop every request it holds for the kit."""
        if not self.cache_ready:
            return
        try:
            self.next_step = self.worker_state()[0]
            try:                  # a deferred step left waiting for its Sample
                self.wire.call("Sample", pb.SampleRequest(protocol_version=PROTOCOL_VERSION,
                                                          step_id=self.next_step - 1))
            except Refused:
                pass
            held = [r for r in self.live.values() if r.known]
            if held:
                self.step([], finished=held)
        except Exception:  # noqa: BLE001 - the next check reports what is wrong
            pass
        for r in self.live.values():
            r.blocks, r.known = [], False
        self.live.clear()
        self.free = list(range(self.limits.num_blocks))    # the kit holds nothing now
