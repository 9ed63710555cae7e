"""The numpy reference worker (`python -m ms_rpc.reference serve`), a second implementation of the ms_rpc.v1
contract without MindSpore or torch:
  * it imports neither framework (nor ms_worker / ms_models / vLLM), and passes the conformance kit on SmolLM2,
    and with --simulate-step-ms;
  * its decoder's logits equal HF transformers' on tiny random Llama (llama3 RoPE scaling), Qwen2 (q/k/v bias),
    Qwen3 (q/k norm) and Mistral (sliding window) checkpoints, through its paged KV cache in chunks;
  * vLLM with it as an external worker serves greedy tokens identical to HF transformers (SmolLM2, and a tiny
    random Qwen3 made here);
  * --simulate-step-ms: vLLM's OpenAI server completes requests through it, each step takes at least the given
    time, and the tokens are the simulator's deterministic ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (FRONT_PY, PROMPTS, ROOT, WORKER_PY, Server, concurrent_greedy, hf_greedy, start_worker)

ENTRY = ["-m", "ms_rpc.reference"]
FORBIDDEN = ("torch", "vllm", "mindspore", "ms_worker", "ms_models", "vllm_ext", "transformers")
MAX_NEW = 12


def _stop(proc) -> None:
    proc.kill()
    proc.wait()


def _generate(model, address: str, prompt_ids, max_new: int, *flags: str) -> list[list[int]]:
    """Greedy tokens from vLLM's offline API with the ms_rpc executor driving the worker at `address`."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "offline_generate.py"), str(model), "ms_rpc",
                          json.dumps(prompt_ids), str(max_new), "--kv-cache-mib", "64", *flags],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "MS_RPC_WORKERS": address})
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("python", [WORKER_PY, FRONT_PY], ids=["worker_env", "front_env"])
def test_imports_no_framework(python, tmp_path):
    out = subprocess.run([str(python), "-c", "import sys, ms_rpc.reference.server, ms_rpc.reference.model, "
                          "ms_rpc.reference.simulate; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "proto")})
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = {m.split(".")[0] for m in out.stdout.split()}
    assert not loaded & set(FORBIDDEN), f"the reference worker imports {sorted(loaded & set(FORBIDDEN))}"


@pytest.mark.parametrize("flags, python", [([], WORKER_PY), (["--simulate-step-ms", "2"], FRONT_PY)],
                         ids=["model_numpy1", "simulate_numpy2"])
def test_conformance_kit_passes(flags, python, default_model, tmp_path):
    """The worker served from either environment (numpy 1 and numpy 2)."""
    proc, address = start_worker(default_model, flags, tmp_path / "reference.log", entry=ENTRY, python=python)
    try:
        out = subprocess.run([str(FRONT_PY), "-m", "ms_rpc.conformance", address, "--model", str(default_model)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        _stop(proc)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1].endswith(" 0 failed") and out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    passed = [l for l in lines if l.startswith("PASS ")]
    assert len(passed) == len(lines) - 1 >= 40, out.stdout


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_decoder_logits_equal_hf(arch, tmp_path):
    """Prefill in chunks of 5 then decodes, one token a forward, through a paged cache with a scattered block
    table, beside a second sequence in the same forwards: every position's logits as HF computes them."""
    import torch

    from ms_rpc.reference.config import load_config
    from ms_rpc.reference.model import Chunk, Decoder
    from test_models import _make_checkpoint

    hf = _make_checkpoint(arch, seed=30)
    hf.save_pretrained(tmp_path)
    cfg = load_config(tmp_path)
    model = Decoder(cfg, tmp_path)
    model.allocate_kv_cache(num_blocks=16, block_size=4)
    seqs = [np.random.default_rng(i).integers(3, cfg.vocab_size, n) for i, n in enumerate((23, 11))]
    tables = [np.array([9, 2, 14, 5, 0, 7]), np.array([3, 12, 1])]
    with torch.no_grad():
        want = [hf(torch.tensor(s[None])).logits[0].numpy() for s in seqs]
    got = [[], []]
    pos = [0, 0]
    while pos[0] < len(seqs[0]) or pos[1] < len(seqs[1]):
        chunks, which = [], []
        for i, s in enumerate(seqs):
            n = min(5 if pos[i] < 12 else 1, len(s) - pos[i])
            if n:
                chunks.append(Chunk(s[pos[i]:pos[i] + n], pos[i], tables[i]))
                which.append((i, n))
        rows = np.arange(sum(n for _, n in which))
        logits = model.forward(chunks, rows)
        k = 0
        for i, n in which:
            got[i].append(logits[k:k + n])
            k += n
            pos[i] += n
    for i in range(2):
        g = np.concatenate(got[i])
        assert np.abs(g - want[i]).max() < 1e-4, (arch, i, np.abs(g - want[i]).max())
        assert (g.argmax(-1) == want[i].argmax(-1)).all()


def test_vllm_greedy_equals_hf(default_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    want = hf_greedy(default_model, prompt_ids, MAX_NEW)
    proc, address = start_worker(default_model, [], tmp_path / "reference.log", entry=ENTRY)
    try:
        got = _generate(default_model, address, prompt_ids, MAX_NEW)
    finally:
        _stop(proc)
    assert got == want


def test_simulate_step_ms(default_model, tmp_path):
    """Three concurrent completions through vLLM's OpenAI server: each of their MAX_NEW tokens needs a step of at
    least STEP_MS, and each token is the simulator's prediction from the previous token and its position."""
    from ms_rpc.reference.simulate import next_token

    step_ms = 100
    proc, address = start_worker(default_model, ["--simulate-step-ms", str(step_ms)], tmp_path / "reference.log",
                                 entry=ENTRY)
    server = Server(default_model, ["--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20)],
                    env={"MS_RPC_WORKERS": address}, log_path=tmp_path / "vllm.log")
    try:
        server.wait_healthy()
        prompts = [[101, 202, 303], [7, 8, 9, 10, 11], [4000]]
        t0 = time.monotonic()
        got = concurrent_greedy(server.url, default_model, prompts, MAX_NEW)
        elapsed = time.monotonic() - t0
    finally:
        server.stop()
        _stop(proc)
    vocab = json.loads((default_model / "config.json").read_text())["vocab_size"]
    for p, out in zip(prompts, got):
        want, seq = [], list(p)
        for _ in range(MAX_NEW):
            seq.append(next_token(seq[-1], len(seq) - 1, vocab))
            want.append(seq[-1])
        assert out == want
    assert elapsed >= MAX_NEW * step_ms / 1000, elapsed


def _both(params: dict, tokens: list[int], num_prompt: int):
    """The same request for the reference sampler and for ms_worker's (an independent implementation)."""
    from types import SimpleNamespace

    from ms_rpc.reference.state import Request
    from ms_rpc.v1 import worker_pb2 as pb
    from ms_worker.state import Sampling

    p = pb.SamplingParams(**params)
    ours = Request("r", num_prompt, p, list(tokens), [])
    theirs = SimpleNamespace(req_id="r", token_ids=np.array(tokens, np.int32), num_prompt_tokens=num_prompt,
                             sampling=Sampling.from_proto(p), generator=None)
    return ours, theirs


SAMPLING_CASES = [
    {}, {"presence_penalty": 1.5}, {"frequency_penalty": -0.7}, {"repetition_penalty": 1.8},
    {"logit_bias": {5: 4.0, 17: -100.0}}, {"allowed_token_ids": [3, 9, 40, 41, 63]},
    {"bad_words": [{"token_ids": [12]}, {"token_ids": [30, 31]}]}, {"min_tokens": 9, "stop_token_ids": [0, 1, 2]},
    {"temperature": 0.7, "top_k": 6}, {"temperature": 1.3, "top_p": 0.6}, {"temperature": 0.9, "min_p": 0.2},
    {"logprob_token_ids": [7, 3, 7, 60]}, {"temperature": 0.7, "top_k": 6, "logprob_token_ids": [63, 0, 2]},
]


@pytest.mark.parametrize("mode", range(4), ids=["raw_logprobs", "raw_logits", "processed_logprobs",
                                                "processed_logits"])
def test_sampler_agrees_with_ms_worker(mode):
    """Each sampling parameter on random logits of a request with outputs: the reference sampler and ms_worker's
    give the same greedy token and the same top-5 logprobs (or those of logprob_token_ids) in every LogprobsMode
    (and the parameters change the result: the test would notice a sampler that ignored them)."""
    from ms_rpc.reference.sampler import Sampler as Ours
    from ms_worker.sampler import Sampler as Theirs

    rng = np.random.default_rng(mode)
    logits = rng.normal(0, 2, 64).astype(np.float32)
    top = int(np.argmax(logits))               # an output token, so that the penalties move it
    tokens = rng.integers(0, 64, 16).tolist() + [top, top, 30, 30, 12, 30]   # bad word [30, 31] armed, [12] always
    firsts = []
    for case in SAMPLING_CASES:
        ours, theirs = _both({**case, "want_logprobs": True, "logprobs": 5, "logprobs_mode": mode}, tokens, 16)
        a = Ours(1).sample(ours, logits)
        b = Theirs(1).sample(logits[None], [theirs])[0]
        greedy = "temperature" not in case
        if greedy:
            assert a.token == b.token and a.rank == b.rank, (case, a, b)
        lo = 0 if greedy else 1                # a random row's own token depends on the generator
        assert a.logprob_ids[lo:] == b.logprob_token_ids[lo:], (case, a, b)
        np.testing.assert_allclose(a.logprobs[lo:], b.logprobs[lo:], rtol=1e-6, atol=1e-5, err_msg=str(case))
        firsts.append((a.token if greedy else -1, a.logprob_ids[1:], np.round(a.logprobs[1:], 4).tolist()))
    # raw modes: the parameters change the greedy token; processed modes: the top logprobs too
    changed = {f[0] for f in firsts} if mode < 2 else {json.dumps(f) for f in firsts}
    assert len(changed) >= (4 if mode < 2 else len(SAMPLING_CASES) - 2), firsts


def test_sampler_draws_follow_the_distribution():
    """Chi-square goodness of fit of the reference sampler's draws at temperature 1, with top-k, top-p and min-p;
    a seeded request draws the same tokens whatever the shared generator did."""
    from conftest import assert_draws_follow, toy_logits

    from ms_rpc.reference.sampler import Sampler

    logits, p, order = toy_logits(64)

    def keep(mask):
        out = np.zeros_like(p)
        out[mask] = p[mask]
        return out

    kept_p = order[(np.cumsum(p[order]) - p[order]) < 0.7]
    cases = [({"temperature": 1.0}, p), ({"temperature": 1.0, "top_k": 8}, keep(order[:8])),
             ({"temperature": 1.0, "top_p": 0.7}, keep(kept_p)),
             ({"temperature": 1.0, "min_p": 0.3}, keep(p >= 0.3 * p.max()))]
    for params, expected in cases:
        sampler = Sampler(1)
        req, _ = _both(params, [1], 1)
        assert_draws_follow([sampler.sample(req, logits).token for _ in range(20000)], expected, params)
    seeded = []
    for shared in (1, 2):
        sampler = Sampler(shared)
        sampler.sample(_both({"temperature": 1.0}, [1], 1)[0], logits)
        req = _both({"temperature": 1.0, "seed": 77}, [1], 1)[0]
        req.generator = np.random.default_rng(77)
        seeded.append([sampler.sample(req, logits).token for _ in range(20)])
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_read_half_precision_shards(dtype, tmp_path):
    """A checkpoint saved in bfloat16 / float16 in several shards reads back as exactly its values in float32."""
    import torch

    from ms_rpc.reference.weights import Weights
    from test_models import _make_checkpoint

    model = _make_checkpoint("qwen3", seed=32).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    w = Weights(tmp_path)
    state = model.state_dict()
    names = [k for k in state if k in w]
    assert len(names) >= len(state) - 1, sorted(set(state) - set(names))    # tied lm_head may be left out
    for k in names:
        assert np.array_equal(w.get(k), state[k].float().numpy()), k
