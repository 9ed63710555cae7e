"""Checks of the step contract: every kind of delta (new, cached, resumed after preemption, finished), chunked
prefill, prefix-cache hits, several requests in one step, and step numbering (a gap, a replay, a reorder refused
with FAILED_PRECONDITION and nothing changed). Expected tokens are the worker's own: the same request run alone,
in one prefill, must give the same greedy tokens."""

from __future__ import annotations

import time

import grpc

from ms_rpc.v1 import FEATURE_STEPS_IN_FLIGHT, PROTOCOL_VERSION, STEP_ORDER_GRACE_S
from ms_rpc.v1 import worker_pb2 as pb

from .report import CheckFailed, expect
from .session import Session
from .wire import Refused

N = 5              # output tokens per request
PROMPT_LEN = 40    # more than two blocks of 16, not a whole number of blocks
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def _same(got: list[int], want: list[int], what: str) -> None:
    expect(got == want, f"{what}: tokens {got}, the same request alone in one prefill gives {want}")


def new_and_cached(s: Session) -> None:
    """A new request's prefill, then cached deltas one token a step; twice, under new ids: the same tokens."""
    p = s.prompt(PROMPT_LEN, seed=1)
    want = s.reference(p, N)
    _same(s.generate(s.new_req(p), N), want, "a second run")
    before = s.worker_state()
    expect(before == (s.next_step, 0), f"(next step, active requests) {before} after finishing every request, "
                                       f"expected {(s.next_step, 0)}")


def batched(s: Session) -> None:
    """Three requests of different lengths in the same steps: one result each, in scheduling order (checked for
    every step), and each request's tokens as alone."""
    prompts = [s.prompt(PROMPT_LEN, seed=1), s.prompt(9, seed=2), s.prompt(13, seed=3)]
    want = [s.reference(p, N) for p in prompts]
    reqs = [s.new_req(p) for p in prompts]
    while len(reqs[0].out) < N:
        s.advance(reqs)
    s.finish(*reqs)
    for i, (r, w) in enumerate(zip(reqs, want)):
        _same(r.out, w, f"request {i} of 3 in one batch")


def chunked_prefill(s: Session) -> None:
    """A prefill in chunks of 16 and 7 tokens: partial chunks return no token; the tokens are as in one prefill."""
    p = s.prompt(PROMPT_LEN, seed=1)
    want = s.reference(p, N)
    for chunk in (16, 7):
        _same(s.generate(s.new_req(p), N, chunk=chunk), want, f"prefill in chunks of {chunk}")


def chunked_beside_decode(s: Session) -> None:
    """A chunked prefill in the same steps as another request's decodes (one flat batch)."""
    p1, p2 = s.prompt(PROMPT_LEN, seed=1), s.prompt(13, seed=3)
    want1, want2 = s.reference(p1, N), s.reference(p2, N)
    a, b = s.new_req(p1), s.new_req(p2)
    s.advance([b])
    while len(a.out) < N or len(b.out) < N:
        s.advance([x for x in (a, b) if len(x.out) < N], chunk=8)
    s.finish(a, b)
    _same(a.out, want1, "a prefill in chunks of 8 beside decodes")
    _same(b.out, want2, "decodes beside a chunked prefill")


def finished(s: Session) -> None:
    """finished_req_ids drops a request's state: the worker holds one request fewer and refuses a later delta
    for it."""
    r = s.new_req(s.prompt(12, seed=4))
    s.advance([r])
    held = s.worker_state()[1]
    s.finish(r)
    after = s.worker_state()[1]
    expect(after == held - 1, f"the worker holds {after} requests after finishing one of {held}")
    late = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=s.next_step, total_num_scheduled_tokens=1,
                          cached_requests=[pb.CachedRequest(req_id=r.rid, num_computed_tokens=12,
                                                            num_scheduled_tokens=1)])
    s.expect_refused("Execute", late, INVALID_ARGUMENT, "a cached delta for a finished request")


def preempted_resumed(s: Session) -> None:
    """Preempted after 3 tokens (its blocks then overwritten by another request), resumed with all its tokens
    and a new block table: the same tokens as never preempted."""
    p1, p2 = s.prompt(PROMPT_LEN, seed=1), s.prompt(PROMPT_LEN, seed=5)
    want1, want2 = s.reference(p1, N), s.reference(p2, N)
    a = s.new_req(p1)
    while len(a.out) < 3:
        s.advance([a])
    old = list(a.blocks)
    s.preempt(a)
    b = s.new_req(p2)
    s.advance([b])                       # b's prefill overwrites a's old blocks
    expect(set(b.blocks) & set(old), "internal: the other request did not reuse the preempted blocks")
    s.advance([b])
    s.advance([a, b])                    # a resumes: prompt + 3 outputs recomputed in new blocks
    expect(not set(a.blocks) & set(old), "internal: the resumed request got its old blocks back")
    while len(a.out) < N or len(b.out) < N:
        s.advance([x for x in (a, b) if len(x.out) < N])
    s.finish(a, b)
    _same(a.out, want1, "preempted after 3 tokens and resumed")
    _same(b.out, want2, "a request in the preempted request's blocks")


def prefix_hit(s: Session) -> None:
    """A new request whose first two blocks an earlier, finished request filled: sent with those block ids and
    num_computed_tokens 32, it computes only its tail and gives the tokens of a full prefill."""
    bs = s.limits.block_size
    p = s.prompt(PROMPT_LEN, seed=1)
    k = PROMPT_LEN // bs
    a = s.new_req(p)
    s.generate(a, 2, finish=False)
    kept, a.blocks = a.blocks[:k], a.blocks[k:]
    s.finish(a)
    for tail_seed in (None, 6):
        tail = p[k * bs:] if tail_seed is None else s.prompt(11, seed=tail_seed)
        q = p[:k * bs] + tail
        want = s.reference(q, N)
        b = s.new_req(q, blocks=kept, computed=k * bs)
        s.generate(b, N, finish=False)
        kept, b.blocks = b.blocks[:k], b.blocks[k:]
        s.finish(b)
        _same(b.out, want, f"a prefix-cache hit of {k * bs} tokens, {'same' if tail_seed is None else 'other'} tail")
    s.release(kept)


def _finish_held(s: Session, r, want, what: str) -> None:
    s.generate(r, N)
    _same(r.out, want, what)


def gap_refused(s: Session) -> None:
    r, want = s.held(PROMPT_LEN, N, seed=1)
    for skip in (1, 2, 1000):
        msg, commit = s.build([(r, 1)])
        msg.step_id += skip
        try:
            s.expect_refused("Execute", msg, FAILED_PRECONDITION, f"step {msg.step_id} when {s.next_step} is next")
        finally:
            commit(None)
    _finish_held(s, r, want, "after refused gaps")


def replay_refused(s: Session) -> None:
    r, want = s.held(PROMPT_LEN, N, seed=1)
    s.advance([r])
    last = s.last_step
    s.expect_refused("Execute", last, FAILED_PRECONDITION, f"step {last.step_id} sent again")
    zero = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=0)
    s.expect_refused("Execute", zero, FAILED_PRECONDITION, "step 0")
    _finish_held(s, r, want, "after a refused replay")


def _early_successor(s: Session):
    """A held request, its expected tokens, its next step N (built, with its commit) and step N+1 built ahead of
    N's reply, as a front with two steps in flight sends it (the request's next token, no new blocks)."""
    r, want = s.held(PROMPT_LEN, N, seed=1)
    first, commit = s.build([(r, 1)])
    second = pb.StepRequest()
    second.CopyFrom(first)
    second.step_id += 1
    second.cached_requests[0].num_computed_tokens += 1
    del second.cached_requests[0].new_block_ids[:]
    return r, want, first, commit, second


def reorder_refused(s: Session) -> None:
    """Step N+1 before step N (and N not sent) is refused; then N and N+1 in order are served."""
    r, want, first, commit, second = _early_successor(s)
    s.expect_refused("Execute", second, FAILED_PRECONDITION, f"step {second.step_id} before {first.step_id}")
    commit(None)
    s.advance([r])
    s.advance([r])
    _finish_held(s, r, want, "after a refused reorder")


def two_in_flight(s: Session) -> None:
    """A worker that lists steps_in_flight: step N+1 sent just before step N (a front with two steps in flight)
    waits for N and both are served, with the tokens of a request alone."""
    expect(FEATURE_STEPS_IN_FLIGHT in s.info.features,
           f"the worker does not list {FEATURE_STEPS_IN_FLIGHT}: a front with async scheduling refuses it")
    r, want, first, commit, second = _early_successor(s)
    lead = min(0.2, STEP_ORDER_GRACE_S / 4)
    early = s.wire.start("Execute", second)
    time.sleep(lead)        # it reaches the worker first
    s.send(first, commit)
    again, commit2 = s.build([(r, 1)])
    expect(again == second, "internal: the early step is not the one the session would send next")
    try:
        s.send(second, commit2, call=early)
    except Refused as e:
        raise CheckFailed(f"step {second.step_id} sent {lead:.1f} s before step {first.step_id}: refused "
                          f"({e.code.name}: {e.details}), though the worker lists {FEATURE_STEPS_IN_FLIGHT}") from None
    _finish_held(s, r, want, "two steps in flight")


def version_refused_in_step(s: Session) -> None:
    r, want = s.held(PROMPT_LEN, N, seed=1)
    msg, commit = s.build([(r, 1)])
    msg.protocol_version = PROTOCOL_VERSION + 1
    try:
        s.expect_refused("Execute", msg, FAILED_PRECONDITION, f"a step in protocol version {msg.protocol_version}")
    finally:
        commit(None)
    _finish_held(s, r, want, "after a step in another protocol version")


CHECKS = [
    ("delta.new_and_cached", new_and_cached),
    ("delta.batched_in_scheduling_order", batched),
    ("delta.chunked_prefill", chunked_prefill),
    ("delta.chunked_prefill_beside_decode", chunked_beside_decode),
    ("delta.finished", finished),
    ("delta.resumed_after_preemption", preempted_resumed),
    ("delta.prefix_cache_hit", prefix_hit),
    ("step_id.gap_refused", gap_refused),
    ("step_id.replay_refused", replay_refused),
    ("step_id.reorder_refused", reorder_refused),
    ("step_id.two_in_flight", two_in_flight),
    ("step.protocol_version_refused", version_refused_in_step),
]
