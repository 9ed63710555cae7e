"""The batched sampler (ms_worker/sampler.py) gives bit-identical results to the row-at-a-time sampler it replaced
(kept below as the oracle, plus logprob_token_ids): tokens, logprob values and ids, ranks, prompt logprobs, and the
state of every generator afterwards, on random batches that mix every feature (greedy and random rows, seeded and
not, penalties, logit bias, allowed ids, bad words, min_tokens, grammar masks, all four logprobs modes,
logprob_token_ids, top-k, top-p, min_p, ties, fully masked rows), with token_ids given as lists or as int32 array
slices.

Pure numpy: runs in the front env (pytest, numpy 2) and, as a script, in the worker env (numpy 1):
    .venv-worker/bin/python tests/test_sampler_batch.py            # the same checks
    .venv/bin/python tests/test_sampler_batch.py --time            # old vs new time per sample() call
"""

from __future__ import annotations

import copy
import dataclasses
import struct
import sys
import time
from pathlib import Path

import numpy as np
try:
    import pytest
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # fully masked rows (NaN), as before
except ImportError:                                                    # the worker env runs it as a script
    pass

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's ms_worker, not an installed one

from ms_worker import sampler as new                               # noqa: E402
from ms_worker.state import Sampling       # noqa: E402


@dataclasses.dataclass
class RequestState:
    """What the sampler reads of a request (ms_worker.state.RequestState has these attributes)."""
    req_id: str
    token_ids: object
    num_prompt_tokens: int
    block_ids: list
    sampling: Sampling
    generator: object = None
    prompt_lp: object = None


@dataclasses.dataclass
class WorkItem:
    """A request's share of a step (ms_worker.state.Scheduled)."""
    req: RequestState
    start: int
    count: int

SampleResult = new.SampleResult
_EPS = 1e-5
RAW_LOGPROBS, RAW_LOGITS, PROCESSED_LOGPROBS, PROCESSED_LOGITS = range(4)


# ---- the oracle: ms_worker/sampler.py before batching (commit ded75fc), verbatim but for the class name ----------
def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def apply_penalties_and_biases(row: np.ndarray, req: RequestState) -> np.ndarray:
    """Everything before the draw that can change the greedy token (steps 3-6 of vLLM's sampler)."""
    s = req.sampling
    output = req.token_ids[req.num_prompt_tokens:]
    if s.allowed_token_ids:
        mask = np.ones_like(row, dtype=bool)
        mask[s.allowed_token_ids] = False
        row[mask] = -np.inf
    for word in s.bad_words:
        prefix = word[:-1]
        if len(word) <= len(output) + 1 and (not prefix or output[-len(prefix):] == prefix):
            row[word[-1]] = -np.inf
    if s.min_tokens and len(output) < s.min_tokens and s.stop_token_ids:
        row[s.stop_token_ids] = -np.inf
    if s.logit_bias:
        ids = np.fromiter(s.logit_bias.keys(), np.int64)
        row[ids] += np.fromiter(s.logit_bias.values(), np.float32)
    if s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        vocab = row.shape[-1]
        counts = np.bincount(np.asarray(output, np.int64), minlength=vocab)[:vocab]
        if s.repetition_penalty != 1.0:
            seen = counts > 0
            seen[np.asarray(req.token_ids[: req.num_prompt_tokens], np.int64)] = True
            rp = np.float32(s.repetition_penalty)
            row[:] = np.where(seen, np.where(row > 0, row / rp, row * rp), row)
        row -= np.float32(s.frequency_penalty) * counts
        row -= np.float32(s.presence_penalty) * (counts > 0)
    return row


def _truncate(x: np.ndarray, req: RequestState) -> np.ndarray:
    """temperature-scaled logits -> min_p, top-k, top-p masks (masked entries are -inf)."""
    s = req.sampling
    if s.min_p > 0.0:
        p = np.exp(x - x.max())
        x = np.where(p < s.min_p * p.max(), -np.inf, x)
    if 0 < s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x < kth, -np.inf, x)
    if s.top_p < 1.0:
        order = np.argsort(x, kind="stable")                 # ascending, as vLLM's top-p
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        drop = np.cumsum(p) <= 1.0 - s.top_p
        drop[-1] = False                                     # always keep the most likely token
        x = x.copy()
        x[order[drop]] = -np.inf
    return x


def prompt_logprobs_chunk(item, logits: np.ndarray) -> tuple | None:
    """Logprobs of the prompt tokens this chunk predicts (as vLLM: row j scores prompt token j+1), accumulated on
    the request; returns (token_ids, logprobs, ranks) arrays of shape [P-1, N+1] once the prompt is complete."""
    req, s = item.req, item.req.sampling
    p = req.num_prompt_tokens
    n = min(s.prompt_logprobs, logits.shape[-1])     # -1 (all) arrives as 2**32 - 1
    if req.prompt_lp is None:
        req.prompt_lp = (np.zeros((p - 1, n + 1), np.int32), np.zeros((p - 1, n + 1), np.float32),
                         np.zeros((p - 1,), np.int32))
    ids, lps, ranks = req.prompt_lp
    k = min(item.count, p - 1 - item.start)
    if k > 0:
        x = logits[:k].astype(np.float32)
        scores = x if s.logprobs_mode in (RAW_LOGITS, PROCESSED_LOGITS) else log_softmax(x)
        targets = np.asarray(req.token_ids[item.start + 1: item.start + 1 + k], np.int64)
        rows = np.arange(k)
        picked = scores[rows, targets]
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :n]
        sl = slice(item.start, item.start + k)
        ids[sl, 0], lps[sl, 0] = targets, picked
        ids[sl, 1:], lps[sl, 1:] = top, np.take_along_axis(scores, top, axis=-1)
        ranks[sl] = (scores >= picked[:, None]).sum(-1)
    if item.start + item.count >= p:
        req.prompt_lp = None
        return ids, lps, ranks
    return None


class OldSampler:
    def __init__(self, seed: int | None = None):
        """``seed``: of the shared generator that requests without their own seed draw from (CacheConfig's
        sampling_seed); None or 0 = a random one. Tensor-parallel ranks get the same seed and sample the same
        steps in the same order from the same (all-gathered) logits, so their draws, and the tokens they record
        in each request's state, stay identical."""
        self.rng = np.random.default_rng(seed or None)

    def sample(self, logits: np.ndarray, reqs: list[RequestState],
               allowed: list[np.ndarray | None] | None = None) -> list[SampleResult]:
        """logits: [N, vocab] float32, one row per request that samples this step; `allowed[i]` is a boolean
        grammar mask for row i (None = unconstrained)."""
        out: list[SampleResult] = []
        for i, req in enumerate(reqs):
            s = req.sampling
            row = np.array(logits[i], dtype=np.float32)
            if allowed is not None and allowed[i] is not None:
                row[~allowed[i]] = -np.inf
            raw = row.copy() if s.want_logprobs else None
            row = apply_penalties_and_biases(row, req)
            if s.temperature < _EPS:
                token = int(np.argmax(row))
                processed = row
            else:
                processed = _truncate(row / np.float32(s.temperature), req)
                p = np.exp(processed.astype(np.float64) - processed.max())
                rng = req.generator if req.generator is not None else self.rng
                # Exponential race (as vLLM): argmax p / E with E ~ Exp(1) draws the token with probability p.
                token = int(np.argmax(p / rng.exponential(size=p.shape[-1])))
            res = SampleResult(token)
            if s.want_logprobs:
                mode = s.logprobs_mode
                base = raw if mode in (RAW_LOGPROBS, RAW_LOGITS) else processed
                lp = log_softmax(base) if mode in (RAW_LOGPROBS, PROCESSED_LOGPROBS) else base
                top = np.argsort(-lp, kind="stable")[: s.logprobs] if s.logprobs > 0 else np.empty(0, np.int64)
                if s.logprob_token_ids:
                    top = np.asarray(s.logprob_token_ids, np.int64)
                res.logprob_token_ids = [token] + [int(t) for t in top]
                res.logprobs = [float(lp[token])] + [float(lp[t]) for t in top]
                res.rank = int((lp >= lp[token]).sum())       # as vLLM: ties count
            out.append(res)
        return out


# ---- random batches -----------------------------------------------------------------------------------------------
def _logits(rng, n, vocab):
    x = rng.normal(0, 3, size=(n, vocab)).astype(np.float32)
    for i in range(n):
        kind = rng.integers(6)
        if kind == 0:                                 # many ties (top-k / top-p / top-N boundaries)
            x[i] = np.round(x[i] * 2) / 2
        elif kind == 1:                               # a few values only
            x[i] = rng.integers(-3, 3, size=vocab).astype(np.float32)
        elif kind == 2:                               # +-0 and a flat row
            x[i] = np.where(rng.random(vocab) < 0.5, np.float32(0.0), np.float32(-0.0))
    return x


def _request(rng, i, vocab, as_array):
    p = int(rng.integers(1, 40))
    o = int(rng.integers(0, 30))
    ids = rng.integers(0, int(rng.choice([5, 50, vocab])), size=p + o).tolist()   # few ids: counts > 1
    s = Sampling()
    if rng.random() < 0.5:
        s.temperature = float(rng.choice([0.3, 0.7, 1.0, 1.5, 2.0, 1e-5]))
        s.top_k = int(rng.choice([0, 0, -1, 1, 2, 5, 20, 50, vocab, vocab + 3]))
        s.top_p = float(rng.choice([1.0, 1.0, 0.9, 0.5, 0.95, 0.1, 0.999999]))
        s.min_p = float(rng.choice([0.0, 0.0, 0.05, 0.2, 0.9]))
        if rng.random() < 0.5:
            s.seed = int(rng.integers(2**31))
    elif rng.random() < 0.2:
        s.temperature = float(rng.choice([0.0, 9e-6]))
    if rng.random() < 0.5:
        s.want_logprobs = True
        s.logprobs = int(rng.choice([0, 1, 2, 5, 20, 100, 2000]))
        s.logprobs_mode = int(rng.integers(4))
        if rng.random() < 0.3:
            s.logprob_token_ids = rng.integers(0, vocab, size=rng.integers(1, 9)).tolist()
    if rng.random() < 0.3:
        s.repetition_penalty = float(rng.choice([1.0, 0.5, 1.3, 2.0]))
    if rng.random() < 0.3:
        s.frequency_penalty = float(rng.choice([0.0, -1.0, 0.37, 0.1, 1.3]))
    if rng.random() < 0.3:
        s.presence_penalty = float(rng.choice([0.0, -0.3, 0.3, 1.5]))
    if rng.random() < 0.2:
        s.logit_bias = {int(t): float(rng.normal(0, 5)) for t in rng.integers(0, vocab, size=rng.integers(1, 6))}
    if rng.random() < 0.15:
        s.allowed_token_ids = sorted(set(rng.integers(0, vocab, size=rng.integers(1, 60)).tolist()))
    if rng.random() < 0.2:
        out = ids[p:]
        words = [[int(t)] for t in rng.integers(0, vocab, size=2)]
        if len(out) >= 2:
            words.append(out[-2:] + [int(rng.integers(vocab))])      # prefix matches the output's tail
            words.append([out[-1] + 1 if out[-1] + 1 < vocab else 0, 7 % vocab])   # does not
        if len(out) >= 1:
            words.append(out[-1:] + [int(rng.integers(vocab))])
        words.append(ids[:3] + [1])                   # longer than the output, or not a suffix
        s.bad_words = words
    if rng.random() < 0.2:
        s.min_tokens = int(rng.integers(0, 40))
        s.stop_token_ids = rng.integers(0, vocab, size=rng.integers(0, 4)).tolist()
    token_ids = ids
    if as_array and rng.random() < 0.7:
        buf = np.zeros(len(ids) + 10, np.int32)
        buf[3:3 + len(ids)] = ids
        token_ids = buf[3:3 + len(ids)]               # an int32 slice of a bigger array
    gen = np.random.default_rng(s.seed) if s.seed is not None else None
    return RequestState(f"r{i}", token_ids, p, [0], s, generator=gen)


def _masks(rng, n, vocab):
    if rng.random() < 0.3:
        return None
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.6:
            out.append(None)
        elif u < 0.95:
            out.append(rng.random(vocab) < rng.choice([0.01, 0.3, 0.9]))
        else:
            out.append(np.zeros(vocab, bool))         # nothing allowed: a row of -inf
    return out


def _bits(f):
    return struct.pack("<d", f)                       # NaN-aware, sign-of-zero-aware equality


def _same(a: SampleResult, b: SampleResult):
    return (a.token == b.token and a.rank == b.rank and a.logprob_token_ids == b.logprob_token_ids
            and (a.logprobs is None) == (b.logprobs is None)
            and (a.logprobs is None or [_bits(v) for v in a.logprobs] == [_bits(v) for v in b.logprobs]))


def _old_reqs(reqs):
    """The same requests for the oracle: own generators in the same state, token_ids as lists."""
    out = []
    for r in reqs:
        o = copy.copy(r)
        o.token_ids = [int(t) for t in r.token_ids]
        o.generator = copy.deepcopy(r.generator)
        out.append(o)
    return out


def check_batches(seed: int, vocab: int, batches: int, max_n: int, steps: int = 2):
    rng = np.random.default_rng(seed)
    for b in range(batches):
        n = int(rng.integers(1, max_n + 1))
        reqs = [_request(rng, i, vocab, as_array=True) for i in range(n)]
        olds = _old_reqs(reqs)
        shared = int(rng.integers(1, 2**31))
        s_new, s_old = new.Sampler(shared), OldSampler(shared)
        for step in range(steps):                     # the shared and own generators stay in step across calls
            logits = _logits(rng, n, vocab)
            masks = _masks(rng, n, vocab)
            before = logits.copy()
            got = s_new.sample(logits, reqs, masks)
            want = s_old.sample(logits.copy(), olds, masks)
            assert np.array_equal(logits, before), "sample() changed the caller's logits"
            for i, (a, w) in enumerate(zip(got, want)):
                assert _same(a, w), f"seed {seed} V {vocab} batch {b} step {step} row {i} {reqs[i].sampling}:\n{a}\n{w}"
            for r, o in zip(reqs, olds):
                if r.generator is not None:
                    assert r.generator.bit_generator.state == o.generator.bit_generator.state
            assert s_new.rng.bit_generator.state == s_old.rng.bit_generator.state


def check_prompt_logprobs(seed: int, vocab: int, cases: int):
    rng = np.random.default_rng(seed)
    for c in range(cases):
        p = int(rng.integers(2, 40))
        s = Sampling(prompt_logprobs=int(rng.choice([0, 1, 5, 20, vocab // 4, 2**32 - 1])),
                     logprobs_mode=int(rng.integers(4)))
        ids = rng.integers(0, vocab, size=p).tolist()
        token_ids = np.asarray(ids, np.int32) if rng.random() < 0.5 else ids
        logits = _logits(rng, p, vocab)
        chunk = int(rng.integers(1, p + 1))
        r_new = RequestState("a", token_ids, p, [0], s)
        r_old = RequestState("a", list(ids), p, [0], copy.copy(s))
        got = want = None
        for start in range(0, p, chunk):
            count = min(chunk, p - start)
            got = new.prompt_logprobs_chunk(WorkItem(r_new, start, count), logits[start:start + count])
            want = prompt_logprobs_chunk(WorkItem(r_old, start, count), logits[start:start + count])
            assert (got is None) == (want is None)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes(), f"seed {seed} case {c} {s}"


def test_batches_small_vocab():
    for seed in range(4):
        check_batches(seed, 1000, batches=15, max_n=64)


def test_batches_large_vocab():
    check_batches(100, 49152, batches=4, max_n=64, steps=1)
    check_batches(101, 49152, batches=6, max_n=16)


def test_prompt_logprobs():
    check_prompt_logprobs(7, 1000, 40)
    check_prompt_logprobs(8, 49152, 6)


def test_top_n_matches_stable_argsort():
    rng = np.random.default_rng(3)
    for vocab in (7, 100, 1000):
        x = _logits(rng, 40, vocab)
        x[::5, ::3] = -np.inf
        x[1, :] = -np.inf
        x[2, : vocab // 2] = np.nan
        x[3, :-1] = np.nan
        for k in (1, 2, 5, 11, vocab - 1, vocab, vocab + 1):
            want = np.argsort(-x, axis=-1, kind="stable")[:, :min(k, vocab)]
            assert np.array_equal(new._top_n(x, k), want), (vocab, k)


def test_min_p_threshold_rounds_like_a_scalar():
    """`min_p * p.max()` is a Python float times a float32 scalar: float32 under numpy 2, float64 under numpy 1
    (then compared in float32). A min_p just above a row's probability tells the two apart from a float64 compare."""
    vocab = 16
    x = np.full((1, vocab), -30, np.float32)
    x[0, 0], x[0, 1] = 0.0, -1.0
    q = float(np.exp(np.float32(-1.0)))                # p of token 1 as the sampler computes it (float32)
    for min_p in (q, np.nextafter(q, 1.0), np.nextafter(q, 0.0), q * (1 + 2**-30), q * (1 - 2**-30)):
        s = Sampling(temperature=1.0, min_p=float(min_p), want_logprobs=True, logprobs=3,
                     logprobs_mode=PROCESSED_LOGITS)
        got = new.Sampler(5).sample(x, [RequestState("a", [1], 1, [0], s)])[0]
        want = OldSampler(5).sample(x, [RequestState("a", [1], 1, [0], copy.copy(s))])[0]
        assert _same(got, want), (min_p, got, want)


def test_penalties_bit_for_bit():
    """Every processed logit of penalised rows (counts > 1, non-dyadic factors), greedy and random."""
    rng = np.random.default_rng(11)
    vocab, n = 1000, 24
    reqs = []
    for i in range(n):
        s = Sampling(temperature=[0.0, 0.7][i % 2], want_logprobs=True, logprobs=vocab,
                     logprobs_mode=PROCESSED_LOGITS, repetition_penalty=[1.0, 1.3, 0.7][i % 3],
                     frequency_penalty=[0.1, 0.37, 1.3, -0.7][i % 4], presence_penalty=[0.0, 0.3, -1.1][i % 3])
        ids = rng.integers(0, 8, size=60).tolist()
        reqs.append(RequestState(f"p{i}", np.asarray(ids, np.int32) if i % 2 else ids, 20, [0], s))
    x = _logits(rng, n, vocab)
    got = new.Sampler(3).sample(x, reqs)
    want = OldSampler(3).sample(x, _old_reqs(reqs))
    for i, (a, w) in enumerate(zip(got, want)):
        assert _same(a, w), (i, reqs[i].sampling)


def time_calls(reps: int = 5):
    """Time per sample() call, old vs new, at V = 49152: 32 greedy rows, and 32 mixed rows."""
    vocab, n = 49152, 32
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(n, vocab)).astype(np.float32)

    def plain(i):
        return RequestState(f"g{i}", list(range(100, 164)), 40, [0], Sampling())

    def mixed(i):
        s = Sampling()
        if i % 2:
            s.temperature, s.top_k, s.top_p, s.min_p = 0.8, [0, 50][i % 4 == 1], [0.9, 1.0, 0.95][i % 3], 0.05 * (i % 5 == 0)
            s.seed = i if i % 3 == 0 else None
        if i % 4 == 0:
            s.want_logprobs, s.logprobs, s.logprobs_mode = True, 5, i % 8 // 4 * 2
        if i % 3 == 0:
            s.repetition_penalty, s.presence_penalty, s.frequency_penalty = 1.1, 0.2, 0.1
        if i % 8 == 2:
            s.logit_bias = {5: 2.0, 77: -3.0}
        if i % 16 == 6:
            s.bad_words, s.min_tokens, s.stop_token_ids = [[5, 6], [9]], 100, [2]
        r = RequestState(f"m{i}", list(rng.integers(0, vocab, 300)), 200, [0], s)
        r.generator = np.random.default_rng(s.seed) if s.seed is not None else None
        return r

    masks = [rng.random(vocab) < 0.5 if i % 8 == 7 else None for i in range(n)]
    for name, make, m in (("32 greedy rows", plain, None), ("32 mixed rows", mixed, masks)):
        reqs = [make(i) for i in range(n)]
        line = [name]
        for label, smp in (("old", OldSampler(1)), ("new", new.Sampler(1))):
            smp.sample(logits, reqs, m)
            t = time.perf_counter()
            for _ in range(reps):
                smp.sample(logits, reqs, m)
            line.append(f"{label} {(time.perf_counter() - t) / reps * 1e3:8.2f} ms")
        print(f"V={vocab} {line[0]:>15}: {line[1]}  {line[2]}")


if __name__ == "__main__":
    if "--time" in sys.argv:
        time_calls()
    else:
        np.seterr(all="ignore")
        for name, fn in list(globals().items()):
            if name.startswith("test_") and callable(fn):
                t = time.perf_counter()
                fn()
                print(f"{name}: ok ({time.perf_counter() - t:.1f} s, numpy {np.__version__})")


def test_min_tokens_yields_to_a_grammar_that_only_allows_stopping():
    """vLLM's MinTokensLogitsProcessor: min_tokens masks the stop tokens, but a structured-output row that would be
    left with no token at all keeps them (the grammar allows only stopping); an unconstrained row does not, and a
    grammar row with other allowed tokens takes one of those. Both workers' samplers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proto"))
    from ms_rpc.reference.sampler import _process
    vocab, eos = 12, 2
    x = np.linspace(1.0, 0.0, vocab, dtype=np.float32)[None].repeat(3, 0)   # token 0 is every row's argmax
    only_eos = np.zeros(vocab, bool)
    only_eos[eos] = True
    eos_or_5 = only_eos.copy()
    eos_or_5[5] = True
    s = Sampling(min_tokens=4, stop_token_ids=[eos])
    reqs = [RequestState(f"r{i}", [7, 8], 2, [0], copy.copy(s)) for i in range(3)]
    got = [r.token for r in new.Sampler(0).sample(x, reqs, [only_eos, None, eos_or_5])]
    assert got == [eos, 0, 5], got
    for mask, want in ((only_eos, eos), (eos_or_5, 5)):   # the reference worker's sampler, one row at a time
        row = np.where(mask, x[0], -np.inf).astype(np.float32)
        _process(row, type("R", (), {"sampling": s, "output": [], "tokens": [7, 8]})(), structured=True)
        assert int(np.argmax(row)) == want
