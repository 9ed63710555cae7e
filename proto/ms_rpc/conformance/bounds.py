"""Checks that a step outside the worker's bounds (block ids, token ids, lengths, counts, budgets, sampling
ranges) is refused whole with INVALID_ARGUMENT and changes nothing: the request it also scheduled carries on with
the tokens it gives alone. With refuse_alone, only the bad request is refused."""

from __future__ import annotations

import math

import grpc

from ms_rpc.v1 import PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb

from .report import expect
from .session import Session

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
HELD_TOKENS = 2          # tokens the held request generates around the refused step
BAD_ID = "bad-new"


def _add_new(msg: pb.StepRequest, prompt, blocks, scheduled: int | None = None, req_id: str = BAD_ID,
             **sampling) -> pb.NewRequest:
    nr = msg.new_requests.add(req_id=req_id, prompt_token_ids=list(prompt), block_ids=list(blocks),
                              num_scheduled_tokens=len(prompt) if scheduled is None else scheduled,
                              sampling=pb.SamplingParams(**sampling))
    msg.total_num_scheduled_tokens += nr.num_scheduled_tokens
    return nr


def _ok(s: Session) -> list[int]:
    return s.prompt(4, seed=20)


def _spare(s: Session, n: int) -> list[int]:
    """Valid block ids not in use (the step is refused anyway)."""
    return s.free[:n]


def _more_seqs(s: Session, msg, d) -> None:
    for i in range(s.limits.max_num_seqs):
        _add_new(msg, _ok(s), _spare(s, 1), req_id=f"{BAD_ID}-{i}")


def _more_tokens(s: Session, msg, d) -> None:
    n = s.limits.max_num_batched_tokens
    _add_new(msg, s.prompt(n, seed=23), _spare(s, -(-n // s.limits.block_size)))


def _schedule(msg, d, extra: int) -> None:
    d.num_scheduled_tokens += extra
    msg.total_num_scheduled_tokens += extra


def _twice(s: Session, msg, d) -> None:
    msg.cached_requests.append(d)
    msg.total_num_scheduled_tokens += d.num_scheduled_tokens


def _unknown(s: Session, msg, d) -> None:
    msg.cached_requests.add(req_id="never-sent", num_computed_tokens=0, num_scheduled_tokens=1)
    msg.total_num_scheduled_tokens += 1


# name -> mutate(session, step, the held request's delta): a step that schedules the held request's next token and
# is invalid in one way
CASES = {
    "block_id_beyond_cache": lambda s, m, d: _add_new(m, _ok(s), [s.limits.num_blocks]),
    "block_id_negative": lambda s, m, d: _add_new(m, _ok(s), [-1]),
    "token_id_beyond_vocabulary": lambda s, m, d: _add_new(m, [s.vocab] + _ok(s), _spare(s, 1)),
    "token_id_negative": lambda s, m, d: _add_new(m, [-5] + _ok(s), _spare(s, 1)),
    "tokens_beyond_block_table": lambda s, m, d: _add_new(m, s.prompt(s.limits.block_size + 4, seed=21),
                                                          _spare(s, 1)),
    "prompt_beyond_max_model_len": lambda s, m, d: _add_new(m, s.prompt(s.limits.max_model_len + 1, seed=22),
                                                            _spare(s, 1), scheduled=s.limits.block_size),
    "blocks_beyond_max_model_len": lambda s, m, d: d.new_block_ids.extend(
        _spare(s, -(-s.limits.max_model_len // s.limits.block_size))),
    "requests_beyond_max_num_seqs": _more_seqs,
    "tokens_beyond_max_num_batched_tokens": _more_tokens,
    "total_scheduled_tokens_mismatch": lambda s, m, d: setattr(m, "total_num_scheduled_tokens",
                                                               m.total_num_scheduled_tokens + 1),
    "tokens_beyond_known_tokens": lambda s, m, d: _schedule(m, d, 1),
    "zero_tokens_scheduled": lambda s, m, d: _add_new(m, _ok(s), _spare(s, 1), scheduled=0),
    "unknown_request": _unknown,
    "request_scheduled_twice": _twice,
    "new_request_with_a_live_id": lambda s, m, d: _add_new(m, _ok(s), _spare(s, 1), req_id=d.req_id),
    "sampling_not_finite": lambda s, m, d: _add_new(m, _ok(s), _spare(s, 1), temperature=math.nan),
    "sampling_token_beyond_vocabulary": lambda s, m, d: _add_new(m, _ok(s), _spare(s, 1), logit_bias={s.vocab: 1.0}),
    "logprob_token_id_beyond_vocabulary": lambda s, m, d: _add_new(m, _ok(s), _spare(s, 1),
                                                                   logprob_token_ids=[1, s.vocab]),
}


def _carry_on(s: Session, r, want, what: str) -> None:
    s.generate(r, HELD_TOKENS)
    expect(r.out == want, f"after {what} was refused, the request it also scheduled gave {r.out}, alone {want}")


def _bound_check(name: str):
    def check(s: Session) -> None:
        r, want = s.held(12, HELD_TOKENS, seed=24)
        msg, commit = s.build([(r, 1)])
        CASES[name](s, msg, msg.cached_requests[0])
        try:
            s.expect_refused("Execute", msg, INVALID_ARGUMENT, name.replace("_", " "))
        finally:
            commit(None)
        _carry_on(s, r, want, name.replace("_", " "))
    return check


def refused_alone(s: Session) -> None:
    """With refuse_alone, a bad new request is refused alone (its result's error names the worker and the step;
    the worker does not hold it) and the step's other request is served."""
    r, want = s.held(12, HELD_TOKENS, seed=24)
    msg, commit = s.build([(r, 1)], refuse_alone=True)
    _add_new(msg, _ok(s), [s.limits.num_blocks])
    reply = s.wire.call("Execute", msg)
    ids = [x.req_id for x in reply.results]
    expect(ids == [r.rid, BAD_ID], f"results for {ids}: expected the served request, then the refused one")
    err = reply.results[1].error
    expect(s.info.worker_id in err and str(msg.step_id) in err,
           f"the refusal {err!r} does not name worker {s.info.worker_id} and step {msg.step_id}")
    expect(not reply.results[1].sampled_token_ids, "the refused request got tokens")
    served = pb.StepResult()
    served.CopyFrom(reply)
    del served.results[1:]
    commit(served)
    held = s.worker_state()
    expect(held == (s.next_step, 1), f"(next step, active requests) {held}, expected {(s.next_step, 1)}")
    late = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=s.next_step, total_num_scheduled_tokens=1,
                          cached_requests=[pb.CachedRequest(req_id=BAD_ID, num_computed_tokens=4,
                                                            num_scheduled_tokens=1)])
    s.expect_refused("Execute", late, INVALID_ARGUMENT, "a delta for the request refused alone")
    _carry_on(s, r, want, "a request in the same step")


CHECKS = [(f"bounds.{name}", _bound_check(name)) for name in CASES] + [("bounds.refused_alone", refused_alone)]
