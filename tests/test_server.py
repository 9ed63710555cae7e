"""End to end: the real `vllm serve` CLI with `--distributed-executor-backend ms_rpc` and an embedded MindSpore
worker process, driven through the OpenAI API, checked against HF transformers on the same checkpoint.

The server runs with a small chunked-prefill budget (64 tokens) and a small KV cache (20 blocks of 16), so the
concurrent greedy test also exercises chunked prefill, mixed prefill/decode steps and preemption + resumption.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest

from conftest import PROMPTS, Server, cmdline, concurrent_greedy, descendants, hf_greedy, metric

MAX_NEW = 32
CHUNK = 64


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "vllm_serve.log"
    s = Server(default_model, ["--block-size", "16", "--max-num-batched-tokens", str(CHUNK),
                               "--num-gpu-blocks-override", "20", "--max-model-len", "288", "--max-num-seqs", "8",
                               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
               log_path=log)
    try:
        s.wait_healthy()
        yield s
    finally:
        workers = [p for p in descendants(s.proc.pid) if "ms_worker serve" in cmdline(p)]
        s.stop()
    # The embedded worker goes away with the front.
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{p}") for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")], "embedded worker outlived vllm serve"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model))


def post(server, path: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_chat_answers_paris(server, default_model):
    body = {"model": str(default_model), "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    answer = post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


def test_streaming_matches_non_streaming(server, default_model):
    body = {"model": str(default_model), "temperature": 0, "max_tokens": 20, "prompt": "The three primary colors are"}
    full = post(server, "/v1/completions", body)["choices"][0]["text"]
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    pieces = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len([p for p in pieces if p]) > 3, pieces
    assert "".join(pieces) == full


def test_tokens_come_from_a_mindspore_process_without_torch(server):
    workers = [p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)]
    assert len(workers) == 1, [cmdline(p) for p in descendants(server.proc.pid)]
    with open(f"/proc/{workers[0]}/maps") as f:
        maps = f.read()
    assert "mindspore" in maps
    assert "libtorch" not in maps and "/torch/" not in maps


def test_concurrent_greedy_matches_hf_with_chunking_and_preemption(server, default_model, tokenizer):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert max(len(p) for p in prompt_ids) > CHUNK          # one prompt needs chunked prefill
    expected = hf_greedy(default_model, prompt_ids, MAX_NEW)
    preempt_before = metric(server.url + "/metrics", "vllm:num_preemptions_total")

    # requests arrive 0.15 s apart, while earlier ones decode (one or two steps each): all eight overlap, and
    # together they need more KV blocks than the cache has
    got = concurrent_greedy(server.url, default_model, prompt_ids, MAX_NEW, stagger_s=0.15, timeout=600)
    for i in range(len(PROMPTS)):
        assert got[i] == expected[i], f"prompt {i} ({PROMPTS[i][:30]!r}): {got[i]} != {expected[i]}"
    assert metric(server.url + "/metrics", "vllm:num_preemptions_total") > preempt_before, \
        "the small KV cache should force preemption"


SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
     "required": ["color", "count"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
]


def test_structured_outputs_json_schema_and_choice(server, default_model):
    """The grammar bitmask computed in the front constrains the worker's sampling (two-phase step)."""
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(
            model=str(default_model), temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": f"Give me an example JSON value number {i}."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
    choices = ["alpha", "bravo", "charlie"]
    for prompt in ["Pick a word.", "Which is the second NATO letter?"]:
        r = client.chat.completions.create(model=str(default_model), temperature=0, max_tokens=10,
                                           messages=[{"role": "user", "content": prompt}],
                                           extra_body={"structured_outputs": {"choice": choices}})
        assert r.choices[0].message.content in choices
    r = client.completions.create(model=str(default_model), prompt="Call me at", max_tokens=12, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", r.choices[0].text), r.choices[0].text


def test_parallel_sampling_n(server, default_model):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    r = client.completions.create(model=str(default_model), prompt="My favourite animal is", max_tokens=8, n=3,
                                  temperature=1.0, seed=11)
    assert len(r.choices) == 3 and all(c.text for c in r.choices)


def test_bad_request_fails_alone(server, default_model):
    """An out-of-vocabulary logit_bias is refused for that request; a request beside it is served."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(default_model), prompt="Hi", max_tokens=4,
                                  logit_bias={"999999": 5})
    ok = client.completions.create(model=str(default_model), prompt="Hi", max_tokens=4, temperature=0)
    assert ok.choices[0].text


def test_logprob_token_ids_through_the_server(server, default_model):
    """logprob_token_ids through the completions API: each token's top_logprobs are the sampled token and the chosen
    ids, with the logprobs a top-5 request gives the same tokens; ids outside the vocabulary get a 400 for that
    request alone, and the server goes on serving."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    kw = dict(model=str(default_model), prompt="The capital of France is", max_tokens=3, temperature=0,
              extra_body={"return_tokens_as_token_ids": True})
    top = client.completions.create(logprobs=5, **kw).choices[0].logprobs
    chosen = [int(t.split(":")[1]) for t in top.top_logprobs[0]][::-1][:4]
    kw["extra_body"] = {**kw["extra_body"], "logprob_token_ids": chosen}
    got = client.completions.create(logprobs=1, **kw).choices[0].logprobs    # the API asks for logprobs set too
    assert got.tokens == top.tokens, (got.tokens, top.tokens)
    first = got.top_logprobs[0]
    assert set(first) == {got.tokens[0], *(f"token_id:{t}" for t in chosen)}, first
    for t, lp in first.items():
        assert abs(lp - top.top_logprobs[0][t]) <= 1e-3, (t, lp, top.top_logprobs[0])
    assert all(set(step) == {tok, *(f"token_id:{t}" for t in chosen)}
               for step, tok in zip(got.top_logprobs, got.tokens)), got.top_logprobs
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(default_model), prompt="Hi", max_tokens=4, logprobs=1,
                                  extra_body={"logprob_token_ids": [1, 10**7]})
    assert "logprob_token_ids" in str(e.value), e.value
    ok = client.completions.create(model=str(default_model), prompt="Hi", max_tokens=4, temperature=0)
    assert ok.choices[0].text


def test_front_refuses_what_vllm_refuses(server, default_model):
    """Bad input on the front is vLLM's to refuse, and still is with ms_rpc: a prompt longer than the context and
    max_tokens past it get 400s that say why, and the server keeps serving."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(default_model), prompt=[1] * 400, max_tokens=4)
    assert "288" in str(e.value)                                 # names the model's context length
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(default_model), prompt="Hi", max_tokens=1000)
    assert "288" in str(e.value)
    ok = client.completions.create(model=str(default_model), prompt="Hi", max_tokens=4, temperature=0)
    assert ok.choices[0].text


def test_prefix_cache_hits_across_blocks_of_128(default_model, tmp_path):
    """vLLM's CPU block size (128): a second prompt sharing a prefix of more than three blocks with the first is
    served from the prefix cache (vLLM's metrics count the hits) and both continue exactly as HF's greedy."""
    import numpy as np

    rng = np.random.default_rng(7)
    prefix = [int(t) for t in rng.integers(100, 20000, size=3 * 128 + 70)]
    prompts = [prefix + [int(t) for t in rng.integers(100, 20000, size=n)] for n in (11, 29)]
    s = Server(default_model, ["--max-model-len", "640", "--kv-cache-memory-bytes", str(256 << 20),
                               "--max-num-seqs", "4", "--enable-prefix-caching"], log_path=tmp_path / "serve.log")
    try:
        s.wait_healthy()
        got = []
        for i, p in enumerate(prompts):
            hits = metric(s.url + "/metrics", "vllm:prefix_cache_hits_total")
            body = {"model": str(default_model), "prompt": p, "temperature": 0, "max_tokens": 12, "ignore_eos": True,
                    "return_token_ids": True}
            got.append(post(s, "/v1/completions", body)["choices"][0]["token_ids"])
            hit = metric(s.url + "/metrics", "vllm:prefix_cache_hits_total") - hits
            if i == 0:
                assert hit == 0, hit
            else:
                assert hit >= 3 * 128, f"the second prompt reused {hit} cached tokens"
    finally:
        s.stop()
    assert got == hf_greedy(default_model, prompts, 12)
