"""Correctness of ms_models (MindSpore Llama, paged KV cache) against HF transformers.

Runs in the front env (.venv: torch + transformers, no MindSpore). Tiny random Llama
models are saved with save_pretrained; this same file is then run as a script under
.venv-worker/bin/python (``--ms-side spec.json``) to drive ms_models through full
prefills, chunked prefills, one-token decodes and mixed batches on a paged cache; the
logits it records are compared with HF's (atol 1e-4) and its greedy tokens must match.
Model 1: untied, fp32, single file. Model 2: tied embeddings, q/k/v/o and MLP biases,
llama3 RoPE scaling, bf16 sharded checkpoint. Both jit; model 1 also PyNative. If
models/SmolLM2-135M-Instruct exists, a short scenario also runs on the real weights.
"""
import json
import os
import subprocess
import sys

import numpy as np

try:
    import pytest
except ImportError:  # running as the MindSpore-side script under .venv-worker
    pytest = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_PY = os.path.join(REPO, ".venv-worker", "bin", "python")
BLOCK_SIZE = 4
NUM_BLOCKS = 40
PROMPT_LENS = {"A": 11, "B": 7, "C": 5, "D": 13}
ATOL = 1e-4


# ============================================================================ MindSpore side
class _Req:
    def __init__(self, name, prompt):
        self.name = name
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.num_computed = 0
        self.blocks = []


def _ms_run_job(job):
    """Drives one model through the scenario; saves records to job['out'] (.npz)."""
    import time

    from ms_models import load_model
    from ms_models.batch import FlatBatch

    t0 = time.perf_counter()
    model = load_model(job["model_dir"], device="cpu", use_jit=job["use_jit"])
    load_s = time.perf_counter() - t0
    if job.get("scenario") != "short":
        # a first, smaller cache compiled once, then replaced: the new cache must be used
        model.allocate_kv_cache(8, BLOCK_SIZE, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16)
        assert set(model.warmup()) >= {(16, 4), (1, 1)}
    # graphs of at most 8 tokens: the 11- and 13-token steps below run as two forwards each (FlatBatch.split),
    # cutting requests in two
    model.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=8)
    if "split_overhead" in job:   # cut steps below the largest bucket too (batch.token_parts): 5 -> 4 + 1, ...
        model.split_overhead = job["split_overhead"]
    if job.get("scenario") != "short":
        model.warmup()  # dummy runs write nothing
    rng = np.random.default_rng(1)
    pool = [int(b) for b in rng.permutation(NUM_BLOCKS)]  # non-contiguous block ids
    reqs = {n: _Req(n, p) for n, p in job["prompts"].items()}
    rec_name, rec_pos, rec_logits, step_s = [], [], [], []

    def step(items):
        for name, n in items:
            r = reqs[name]
            assert r.num_computed + n <= len(r.tokens), (name, r.num_computed, n)
            while len(r.blocks) * BLOCK_SIZE < r.num_computed + n:
                r.blocks.append(pool.pop())
        rs = [reqs[name] for name, _ in items]
        batch = FlatBatch.build([r.tokens for r in rs], [r.num_computed for r in rs], [n for _, n in items],
                                [r.blocks for r in rs], BLOCK_SIZE)
        t = time.perf_counter()
        logits = model.forward(batch)
        step_s.append(time.perf_counter() - t)
        assert logits.shape == (len(items), model.config.vocab_size) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        for b, (name, n) in enumerate(items):
            r = reqs[name]
            r.num_computed += n
            rec_name.append(name)
            rec_pos.append(r.num_computed - 1)
            rec_logits.append(logits[b])
            if r.num_computed == len(r.tokens):  # whole sequence computed: sample greedily
                r.tokens.append(int(np.argmax(logits[b])))

    if job.get("scenario") == "short":  # real model: few shapes (each compiles in seconds)
        step([("A", 11)])
        for _ in range(4):
            step([("A", 1)])
        step([("B", 4), ("A", 1)])
        step([("B", 3), ("A", 1)])
        step([("B", 1), ("A", 1)])
    else:
        step([("A", 11)])                                   # full prefill
        step([("A", 1)])                                    # decodes, one token at a time
        step([("A", 1)])
        step([("B", 4)])                                    # chunked prefill: 4 + 3 tokens
        step([("B", 3)])
        step([("A", 1), ("D", 6), ("C", 5), ("B", 1)])      # mixed: decode, chunk, full prefill, decode
        step([("D", 7), ("C", 1), ("A", 1)])                # mixed: last chunk + decodes (9 tokens: 8 + 1)
        for _ in range(3):
            step([("A", 1), ("B", 1), ("C", 1), ("D", 1)])  # batched decode

    # padding and dummy rows write nothing: blocks no request owns are still all zero
    used = sorted({b for r in reqs.values() for b in r.blocks})
    unused = [b for b in range(NUM_BLOCKS + 1) if b not in used]
    untouched = True
    for kv in model.kv_caches():
        for cache in kv:
            kvh, hd = model.config.num_kv_heads, model.config.head_dim
            assert tuple(cache.shape) == (NUM_BLOCKS + 1, BLOCK_SIZE, kvh, hd)
            c = cache.asnumpy()
            untouched &= bool(np.all(c[unused] == 0)) and bool(np.any(c[used] != 0))
    np.savez(job["out"], names=np.array(rec_name), positions=np.array(rec_pos), logits=np.stack(rec_logits),
             unused_untouched=untouched, load_s=load_s, step_s=np.array(step_s),
             weight_bytes=model.weight_bytes(), kv_bytes=model.kv_cache_bytes_per_block(BLOCK_SIZE),
             config_hash=model.config.config_hash,
             **{"tokens_" + n: np.array(r.tokens) for n, r in reqs.items()})


def _ms_side(spec_path):
    sys.path.insert(0, REPO)
    with open(spec_path) as f:
        spec = json.load(f)
    for job in spec["jobs"]:
        _ms_run_job(job)


# ============================================================================ front (pytest) side
def run_ms_side(ckpts: dict, d, vocab: int, timeout: int = 900) -> dict:
    """This scenario's MindSpore side for every checkpoint (name -> (directory, HF model)), in one worker-env
    process working in directory ``d``, on random prompts of PROMPT_LENS over ``vocab`` tokens:
    {"prompts": name -> token ids, "out": checkpoint name -> its npz}."""
    rng = np.random.default_rng(0)
    prompts = {n: [int(x) for x in rng.integers(0, vocab, size=L)] for n, L in PROMPT_LENS.items()}
    jobs = [dict(model_dir=str(path), out=str(d / f"{name}.npz"), use_jit=True, prompts=prompts)
            for name, (path, _) in ckpts.items()]
    spec = d / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=REPO)
    p = subprocess.run([WORKER_PY, os.path.abspath(__file__), "--ms-side", str(spec)], cwd=str(d), env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"MindSpore side failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return dict(prompts=prompts, out={name: str(d / f"{name}.npz") for name in ckpts})


def _make_hf_model(tied, seed, **extra):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, **extra)
    from conftest import perturb_norms_and_biases  # here: the MindSpore side runs this file without pytest

    # non-trivial norms (1 + noise) so that gamma folding is tested
    return perturb_norms_and_biases(LlamaForCausalLM(cfg).to(torch.float32).eval(), bias_std=0.05)


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def _compare(model, npz_path, prompts, atol=ATOL, min_new=4):
    r = np.load(npz_path)
    prompts = {n: p for n, p in prompts.items() if ("tokens_" + n) in r.files and len(r["tokens_" + n]) > len(p)}
    hf_cache = {}
    for n in prompts:
        hf_cache[n] = _hf_logits(model, [int(t) for t in r["tokens_" + n][:-1]])
    worst = 0.0
    for name, pos, lg in zip(r["names"], r["positions"], r["logits"]):
        ref = hf_cache[str(name)][int(pos)]
        err = float(np.max(np.abs(ref - lg)))
        worst = max(worst, err)
        assert err < atol, f"request {name} position {pos}: max |ms - hf| = {err:.3g}"
    for n, p in prompts.items():
        toks = [int(t) for t in r["tokens_" + n]]
        ref = hf_cache[n]
        hf_greedy = [int(np.argmax(ref[i])) for i in range(len(p) - 1, len(toks) - 1)]
        assert toks[len(p):] == hf_greedy, f"request {n}: greedy tokens differ"
        assert len(toks) >= len(p) + min_new
    assert bool(r["unused_untouched"]), "padding/dummy writes touched blocks not owned by any request"
    return worst, r


def check_against_hf(ckpts: dict, ms_forward: dict, name: str, atol=ATOL):
    """_compare for checkpoint ``name`` of run_ms_side's output ``ms_forward``, and the front's config hash (pure
    Python, from the directory) == the worker's. Returns (the front's ModelConfig, the npz record)."""
    from ms_models.config import ModelConfig

    path, model = ckpts[name]
    worst, r = _compare(model, ms_forward["out"][name], ms_forward["prompts"], atol=atol)
    print(f"{name}: max |ms - hf| = {worst:.2e} over {len(r['names'])} logit rows")
    cfg = ModelConfig.from_model_dir(str(path))
    assert cfg.config_hash == str(r["config_hash"])
    return cfg, r


if pytest is not None:

    @pytest.fixture(scope="module")
    def ms_runs(tmp_path_factory):
        if not os.path.exists(WORKER_PY):
            pytest.skip(f"worker env missing: {WORKER_PY}")
        pytest.importorskip("transformers")
        import torch

        d = tmp_path_factory.mktemp("ms_models")
        rng = np.random.default_rng(0)
        prompts = {n: [int(x) for x in rng.integers(3, 131, size=L)] for n, L in PROMPT_LENS.items()}
        # 1: untied, fp32, single model.safetensors, plain RoPE
        m1 = _make_hf_model(tied=False, seed=0)
        m1.save_pretrained(d / "untied")
        # 2: tied embeddings, attention/mlp biases, llama3 RoPE scaling, bf16 sharded checkpoint
        m2 = _make_hf_model(tied=True, seed=1, attention_bias=True, mlp_bias=True,
                            rope_theta=10000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        m2 = m2.to(torch.bfloat16)
        m2.save_pretrained(d / "tied", max_shard_size="100KB")
        m2 = m2.to(torch.float32)  # reference uses exactly the bf16-representable weights
        assert (d / "tied" / "model.safetensors.index.json").exists()
        jobs = [dict(model_dir=str(d / "untied"), out=str(d / "untied_jit.npz"), use_jit=True, prompts=prompts),
                dict(model_dir=str(d / "tied"), out=str(d / "tied_jit.npz"), use_jit=True, prompts=prompts,
                     split_overhead=1),
                dict(model_dir=str(d / "untied"), out=str(d / "untied_eager.npz"), use_jit=False, prompts=prompts)]
        spec = d / "spec.json"
        spec.write_text(json.dumps({"jobs": jobs}))
        env = dict(os.environ, GLOG_v="3", PYTHONPATH=REPO)
        p = subprocess.run([WORKER_PY, os.path.abspath(__file__), "--ms-side", str(spec)], cwd=str(d), env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"MindSpore side failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        return dict(prompts=prompts, untied=m1, tied=m2, jobs={os.path.basename(j["out"]): j for j in jobs})

    def test_untied_fp32_jit_matches_hf(ms_runs):
        worst, r = _compare(ms_runs["untied"], ms_runs["jobs"]["untied_jit.npz"]["out"], ms_runs["prompts"])
        print(f"untied jit: max abs err {worst:.2e}, load {float(r['load_s']):.2f}s, steps {r['step_s'].round(3)}")

    def test_tied_bf16_sharded_bias_llama3_rope_matches_hf(ms_runs):
        worst, _ = _compare(ms_runs["tied"], ms_runs["jobs"]["tied_jit.npz"]["out"], ms_runs["prompts"])
        print(f"tied jit: max abs err {worst:.2e}")

    def test_token_parts():
        """A step's forwards (batch.token_parts): cut at the largest bucket; just over a smaller bucket, that bucket
        and a small forward for the rest when padding would cost more (a forward costing 32 tokens + its bucket);
        never cut when the rest would need a forward as big; overhead 0 cuts at the largest bucket only."""
        from ms_models.batch import token_buckets, token_parts

        b = token_buckets(2048)
        want = {1: [1], 8: [8], 9: [9], 100: [100], 129: [128, 1], 135: [128, 7], 160: [128, 32], 200: [200],
                900: [900], 1100: [1024, 76], 2048: [2048], 4200: [2048, 2048, 104]}
        assert {n: token_parts(n, b) for n in want} == want
        assert all(sum(token_parts(n, b)) == n for n in range(1, 5000, 7))
        assert token_parts(135, b, 0) == [135] and token_parts(4200, b, 0) == [2048, 2048, 104]
        assert token_parts(13, token_buckets(8), 1) == [8, 4, 1]

    def test_pynative_matches_hf(ms_runs):
        worst, _ = _compare(ms_runs["untied"], ms_runs["jobs"]["untied_eager.npz"]["out"], ms_runs["prompts"])
        print(f"untied PyNative: max abs err {worst:.2e}")

    def test_smollm2_matches_hf(tmp_path):
        """The real SmolLM2-135M checkpoint (if present): prefill, decodes, chunked + mixed."""
        model_dir = os.path.join(REPO, "models", "SmolLM2-135M-Instruct")
        if not os.path.isfile(os.path.join(model_dir, "model.safetensors")) or not os.path.exists(WORKER_PY):
            pytest.skip("models/SmolLM2-135M-Instruct or the worker env is not present")
        import torch
        from transformers import AutoModelForCausalLM

        rng = np.random.default_rng(0)
        prompts = {"A": [int(x) for x in rng.integers(3, 20000, size=11)],
                   "B": [int(x) for x in rng.integers(3, 20000, size=7)]}
        job = dict(model_dir=model_dir, out=str(tmp_path / "smol.npz"), use_jit=True, prompts=prompts,
                   scenario="short")
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"jobs": [job]}))
        env = dict(os.environ, GLOG_v="3", PYTHONPATH=REPO)
        p = subprocess.run([WORKER_PY, os.path.abspath(__file__), "--ms-side", str(spec)], cwd=str(tmp_path),
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"MindSpore side failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        worst, _ = _compare(hf, job["out"], prompts, atol=2e-3, min_new=2)  # logits are O(30)
        print(f"SmolLM2: max abs err {worst:.2e}")

    def test_sizes_and_config_hash(ms_runs):
        import dataclasses

        sys.path.insert(0, REPO)
        from ms_models import ModelConfig

        r1 = np.load(ms_runs["jobs"]["untied_jit.npz"]["out"])
        r2 = np.load(ms_runs["jobs"]["tied_jit.npz"]["out"])
        # K+V * layers * kv_heads * block_size * head_dim * fp32
        assert int(r1["kv_bytes"]) == 2 * 2 * 2 * BLOCK_SIZE * 16 * 4
        n_untied = sum(p.numel() for p in ms_runs["untied"].parameters())
        # folded norm gammas are not stored
        folded = 2 * 2 * 64
        assert int(r1["weight_bytes"]) == 4 * (n_untied - folded)
        n_tied = sum(p.numel() for p in ms_runs["tied"].parameters())  # tied weight counted once
        assert int(r2["weight_bytes"]) == 4 * (n_tied - folded)
        # the front can compute the same hash without MindSpore
        cfg = ModelConfig.from_model_dir(ms_runs["jobs"]["untied_jit.npz"]["model_dir"])
        assert cfg.config_hash == str(r1["config_hash"]) and len(cfg.config_hash) == 64
        assert cfg.config_hash != str(r2["config_hash"])
        assert cfg.compute_hash() == cfg.config_hash
        assert dataclasses.replace(cfg, rope_theta=1.0).compute_hash() != cfg.config_hash
        cfg2 = ModelConfig.from_model_dir(ms_runs["jobs"]["tied_jit.npz"]["model_dir"])
        assert cfg2.rope_scaling["rope_type"] == "llama3" and cfg2.tie_word_embeddings and cfg2.attention_bias

    def test_unsupported_architecture_and_bad_paths(tmp_path):
        sys.path.insert(0, REPO)
        import ms_models
        from ms_models import UnsupportedModelError, load_model

        d = tmp_path / "gpt2"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
        with pytest.raises(UnsupportedModelError) as ei:
            load_model(str(d))
        msg = str(ei.value)
        assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and str(d) in msg
        assert isinstance(ei.value, ValueError)

        with pytest.raises(FileNotFoundError, match="does-not-exist"):
            load_model(str(tmp_path / "does-not-exist"))
        with pytest.raises(FileNotFoundError, match="config.json"):
            load_model(str(tmp_path))
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text("{not json")
        with pytest.raises(ValueError, match="bad"):
            load_model(str(tmp_path / "bad"))
        d2 = tmp_path / "noweights"
        d2.mkdir()
        (d2 / "config.json").write_text(json.dumps(dict(
            architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=16)))
        with pytest.raises(FileNotFoundError, match="safetensors"):
            load_model(str(d2))
        # importing ms_models (and failing early) must not have pulled in MindSpore
        assert "mindspore" not in sys.modules
        assert ms_models.ModelConfig.from_model_dir(str(d2)).num_kv_heads == 2

    def test_no_torch_or_vllm_imports_in_ms_models():
        src_dir = os.path.join(REPO, "ms_models")
        for fn in os.listdir(src_dir):
            if fn.endswith(".py"):
                with open(os.path.join(src_dir, fn)) as f:
                    for line in f:
                        s = line.strip()
                        if s.startswith(("import ", "from ")):
                            assert "torch" not in s and "vllm" not in s, f"{fn}: {s}"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ms-side":
    _ms_side(sys.argv[2])
