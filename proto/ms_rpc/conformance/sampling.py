"""Checks of sampling through the contract: deferred sampling with a grammar bitmask (Execute with
defer_sampling, then Sample), prompt logprobs (also over a chunked prefill), sampled-token logprobs and those of
chosen tokens (logprob_token_ids). Expected values come from the worker's own greedy tokens and logprobs."""

from __future__ import annotations

import grpc
import numpy as np

from ms_rpc.v1 import ALL_LOGPROBS, FEATURE_LOGPROB_TOKEN_IDS, PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb

from .report import expect
from .session import Session, greedy

N = 4
TOP = 3                  # top logprobs asked for
LOGPROB_TOL = 1e-3       # the same logprob computed in two batch shapes
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def _bitmask(vocab: int, rows: list[list[int]]) -> tuple[bytes, int]:
    """Packed int32 words (little-endian, row-major), bit j of word i allowing token 32 * i + j."""
    words = -(-vocab // 32)
    bits = np.zeros((len(rows), words * 32), np.uint8)
    for i, allowed in enumerate(rows):
        bits[i, allowed] = 1
    return np.packbits(bits, axis=1, bitorder="little").tobytes(), words


def deferred_grammar_bitmask(s: Session) -> None:
    """Step N deferred: Execute answers the scheduled requests without tokens; step N+1 and a Sample for another
    step are refused while it waits, and so is a bitmask of the wrong size; Sample with a bitmask that allows one
    token the request would not pick gives that token, the unconstrained request its greedy token, and both carry
    on from there (the forced token is part of the request's history)."""
    p1, p2 = s.prompt(20, seed=31), s.prompt(15, seed=32)
    want1, want2 = s.reference(p1, N), s.reference(p2, N)
    forced = next(t for t in s.prompt(50, seed=33) if t != want1[0])
    after_forced = s.reference(p1 + [forced], N - 1)
    a, b = s.new_req(p1), s.new_req(p2)
    sched = [(a, a.remaining), (b, b.remaining)]
    msg, commit = s.build(sched, defer_sampling=True)
    reply = s.wire.call("Execute", msg)
    commit(reply)
    ids = [r.req_id for r in reply.results]
    expect(ids == [a.rid, b.rid], f"the deferred step answered for {ids}, scheduled {[a.rid, b.rid]}")
    expect(not any(r.sampled_token_ids for r in reply.results), "the deferred step returned tokens before Sample")

    nxt = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=s.next_step)
    s.expect_refused("Execute", nxt, FAILED_PRECONDITION, f"step {s.next_step} while step {msg.step_id} awaits Sample")
    s.expect_refused("Sample", pb.SampleRequest(protocol_version=PROTOCOL_VERSION, step_id=msg.step_id + 1),
                     FAILED_PRECONDITION, f"Sample for step {msg.step_id + 1} while step {msg.step_id} is deferred")
    mask, words = _bitmask(s.vocab, [[forced]])
    short = pb.SampleRequest(protocol_version=PROTOCOL_VERSION, step_id=msg.step_id, structured_req_ids=[a.rid],
                             grammar_bitmask=mask[:-4], bitmask_words=words)
    s.expect_refused("Sample", short, INVALID_ARGUMENT, "a bitmask one word short")
    good = pb.SampleRequest(protocol_version=PROTOCOL_VERSION, step_id=msg.step_id, structured_req_ids=[a.rid],
                            grammar_bitmask=mask, bitmask_words=words)
    res = s.wire.call("Sample", good)
    expect(res.step_id == msg.step_id, f"Sample for step {msg.step_id} answered for step {res.step_id}")
    s.record(res, sched)
    expect(a.out == [forced], f"the bitmask allowed only token {forced}; the request got {a.out}")
    expect(b.out == want2[:1], f"the request outside the bitmask got {b.out}, greedy alone {want2[:1]}")
    while len(a.out) < N:
        s.advance([a, b])
    s.finish(a, b)
    expect(a.out[1:] == after_forced, f"after the forced token: {a.out[1:]}; the prompt with that token appended "
                                      f"gives {after_forced}")
    expect(b.out == want2, f"the unconstrained request: {b.out}, alone {want2}")


def deferred_without_bitmask(s: Session) -> None:
    """Every step deferred, each Sampled without a bitmask: the greedy tokens."""
    p = s.prompt(20, seed=31)
    want = s.reference(p, N)
    r = s.new_req(p)
    while len(r.out) < N:
        sched = [(r, r.remaining)]
        msg, commit = s.build(sched, defer_sampling=True)
        commit(s.wire.call("Execute", msg))
        s.record(s.wire.call("Sample", pb.SampleRequest(protocol_version=PROTOCOL_VERSION, step_id=msg.step_id)),
                 sched)
    s.finish(r)
    expect(r.out == want, f"deferred steps gave {r.out}, undeferred {want}")


def _prompt_rows(res: pb.RequestResult, n_prompt: int, what: str):
    """A result's PromptLogprobs as arrays ([P-1, TOP+1] ids and logprobs, [P-1] ranks), shape-checked."""
    lp = res.prompt_logprobs
    expect(lp.width == TOP + 1, f"{what}: prompt logprobs of width {lp.width}, asked for {TOP} (width {TOP + 1})")
    rows = n_prompt - 1
    expect(len(lp.token_ids) == len(lp.logprobs) == rows * lp.width and len(lp.ranks) == rows,
           f"{what}: {len(lp.token_ids)} ids, {len(lp.logprobs)} logprobs, {len(lp.ranks)} ranks for {rows} prompt "
           f"positions of width {lp.width}")
    return (np.reshape(lp.token_ids, (rows, lp.width)), np.reshape(lp.logprobs, (rows, lp.width)),
            np.asarray(lp.ranks))


def _well_formed(ids, lps, ranks, tokens, what: str) -> None:
    """Row i: the scored token, then the top tokens in descending logprob; the scored token's rank and logprob
    agree with the top."""
    expect((ids[:, 0] == tokens).all(), f"{what}: rows name tokens {ids[:, 0].tolist()}, expected {tokens}")
    expect((lps <= 1e-6).all() and np.isfinite(lps).all(), f"{what}: logprobs above 0 or not finite")
    expect((np.diff(lps[:, 1:], axis=1) <= 1e-6).all(), f"{what}: top logprobs not in descending order")
    expect((ranks >= 1).all(), f"{what}: ranks {ranks.tolist()} below 1")
    top1 = ranks == 1
    expect((ids[top1, 0] == ids[top1, 1]).all(), f"{what}: a token of rank 1 is not the top-1 token")
    expect((lps[:, 0] <= lps[:, 1] + 1e-5).all(), f"{what}: a token scores above the top-1 logprob")
    expect((np.abs(lps[top1, 0] - lps[top1, 1]) <= 1e-5).all(), f"{what}: a rank-1 token's logprob differs from the "
                                                               f"top-1 logprob")


def prompt_logprobs(s: Session) -> None:
    """Prompt logprobs arrive once, in the step that completes the prefill, with the same rows in one prefill
    or in chunks; the prompt's continuation by the worker's own greedy tokens has rank 1 at every position."""
    p = s.prompt(20, seed=34)
    cont = s.reference(p, N)
    q = p + cont[:-1]
    got = []
    for chunk in (0, 8):
        r = s.new_req(q, greedy(prompt_logprobs=TOP))
        s.generate(r, 1, chunk=chunk)
        what = f"prompt logprobs ({'one prefill' if not chunk else f'chunks of {chunk}'})"
        with_lp = [i for i, res in enumerate(r.results) if res.prompt_logprobs.width]
        expect(with_lp == [len(r.results) - 1], f"{what}: prompt logprobs in steps {with_lp} of the request's "
                                                f"{len(r.results)}, expected only its last")
        ids, lps, ranks = _prompt_rows(r.results[-1], len(q), what)
        _well_formed(ids, lps, ranks, q[1:], what)
        greedy_rows = ranks[len(p) - 1:]
        expect((greedy_rows == 1).all(), f"{what}: the worker's own greedy tokens rank {greedy_rows.tolist()}")
        expect(r.out == cont[-1:], f"{what}: the next token is {r.out}, greedy {cont[-1:]}")
        got.append((ids, lps))
    (ids0, lps0), (ids1, lps1) = got
    expect((ids0[:, 0] == ids1[:, 0]).all() and np.abs(lps0 - lps1).max() <= LOGPROB_TOL,
           f"prompt logprobs differ between one prefill and chunks (max {np.abs(lps0 - lps1).max():.2e})")


def sampled_logprobs(s: Session) -> None:
    """Logprobs of sampled tokens: per token [sampled, top-1..top-N], the greedy token of rank 1, the tokens as
    without logprobs, and each logprob the prompt logprob of the same token at the same position."""
    p = s.prompt(20, seed=34)
    want = s.reference(p, N)
    r = s.new_req(p, greedy(logprobs=TOP, want_logprobs=True))
    s.generate(r, N)
    expect(r.out == want, f"with logprobs the tokens are {r.out}, without {want}")
    rows = [(list(x.logprobs.token_ids), list(x.logprobs.logprobs), list(x.logprobs.ranks)) for x in r.results]
    for k, (ids, lps, ranks) in enumerate(rows):
        expect(len(ids) == len(lps) == TOP + 1 and len(ranks) == 1,
               f"token {k}: {len(ids)} ids, {len(lps)} logprobs, {len(ranks)} ranks; expected {TOP + 1}, {TOP + 1}, 1")
        _well_formed(np.array([ids]), np.array([lps]), np.array(ranks), [r.out[k]], f"token {k}")
        expect(ranks == [1], f"token {k}: greedy token of rank {ranks}")
    q = s.new_req(p + want, greedy(prompt_logprobs=TOP))
    s.generate(q, 1)
    ids, lps, _ = _prompt_rows(q.results[-1], len(q.prompt), "prompt logprobs")
    scored = lps[len(p) - 1:, 0]
    sampled = np.array([x[1][0] for x in rows])
    expect(np.abs(scored - sampled).max() <= LOGPROB_TOL,
           f"sampled logprobs {sampled.tolist()} differ from the prompt logprobs of the same tokens "
           f"{scored.tolist()}")


def chosen_token_logprobs(s: Session) -> None:
    """logprob_token_ids: per token [sampled, the ids in their order (repeats too)], each logprob and the sampled
    token's rank those of a whole-vocabulary (logprobs = 2**32-1) request for the same prompt; the ids win over
    `logprobs` when both are set; the tokens are as without logprobs."""
    expect(FEATURE_LOGPROB_TOKEN_IDS in s.info.features,
           f"the worker does not list {FEATURE_LOGPROB_TOKEN_IDS} (features {list(s.info.features)})")
    p = s.prompt(20, seed=35)
    want = s.reference(p, N)
    every = s.new_req(p, greedy(logprobs=ALL_LOGPROBS, want_logprobs=True))
    s.generate(every, N)
    full = []                                      # per token: the logprob of each vocabulary id, by id
    for x in every.results:
        ids = np.asarray(x.logprobs.token_ids[1:])
        expect(np.array_equal(np.sort(ids), np.arange(s.vocab)),
               f"a whole-vocabulary row names {len(ids)} ids, not each of the vocabulary's {s.vocab} once")
        f = np.empty(s.vocab)
        f[ids] = x.logprobs.logprobs[1:]
        full.append(f)
    chosen = [want[0], *s.prompt(3, seed=36), want[0]]
    for extra in ({}, {"logprobs": TOP}):
        what = f"logprob_token_ids {chosen}" + (f" with logprobs {TOP}" if extra else "")
        r = s.new_req(p, greedy(logprob_token_ids=chosen, **extra))
        s.generate(r, N)
        expect(r.out == want, f"{what}: the tokens are {r.out}, without logprobs {want}")
        for k, (x, e, f) in enumerate(zip(r.results, every.results, full)):
            ids, lps = list(x.logprobs.token_ids), np.asarray(x.logprobs.logprobs)
            expect(ids == [r.out[k], *chosen], f"{what}, token {k}: ids {ids}, expected {[r.out[k], *chosen]}")
            ref = f[[r.out[k], *chosen]]
            expect(np.abs(lps - ref).max() <= LOGPROB_TOL,
                   f"{what}, token {k}: logprobs {lps.tolist()}, the whole vocabulary's {ref.tolist()}")
            expect(list(x.logprobs.ranks) == list(e.logprobs.ranks),
                   f"{what}, token {k}: rank {list(x.logprobs.ranks)}, the whole vocabulary's {list(e.logprobs.ranks)}")


CHECKS = [
    ("sampling.deferred_with_grammar_bitmask", deferred_grammar_bitmask),
    ("sampling.deferred_without_bitmask", deferred_without_bitmask),
    ("sampling.prompt_logprobs", prompt_logprobs),
    ("sampling.sampled_logprobs", sampled_logprobs),
    ("sampling.chosen_token_logprobs", chosen_token_logprobs),
]
