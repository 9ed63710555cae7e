"""Token sampling on the host, from the logits of each sampling row (numpy, float32), in vLLM's order:

grammar bitmask -> (raw logprobs) -> allowed_token_ids -> bad words -> min_tokens -> logit_bias -> repetition,
frequency and presence penalties -> greedy argmax, or temperature -> min_p -> top-k -> top-p -> draw.

A seeded request draws from its own generator, so its tokens do not depend on what else is batched with it;
others draw from the worker's shared generator.

Each step is one set of numpy operations over the rows that need it (a batch of plain greedy rows is one argmax);
per-row Python is left where the semantics are per row: the bad-words prefix test and each row's draw from its
generator. The arithmetic is that of a row-at-a-time sampler, operation for operation, so the results are
bit-identical to it (tests/test_sampler_batch.py keeps one as the oracle), under numpy 1 (the worker) and 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms_worker.state import RequestState

_EPS = 1e-5
RAW_LOGPROBS, RAW_LOGITS, PROCESSED_LOGPROBS, PROCESSED_LOGITS = range(4)


@dataclass
class SampleResult:
    token: int
    logprob_token_ids: list[int] | None = None   # sampled token first, then the top-N (or the request's ids)
    logprobs: list[float] | None = None
    rank: int = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _as_list(seq) -> list:
    """token ids (a list or a 1-D integer array) as a list of ints."""
    return seq.tolist() if isinstance(seq, np.ndarray) else list(seq)


def _top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """[m, n] indices of each row's n highest scores, highest first, ties by index: exactly
    ``np.argsort(-scores, axis=-1, kind="stable")[:, :n]``, without sorting whole rows when n is small."""
    m, vocab = scores.shape
    n = min(n, vocab)
    if n <= 0 or m == 0:
        return np.empty((m, max(n, 0)), np.int64)
    if 8 * n >= vocab:
        return np.argsort(-scores, axis=-1, kind="stable")[:, :n]
    neg = -scores
    t = np.partition(neg, n - 1, axis=-1)[:, n - 1:n]         # each row's n-th smallest of -scores (NaN last)
    cand = neg <= t                                          # the rows' top n and their ties (NaN never)
    count = cand.sum(-1)
    out = np.empty((m, n), np.int64)
    # Rows where t is NaN (fewer than n numbers) or with many ties at t (e.g. -inf): sort the whole row.
    slow = (count < n) | (count > 8 * n + 64)
    for i in np.flatnonzero(slow):
        out[i] = np.argsort(neg[i], kind="stable")[:n]
    fast = np.flatnonzero(~slow)
    if fast.size:
        r, c = np.nonzero(cand[fast])                        # row-major: by row, then by index
        order = np.lexsort((neg[fast[r], c], r))             # stable: by row, then score, then index
        starts = np.concatenate(([0], np.cumsum(count[fast])[:-1]))
        out[fast] = c[order][starts[:, None] + np.arange(n)]
    return out


def _top_p_row(x: np.ndarray, top_p: float) -> np.ndarray:
    """vLLM's top-p on one row, through a stable argsort (rows with NaN or +-inf as their maximum)."""
    order = np.argsort(x, kind="stable")                     # ascending, as vLLM's top-p
    p = np.exp(x[order] - x.max())
    p /= p.sum()
    drop = np.cumsum(p) <= 1.0 - top_p
    drop[-1] = False                                         # always keep the most likely token
    x = x.copy()
    x[order[drop]] = -np.inf
    return x


def _top_p(x: np.ndarray, top_p: list[float]) -> np.ndarray:
    """vLLM's top-p on rows of temperature-scaled logits: the same sums as _top_p_row in the same order, from a
    plain sort. Cumulative probabilities in ascending order are non-decreasing, so the stable argsort's dropped
    entries are a prefix of D of them: every entry below the D-th value v, and the first (by index) of those
    equal to v."""
    m, vocab = x.shape
    s = np.sort(x, axis=-1)
    mx = s[:, -1:]
    ok = np.isfinite(mx[:, 0])                               # no NaN, no +inf, not all -inf
    out = x.copy()
    for i in np.flatnonzero(~ok):
        out[i] = _top_p_row(x[i], top_p[i])
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return out
    s, x, mx = s[rows], x[rows], mx[rows]
    p = np.exp(s - mx)
    p /= p.sum(axis=-1, keepdims=True)
    thr = np.array([np.float32(1.0 - top_p[i]) for i in rows], np.float32)   # as `float32 <= python float`
    d = np.minimum((np.cumsum(p, axis=-1) <= thr[:, None]).sum(-1), vocab - 1)
    v = s[np.arange(rows.size), np.maximum(d - 1, 0)][:, None]
    drop = x < v
    eq = x == v
    extra = d - drop.sum(-1)                                 # how many entries equal to v go, first by index
    drop |= eq & (np.cumsum(eq, axis=-1) <= extra[:, None])
    drop[d == 0] = False
    x[drop] = -np.inf
    out[rows] = x
    return out


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
        top = _top_n(scores, n)
        sl = slice(item.start, item.start + k)
        ids[sl, 0], lps[sl, 0] = targets, picked
        ids[sl, 1:], lps[sl, 1:] = top, np.take_along_axis(scores, top, axis=-1)
        ranks[sl] = (scores >= picked[:, None]).sum(-1)
    if item.start + item.count >= p:
        req.prompt_lp = None
        return ids, lps, ranks
    return None


def _rows(pairs: list[tuple[int, list]]) -> tuple[np.ndarray, np.ndarray]:
    """(row, ids) pairs -> flat (row index per id, ids) arrays for fancy indexing."""
    r = np.repeat(np.array([i for i, _ in pairs], np.int64), [len(ids) for _, ids in pairs])
    c = np.concatenate([np.asarray(ids, np.int64) for _, ids in pairs])
    return r, c


class Sampler:
    def __init__(self, seed: int | None = None):
        """``seed``: of the shared generator that requests without their own seed draw from (CacheConfig's
        sampling_seed); None or 0 = a random one. Tensor-parallel ranks get the same seed and sample the same
        steps in the same order from the same (all-gathered) logits, so their draws, and the tokens they record
        in each request's state, stay identical."""
        self.rng = np.random.default_rng(seed or None)

    def sample(self, logits: np.ndarray, reqs: list[RequestState],
               allowed: list[np.ndarray | None] | None = None, drafts: list[int] | None = None) -> list[SampleResult]:
        """logits: [N, vocab] float32, one row per request that samples this step; `allowed[i]` is a boolean
        grammar mask for row i (None = unconstrained). A request's token_ids may be a list or a 1-D int array.

        `drafts[i]` >= 0: row i verifies that speculative draft by vLLM's rejection rule for drafts without
        probabilities (ngram): a greedy row returns its argmax as always (the draft is accepted if equal); a random
        row returns the draft with its target probability p(draft) (one uniform draw from the row's generator),
        else a token drawn from the target with the draft excluded -- so the row's token has the target
        distribution either way."""
        n = len(reqs)
        x = np.asarray(logits, dtype=np.float32)[:n]
        vocab = x.shape[-1]
        ss = [r.sampling for r in reqs]

        # What each row needs (per-row Python over the parameters only).
        grammar = [i for i in range(n) if allowed is not None and allowed[i] is not None]
        allow_ids, banned, stops, bias, pen = [], [], [], [], []
        for i, (req, s) in enumerate(zip(reqs, ss)):
            if not (s.allowed_token_ids or s.bad_words or s.min_tokens or s.logit_bias
                    or s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty):
                continue
            output = req.token_ids[req.num_prompt_tokens:]
            if s.allowed_token_ids:
                allow_ids.append((i, s.allowed_token_ids))
            ban = []
            for word in s.bad_words:
                prefix = word[:-1]
                if len(word) <= len(output) + 1 and (
                        not prefix or _as_list(output[len(output) - len(prefix):]) == list(prefix)):
                    ban.append(word[-1])
            if ban:
                banned.append((i, ban))
            if s.min_tokens and len(output) < s.min_tokens and s.stop_token_ids:
                stops.append((i, list(s.stop_token_ids)))
            if s.logit_bias:
                bias.append(i)
            if s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
                pen.append(i)
        want = [i for i in range(n) if ss[i].want_logprobs]
        raw_rows = [i for i in want if ss[i].logprobs_mode in (RAW_LOGPROBS, RAW_LOGITS)]
        if grammar or allow_ids or banned or stops or bias or pen:
            x = np.array(x)                                  # the caller's logits stay as they were

        if grammar:
            keep = np.stack([np.asarray(allowed[i]) for i in grammar])
            x[grammar] = np.where(keep, x[grammar], np.float32(-np.inf))
        raw = x[raw_rows] if raw_rows else None              # copy, before the penalties
        if allow_ids:
            rows = [i for i, _ in allow_ids]
            keep = np.zeros((len(rows), vocab), bool)
            r, c = _rows([(j, ids) for j, (_, ids) in enumerate(allow_ids)])
            keep[r, c] = True
            sub = x[rows]
            sub[~keep] = -np.inf
            x[rows] = sub
        if banned:
            x[_rows(banned)] = -np.inf
        if stops:   # min_tokens; a grammar row left with no token at all keeps its stop tokens (vLLM's rule)
            r, c = _rows(stops)
            kept = x[r, c]
            x[r, c] = -np.inf
            for i in set(grammar).intersection(r.tolist()):
                if np.isneginf(x[i]).all():
                    x[i, c[r == i]] = kept[r == i]
        if bias:
            r, c = _rows([(i, list(ss[i].logit_bias.keys())) for i in bias])
            x[r, c] += np.concatenate([np.fromiter(ss[i].logit_bias.values(), np.float32) for i in bias])
        if pen:
            self._penalize(x, pen, reqs)

        # Greedy rows: one argmax. Random rows: temperature -> min_p -> top-k -> top-p -> draw.
        tokens = np.empty(n, np.int64)
        greedy = [i for i in range(n) if ss[i].temperature < _EPS]
        rand = [i for i in range(n) if ss[i].temperature >= _EPS]
        if len(greedy) == n:
            tokens[:] = np.argmax(x, axis=-1)
        elif greedy:
            tokens[greedy] = np.argmax(x[greedy], axis=-1)
        xt = None
        if rand:
            xt = self._truncate(x[rand] / np.array([[np.float32(ss[i].temperature)] for i in rand], np.float32),
                                [ss[i] for i in rand])
            p = np.exp(xt.astype(np.float64) - xt.max(axis=-1, keepdims=True))
            e = np.empty_like(p)
            accepted = {}
            for j, i in enumerate(rand):
                rng = reqs[i].generator if reqs[i].generator is not None else self.rng
                # Exponential race (as vLLM): argmax p / E with E ~ Exp(1) draws the token with probability p.
                e[j] = rng.exponential(size=vocab)
                d = -1 if drafts is None else drafts[i]
                if d >= 0:
                    if p[j, d] / p[j].sum() >= rng.random():
                        accepted[i] = d
                    else:
                        p[j, d] = 0.0
            tokens[rand] = np.argmax(p / e, axis=-1)
            for i, d in accepted.items():
                tokens[i] = d

        out = [SampleResult(int(t)) for t in tokens]
        if want:
            self._logprobs(out, want, raw_rows, raw, x, rand, xt, tokens, ss)
        return out

    @staticmethod
    def _penalize(x: np.ndarray, pen: list[int], reqs: list[RequestState]) -> None:
        """Repetition, frequency and presence penalties on rows `pen` of x, in place; output-token counts from one
        bincount over the rows' offsets into a flattened [rows, vocab]."""
        vocab = x.shape[-1]
        outs = [np.asarray(reqs[i].token_ids[reqs[i].num_prompt_tokens:], np.int64) for i in pen]
        flat = np.concatenate([o[o < vocab] + j * vocab for j, o in enumerate(outs)])
        if flat.size and min(o.min() for o in outs if o.size) < 0:
            raise ValueError("negative token id in a request's output")
        counts = np.bincount(flat, minlength=len(pen) * vocab).reshape(len(pen), vocab)
        sub = x[pen]
        rep = [j for j, i in enumerate(pen) if reqs[i].sampling.repetition_penalty != 1.0]
        if rep:
            seen = counts[rep] > 0
            r, c = _rows([(k, reqs[pen[j]].token_ids[: reqs[pen[j]].num_prompt_tokens]) for k, j in enumerate(rep)])
            seen[r, c] = True
            rp = np.array([[np.float32(reqs[pen[j]].sampling.repetition_penalty)] for j in rep], np.float32)
            v = sub[rep]
            sub[rep] = np.where(seen, np.where(v > 0, v / rp, v * rp), v)
        # float32 factor * int64 counts is float64 (as a float32 scalar times them would be): subtracted in float64.
        sub -= np.array([[np.float32(reqs[i].sampling.frequency_penalty)] for i in pen], np.float32) * counts
        sub -= np.array([[np.float32(reqs[i].sampling.presence_penalty)] for i in pen], np.float32) * (counts > 0)
        x[pen] = sub

    @staticmethod
    def _truncate(x: np.ndarray, ss: list) -> np.ndarray:
        """temperature-scaled logits -> min_p, top-k, top-p masks (masked entries are -inf), row i by ss[i]."""
        rows = [j for j, s in enumerate(ss) if s.min_p > 0.0]
        if rows:
            sub = x[rows]
            p = np.exp(sub - sub.max(axis=-1, keepdims=True))
            pmax = p.max(axis=-1)
            # `min_p * p.max()` as a Python float times a float32 scalar, then compared in float32: float32
            # arithmetic under numpy 2, float64 rounded to float32 under numpy 1.
            thr = np.array([ss[j].min_p * pmax[k] for k, j in enumerate(rows)]).astype(np.float32)
            x[rows] = np.where(p < thr[:, None], np.float32(-np.inf), sub)
        vocab = x.shape[-1]
        for k in sorted({s.top_k for s in ss if 0 < s.top_k < vocab}):
            rows = [j for j, s in enumerate(ss) if s.top_k == k]
            sub = x[rows]
            kth = np.partition(sub, -k, axis=-1)[:, -k:-k + 1 or None]
            x[rows] = np.where(sub < kth, np.float32(-np.inf), sub)
        rows = [j for j, s in enumerate(ss) if s.top_p < 1.0]
        if rows:
            x[rows] = _top_p(x[rows], [ss[j].top_p for j in rows])
        return x

    @staticmethod
    def _logprobs(out, want, raw_rows, raw, x, rand, xt, tokens, ss) -> None:
        """Logprobs of rows `want` (sampled token, then its logprob_token_ids or the top-N with ties by index;
        rank) in each row's mode."""
        vocab = x.shape[-1]
        base = np.empty((len(want), vocab), np.float32)
        pos_raw = {i: j for j, i in enumerate(raw_rows)}
        pos_rand = {i: j for j, i in enumerate(rand)}
        for j, i in enumerate(want):
            if i in pos_raw:
                base[j] = raw[pos_raw[i]]
            elif i in pos_rand:
                base[j] = xt[pos_rand[i]]
            else:
                base[j] = x[i]
        norm = [j for j, i in enumerate(want) if ss[i].logprobs_mode in (RAW_LOGPROBS, PROCESSED_LOGPROBS)]
        if norm:
            base[norm] = log_softmax(base[norm])
        tok = tokens[want]
        picked = base[np.arange(len(want)), tok]
        ranks = (base >= picked[:, None]).sum(-1)            # as vLLM: ties count
        tops: list = [None] * len(want)
        chosen = [j for j, i in enumerate(want) if ss[i].logprob_token_ids]
        if chosen:                                           # the rows' own token ids, in their order
            r, c = _rows([(j, ss[want[j]].logprob_token_ids) for j in chosen])
            vals = base[r, c].tolist()
            at = 0
            for j in chosen:
                ids = ss[want[j]].logprob_token_ids
                tops[j] = (list(ids), vals[at:at + len(ids)])
                at += len(ids)
        for k in sorted({max(ss[i].logprobs, 0) for j, i in enumerate(want) if tops[j] is None}):
            rows = [j for j, i in enumerate(want) if tops[j] is None and max(ss[i].logprobs, 0) == k]
            top = _top_n(base[rows], k)
            vals = np.take_along_axis(base[rows], top, axis=-1)
            for r, j in enumerate(rows):
                tops[j] = (top[r].tolist(), vals[r].tolist())
        for j, i in enumerate(want):
            ids, vals = tops[j]
            res = out[i]
            res.logprob_token_ids = [res.token] + ids
            res.logprobs = [float(picked[j])] + vals
            res.rank = int(ranks[j])
