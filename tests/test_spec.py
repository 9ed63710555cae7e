"""Speculative decoding with ngram drafts (`--speculative-config '{"method": "ngram", ...}'`).

Unit level: the worker's numpy n-gram proposer against vLLM's own (numba) one, and the draft verification of the
worker's sampler against the target distribution (vLLM's rule for drafts without probabilities: accept a draft d
with probability p(d), else draw from p without d; the emitted token then follows p). End to end: one served
engine with ngram drafts, a small chunked-prefill budget and a KV cache small enough to preempt; greedy tokens
equal HF transformers' (as the same server without drafts does: tests/test_server.py), drafts are accepted on
repetitive prompts (vLLM's own spec-decode metrics), logprobs come per emitted token, and methods that need a
draft model are refused at start-up.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import Server, assert_draws_follow, concurrent_greedy, hf_greedy, metric, one_row_request, toy_logits

K = 3


def test_ngram_proposer_matches_vllm():
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as vllm_propose

    from ms_worker.spec import propose_ngram

    rng = np.random.default_rng(0)
    proposed = 0
    for _ in range(3000):
        n = int(rng.integers(1, 80))
        tokens = rng.integers(0, int(rng.integers(2, 8)), n).astype(np.int32)
        lo = int(rng.integers(1, 4))
        hi = int(rng.integers(lo, 7))
        k = int(rng.integers(1, 6))
        max_len = int(rng.integers(n, n + 6))
        want = vllm_propose(tokens, lo, hi, max_len, k).tolist()
        assert propose_ngram(tokens, lo, hi, k, max_len).tolist() == want, (tokens.tolist(), lo, hi, k, max_len)
        proposed += bool(want)
    assert proposed > 1000            # the cases do propose


def test_draft_verification_keeps_the_distribution():
    """A random row verifying draft d returns d with probability p(d) and otherwise a token drawn from p without
    d: the token follows p (chi-square), at temperature 1 and with top-k; a greedy row returns its argmax."""
    from ms_worker.sampler import Sampler
    from ms_worker.spec import accept
    from ms_worker.state import Sampling

    logits, p, order = toy_logits(48)
    top_k = np.zeros_like(p)
    top_k[order[:6]] = p[order[:6]]
    for sampling, expected, draft in [(Sampling(temperature=1.0), p, int(order[0])),
                                      (Sampling(temperature=1.0), p, int(order[10])),
                                      (Sampling(temperature=1.0, top_k=6), top_k, int(order[2])),
                                      (Sampling(temperature=1.0, top_k=6), top_k, int(order[20]))]:
        sampler, req = Sampler(seed=3), one_row_request(sampling)
        draws = [sampler.sample(logits[None, :], [req], drafts=[draft])[0].token for _ in range(20000)]
        assert_draws_follow(draws, expected, (sampling, draft))

    greedy = one_row_request(Sampling(), "g")
    best = int(np.argmax(logits))
    for draft in (best, int(order[5]), -1):
        assert Sampler(seed=1).sample(logits[None, :], [greedy], drafts=[draft])[0].token == best
    # Emitted: accepted drafts, then the first differing token (or the bonus token after all drafts).
    assert accept([5, 6, 7], [5, 6, 7, 8]) == 4
    assert accept([5, 6, 7], [5, 9, 7, 8]) == 2
    assert accept([-1, -1], [4, 5, 6]) == 1


def test_draft_budget_keeps_the_drafts_that_pay():
    """DraftBudget (the worker's choice of which proposed drafts get a row): with step costs of 79 / 110 / 172 ms
    at 8 / 16 / 32 rows, 8 requests of 3 drafts each keep none at a low acceptance, the 8 likeliest (each
    request's first) when 2 of 3 are accepted (the 16-row bucket pays, the 32-row one not yet), all of them when
    every draft is accepted or when a bigger step costs nothing more; a bucket never run is tried; a request
    without drafts drifts back to the prior (so drafting is tried again); a step over the largest bucket keeps
    every draft."""
    from ms_worker.spec import DraftBudget
    from ms_worker.state import RequestState

    def budget(costs):
        b = DraftBudget((1, 2, 4, 8, 16, 32, 64))
        for rows, s in costs.items():
            b.record_step(rows, s)
        return b

    def requests(accepted_of_3, n=8):
        reqs = [RequestState(f"r{i}", i, 4, None, None) for i in range(n)]
        for r in reqs:
            for _ in range(20):
                b.observe(r, 3, accepted_of_3)
        return reqs

    proposals = lambda reqs: [(r, np.array([5, 6, 7])) for r in reqs]
    kept = lambda reqs, rows=8: [len(d) for d in b.choose(proposals(reqs), rows)]
    cpu = {8: 0.079, 16: 0.110, 32: 0.172}
    b = budget(cpu)
    assert kept(requests(0)) == [0] * 8
    b = budget(cpu)
    assert kept(requests(2)) == [1] * 8
    assert kept(requests(3)) == [3] * 8
    b = budget({8: 0.079, 16: 0.079, 32: 0.079})
    assert kept(requests(1)) == [3] * 8
    b = budget({8: 0.079})                       # 16 and 32 never ran: assumed to cost what 8 does, so tried
    assert kept(requests(0)) == [3] * 8
    b = budget(cpu)
    low = requests(0)
    assert kept(low) == [0] * 8
    for _ in range(60):                          # sampled steps without drafts: back to the prior (0.5)
        for r in low:
            b.observe(r, 0, 0)
    b.hits, b.tries = 2.0, 2.0                   # the other requests' drafts were all accepted
    assert sum(kept(low)) > 0
    assert kept(requests(0), 60) == [3] * 8      # 60 + 24 rows: over the largest bucket
    # A step's cost is a moving average (faster steps count more): one slow 32-row step does not price it out.
    b = budget(cpu)
    b.record_step(32, 1.0)
    assert 0.172 < b.cost[32] < 0.4


# -- end to end -----------------------------------------------------------------------------------------------
REPEAT = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the"
CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
FREE = ["The capital of France is", "Once upon a time, in a small village by the mountains, there lived",
        "Explain gravity to a child in one paragraph. " * 6]
MAX_NEW = 40


@pytest.fixture(scope="module")
def spec_server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("spec") / "vllm_serve.log"
    spec = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    s = Server(default_model, ["--block-size", "16", "--max-num-batched-tokens", "64", "--num-gpu-blocks-override",
                               "24", "--max-model-len", "320", "--max-num-seqs", "8",
                               "--speculative-config", json.dumps(spec), "--structured-outputs-config",
                               '{"backend": "xgrammar", "disable_any_whitespace": true}'], log_path=log)
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model))


def test_greedy_with_drafts_equals_hf(spec_server, default_model, tokenizer):
    """Repetitive, code and free prompts at once (8 requests over a 64-token step budget and 24 blocks of 16: chunked
    prefill, drafts beside prefill chunks, preemption): every token equals HF's greedy one, and drafts were
    scored and accepted (vLLM's spec-decode counters)."""
    url = spec_server.url + "/metrics"
    drafts0 = metric(url, "vllm:spec_decode_num_draft_tokens_total")
    accepted0 = metric(url, "vllm:spec_decode_num_accepted_tokens_total")
    prompts = [REPEAT, CODE, REPEAT + " mat. The", CODE + "    return a * b\n\n\ndef div(a, b):\n"] + FREE + [REPEAT]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    got = concurrent_greedy(spec_server.url, default_model, ids, MAX_NEW, stagger_s=0.3)
    want = hf_greedy(default_model, ids, MAX_NEW)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i}: {tokenizer.decode(g)!r} != HF {tokenizer.decode(w)!r}"
    drafts = metric(url, "vllm:spec_decode_num_draft_tokens_total") - drafts0
    accepted = metric(url, "vllm:spec_decode_num_accepted_tokens_total") - accepted0
    assert drafts > 0 and 0 < accepted <= drafts, (drafts, accepted)
    # Per position: a draft is accepted only after every draft before it, so the counts never rise with the
    # position, and they add up to the accepted tokens.
    text = urllib.request.urlopen(url).read().decode()
    per_pos = [0.0] * K
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total{"):
            pos = int(line.split('position="')[1].split('"')[0])
            per_pos[pos] += float(line.rsplit(" ", 1)[1])
    assert per_pos[0] > 0 and all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos
    assert sum(per_pos) == metric(url, "vllm:spec_decode_num_accepted_tokens_total"), per_pos


def post(server, body: dict) -> dict:
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_logprobs_and_sampling_with_drafts(spec_server, default_model, tokenizer):
    """Logprobs come per emitted token (greedy: each is its distribution's top token); seeded random sampling
    with drafts repeats itself; min_p and logit_bias are refused per request by vLLM itself (400)."""
    body = {"model": str(default_model), "prompt": REPEAT, "max_tokens": 24, "temperature": 0, "logprobs": 2,
            "ignore_eos": True}
    out = post(spec_server, body)["choices"][0]["logprobs"]
    assert len(out["tokens"]) == 24 == len(out["token_logprobs"]) == len(out["top_logprobs"])
    for tok, lp, top in zip(out["tokens"], out["token_logprobs"], out["top_logprobs"]):
        assert lp == pytest.approx(max(top.values()), abs=1e-5) and lp <= 0, (tok, lp, top)
    seeded = {"model": str(default_model), "prompt": REPEAT, "max_tokens": 24, "temperature": 0.8, "seed": 7,
              "ignore_eos": True}
    first, second = post(spec_server, seeded), post(spec_server, seeded)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    for extra in ({"min_p": 0.1}, {"logit_bias": {"5": 1.0}}):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(spec_server, {**seeded, **extra})
        assert e.value.code == 400


def test_structured_output_with_drafts(spec_server, default_model):
    """A regex that repeats the prompt's own text: drafts are proposed, checked against the grammar (one bitmask
    row per scored position), accepted, and the text matches."""
    url = spec_server.url + "/metrics"
    accepted0 = metric(url, "vllm:spec_decode_num_accepted_tokens_total")
    pattern = "( The (cat|dog) sat on the (mat|log)[.]){4}"
    body = {"model": str(default_model), "prompt": REPEAT + " log.", "max_tokens": 60, "temperature": 0,
            "structured_outputs": {"regex": pattern}}
    text = post(spec_server, body)["choices"][0]["text"]
    assert re.fullmatch(pattern, text), text
    assert metric(url, "vllm:spec_decode_num_accepted_tokens_total") > accepted0


def test_draft_model_methods_refused_at_start_up(default_model, tmp_path):
    """A method that needs a draft model stops start-up with one line naming what ms_rpc supports."""
    log = tmp_path / "serve.log"
    spec = {"method": "draft_model", "model": str(default_model), "num_speculative_tokens": 2}
    s = Server(default_model, ["--max-model-len", "256", "--num-gpu-blocks-override", "16",
                               "--speculative-config", json.dumps(spec)], log_path=log)
    try:
        rc = s.proc.wait(300)
    finally:
        s.stop()
    assert rc != 0
    text = log.read_text()
    assert ("--speculative-config method 'draft_model' is not supported by --distributed-executor-backend ms_rpc"
            in text and "supported: ngram" in text), text[-3000:]
