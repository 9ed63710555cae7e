"""Model coverage: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM from ordinary
HF checkpoints.

For each architecture a tiny random checkpoint is made here with HF transformers (fp32, seeded, 3 layers, GQA
4:2, odd vocabulary 211, no tokenizer):
  llama    untied embeddings, llama3 RoPE scaling (rope_theta 5e5)
  qwen2    tied, q/k/v biases (no o bias)
  qwen3    tied, q/k RMSNorm per head, head_dim 64 != hidden/heads; weights bf16-representable, and a bf16
           sharded twin (``qwen3_bf16``) of the same weights
  mistral  untied, sliding_window 8 (shorter than most sequences here)
Checks:
  * logits: the MindSpore model (worker env, direct forward over a paged cache: prefill, chunked prefill, decodes,
    mixed batches; see test_ms_models.py) vs HF transformers, |diff| < 1e-4 (fp32), greedy tokens equal;
  * served: greedy tokens through vLLM's offline API with the ms_rpc executor == native vLLM CPU == HF, several
    prompts batched in one generate call (all ms_rpc engines in one process, all native ones in another);
  * the bf16 sharded twin gives the same tokens as its fp32 single-file twin, through ms_rpc;
  * the handshake: the front's config hash (pure Python, from the model directory) equals the worker's, and a
    worker whose model config differs is refused naming both hashes;
  * config rules per architecture, and weight loading (bf16 shards): progress log lines, memory peak close to the
    final weight size.
"""
import copy
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
VOCAB = 211
MAX_NEW = 24
SERVE_PROMPT_LENS = (1, 7, 13, 24, 40)
SLIDING_WINDOW = 8
ARCHS = ("llama", "qwen2", "qwen3", "mistral")
ATOL = 1e-4


# ============================================================================ MindSpore side: weight-loading memory
def _write_safetensors(path, tensors):
    """tensors: name -> (dtype string, shape, raw bytes); numpy only (no bf16 dtype needed)."""
    header, off = {}, 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for _, _, raw in tensors.values():
            f.write(raw)


def _ms_memory(out_path):
    """Writes a random bf16 Llama checkpoint in 3 shards (~40 MiB bf16 = ~80 MiB fp32), loads it, and reports the
    RSS peak above the pre-load RSS, the weight bytes and the ms_models log lines."""
    import logging
    import tempfile

    sys.path.insert(0, REPO)
    lines = []

    class H(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("ms_models").addHandler(H())
    logging.getLogger("ms_models").setLevel(logging.INFO)
    d = tempfile.mkdtemp()
    hid, inter, layers, heads, kvh, vocab = 512, 1408, 4, 8, 4, 8000
    hd = hid // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hid,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kvh, max_position_embeddings=256, tie_word_embeddings=False, dtype="bfloat16")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)

    def bf16(*shape):
        a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32) >> 16
        return ("BF16", shape, a.astype(np.uint16).tobytes())

    shards = [{"model.embed_tokens.weight": bf16(vocab, hid)}, {}, {"lm_head.weight": bf16(vocab, hid),
                                                                   "model.norm.weight": bf16(hid)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[1].update({
            p + "input_layernorm.weight": bf16(hid), p + "post_attention_layernorm.weight": bf16(hid),
            p + "self_attn.q_proj.weight": bf16(heads * hd, hid), p + "self_attn.k_proj.weight": bf16(kvh * hd, hid),
            p + "self_attn.v_proj.weight": bf16(kvh * hd, hid), p + "self_attn.o_proj.weight": bf16(hid, heads * hd),
            p + "mlp.gate_proj.weight": bf16(inter, hid), p + "mlp.up_proj.weight": bf16(inter, hid),
            p + "mlp.down_proj.weight": bf16(hid, inter)})
    wmap = {}
    for k, shard in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(d, fn), shard)
        wmap.update({n: fn for n in shard})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)
    del shards

    def status():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}

    from ms_models import load_model, runtime

    runtime.setup("cpu")
    import mindspore as ms

    (ms.Tensor(np.ones(4, np.float32)) + 1).asnumpy()  # MindSpore's own first-op allocations before the baseline
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = status()
    model = load_model(d, use_jit=True)
    after = status()
    with open(out_path, "w") as f:
        json.dump(dict(peak_delta=after["VmHWM"] - before["VmRSS"], final_delta=after["VmRSS"] - before["VmRSS"],
                       hwm_reset=before["VmHWM"] - before["VmRSS"], weight_bytes=model.weight_bytes(), log=lines), f)


# ============================================================================ front (pytest) side
def _make_checkpoint(arch, seed):
    """A tiny random HF model (fp32, eval) of ``arch``; norms 1 + noise and non-zero biases so that folding and
    bias handling are exercised."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    if arch == "llama":
        cfg = T.LlamaConfig(head_dim=32, tie_word_embeddings=False, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                            **common)
        cls = T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = T.Qwen2Config(tie_word_embeddings=True, **common), T.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = T.Qwen3Config(head_dim=64, tie_word_embeddings=True, **common), T.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg = T.MistralConfig(head_dim=32, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False, **common)
        cls = T.MistralForCausalLM
    else:
        raise ValueError(arch)
    model = cls(cfg).to(torch.float32).eval()
    from conftest import perturb_norms_and_biases

    return perturb_norms_and_biases(model)


def _safetensors_dtypes(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _run_generate(backend, dirs, prompts, timeout=1200):
    cmd = [sys.executable, os.path.join(REPO, "tests", "offline_generate.py"), str(dirs[0]), backend,
           json.dumps(prompts), str(MAX_NEW), "--skip-tokenizer-init", "--max-model-len", "512",
           "--kv-cache-mib", "64"]
    for d in dirs[1:]:
        cmd += ["--also", str(d)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [json.loads(l[len("RESULT "):]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and len(lines) == len(dirs), f"{backend} failed:\n{out.stderr[-6000:]}"
    return dict(zip([str(d) for d in dirs], lines))


if pytest is not None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_ms_models import _compare, run_ms_side

    @pytest.fixture(scope="module")
    def ckpts(tmp_path_factory):
        """name -> (directory, HF fp32 model with exactly the checkpoint's weights)."""
        pytest.importorskip("transformers")
        import torch

        d = tmp_path_factory.mktemp("models")
        out = {}
        for i, arch in enumerate(ARCHS):
            m = _make_checkpoint(arch, seed=10 + i)
            if arch == "qwen3":  # bf16-representable fp32 weights, so the bf16 twin holds the very same values
                with torch.no_grad():  # parameters only: m.to(bf16) would also round the RoPE inv_freq buffer
                    for p in m.parameters():
                        p.copy_(p.to(torch.bfloat16).to(torch.float32))
                copy.deepcopy(m).to(torch.bfloat16).save_pretrained(d / "qwen3_bf16", max_shard_size="300KB")
            m.save_pretrained(d / arch)
            out[arch] = (d / arch, m)
        out["qwen3_bf16"] = (d / "qwen3_bf16", out["qwen3"][1])
        return out

    @pytest.fixture(scope="module")
    def ms_forward(ckpts, tmp_path_factory):
        """The MindSpore side of test_ms_models.py's scenario, for every checkpoint, in one worker-env process."""
        return run_ms_side(ckpts, tmp_path_factory.mktemp("ms_forward"), VOCAB)

    @pytest.fixture(scope="module")
    def served(ckpts):
        """Greedy tokens: ms_rpc (every checkpoint), native vLLM CPU (the fp32 ones) and HF, same prompts."""
        from conftest import hf_greedy

        rng = np.random.default_rng(1)
        prompts = [[int(x) for x in rng.integers(0, VOCAB, size=L)] for L in SERVE_PROMPT_LENS]
        names = list(ckpts)
        ours = _run_generate("ms_rpc", [ckpts[n][0] for n in names], prompts)
        native = _run_generate("native", [ckpts[n][0] for n in ARCHS], prompts)
        hf = {n: hf_greedy(ckpts[n][0], prompts, MAX_NEW) for n in ARCHS}
        return dict(prompts=prompts, ms_rpc={n: ours[str(ckpts[n][0])] for n in names},
                    native={n: native[str(ckpts[n][0])] for n in ARCHS}, hf=hf)

    @pytest.mark.parametrize("name", [*ARCHS, "qwen3_bf16"])
    def test_logits_match_hf(ckpts, ms_forward, name):
        _, model = ckpts[name]
        worst, r = _compare(model, ms_forward["out"][name], ms_forward["prompts"], atol=ATOL)
        print(f"{name}: max |ms - hf| = {worst:.2e} over {len(r['names'])} logit rows")
        if name == "mistral":  # the window is live here: without it HF's own logits move far more than ATOL
            import torch

            toks = [int(t) for t in r["tokens_A"][:-1]]
            assert len(toks) > 2 * SLIDING_WINDOW
            with torch.no_grad():
                windowed = model(torch.tensor([toks])).logits[0]
                model.config.sliding_window = None
                try:
                    full = model(torch.tensor([toks])).logits[0]
                finally:
                    model.config.sliding_window = SLIDING_WINDOW
            assert float((windowed - full).abs().max()) > 100 * ATOL

    @pytest.mark.parametrize("name", [*ARCHS, "qwen3_bf16"])
    def test_config_hash_front_equals_worker(ckpts, ms_forward, name):
        sys.path.insert(0, REPO)
        from ms_models.config import ModelConfig

        cfg = ModelConfig.from_model_dir(str(ckpts[name][0]))  # the front's computation: pure Python
        assert cfg.config_hash == str(np.load(ms_forward["out"][name])["config_hash"])
        expected = dict(
            llama=dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, attention_bias=False,
                       rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 32, "rope_type": "llama3"},
                       rope_theta=500000.0),
            qwen2=dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, attention_bias=True, o_bias=False,
                       sliding_window=None),
            qwen3=dict(architecture="Qwen3ForCausalLM", tie_word_embeddings=True, qk_norm=True, head_dim=64,
                       attention_bias=False),
            mistral=dict(architecture="MistralForCausalLM", tie_word_embeddings=False, sliding_window=SLIDING_WINDOW),
        )[name.split("_")[0]]
        assert {k: getattr(cfg, k) for k in expected} == expected
        assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (VOCAB, 3, 4, 2)

    @pytest.mark.parametrize("arch", ARCHS)
    def test_served_greedy_identical_to_hf_and_native(served, arch):
        ours, native, hf = served["ms_rpc"][arch], served["native"][arch], served["hf"][arch]
        assert len(ours) == len(served["prompts"])
        for i, (a, b, c) in enumerate(zip(ours, native, hf)):
            assert len(a) == MAX_NEW
            assert a == c, f"{arch} prompt {i} (len {SERVE_PROMPT_LENS[i]}): ms_rpc {a} != HF {c}"
            assert a == b, f"{arch} prompt {i} (len {SERVE_PROMPT_LENS[i]}): ms_rpc {a} != native vLLM {b}"

    def test_bf16_sharded_twin_same_tokens_as_fp32_single_file(ckpts, served):
        twin, single = ckpts["qwen3_bf16"][0], ckpts["qwen3"][0]
        shards = sorted(twin.glob("*.safetensors"))
        assert (twin / "model.safetensors.index.json").exists() and len(shards) >= 2
        assert all(_safetensors_dtypes(s) == {"BF16"} for s in shards)
        assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
        assert _safetensors_dtypes(single / "model.safetensors") == {"F32"}
        assert served["ms_rpc"]["qwen3_bf16"] == served["ms_rpc"]["qwen3"]

    def test_handshake_compares_config_hash(ckpts, tmp_path):
        """check_same_model: same model passes; a worker whose model differs only in a config field the
        per-field checks do not see (rope_theta) is refused, naming both hashes."""
        import shutil
        from types import SimpleNamespace

        sys.path.insert(0, REPO)
        from ms_models.config import ModelConfig
        from ms_rpc.v1 import worker_pb2 as pb
        from vllm_ext.executor import ConfigError, check_same_model

        front_dir = ckpts["mistral"][0]

        def worker_info(model_dir):
            c = ModelConfig.from_model_dir(str(model_dir))
            return pb.WorkerInfo(dtype="float32", model_path=str(model_dir), model=pb.ModelInfo(
                architecture=c.architecture, vocab_size=c.vocab_size, num_layers=c.num_layers,
                num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_size=c.hidden_size,
                max_position_embeddings=c.max_position_embeddings, config_hash=c.config_hash))

        hf = json.loads((front_dir / "config.json").read_text())
        model_config = SimpleNamespace(
            model=str(front_dir), use_mla=False,
            hf_config=SimpleNamespace(architectures=hf["architectures"], num_hidden_layers=hf["num_hidden_layers"],
                                      num_attention_heads=hf["num_attention_heads"]),
            get_vocab_size=lambda: hf["vocab_size"], get_total_num_kv_heads=lambda: hf["num_key_value_heads"],
            get_head_size=lambda: hf["head_dim"], get_hidden_size=lambda: hf["hidden_size"])
        check_same_model(worker_info(front_dir), model_config, "127.0.0.1:1")  # the same model: accepted

        other = tmp_path / "other"
        shutil.copytree(front_dir, other)
        cfg = json.loads((other / "config.json").read_text())
        cfg["rope_parameters"]["rope_theta"] = 1234.0
        (other / "config.json").write_text(json.dumps(cfg))
        info = worker_info(other)
        front_hash = ModelConfig.from_model_dir(str(front_dir)).config_hash
        assert info.model.config_hash != front_hash
        with pytest.raises(ConfigError) as e:
            check_same_model(info, model_config, "127.0.0.1:1")
        msg = str(e.value)
        assert "ms_rpc worker 127.0.0.1:1 serves a different model" in msg and str(other) in msg
        assert f"config_hash: front {front_hash} vs worker {info.model.config_hash}" in msg
        # per-field differences are still named (and come first)
        info.model.vocab_size = 999
        with pytest.raises(ConfigError, match="vocab_size: front 211 vs worker 999"):
            check_same_model(info, model_config, "127.0.0.1:1")

    def test_config_rules_and_unsupported_architectures(tmp_path):
        sys.path.insert(0, REPO)
        from ms_models import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError

        base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
        with pytest.raises(UnsupportedModelError) as e:
            ModelConfig.from_hf_config(dict(base, architectures=["GemmaForCausalLM"]))
        assert "GemmaForCausalLM" in str(e.value)
        for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            assert a in SUPPORTED_ARCHITECTURES and a in str(e.value)

        def cfg(arch, **kw):
            return ModelConfig.from_hf_config(dict(base, architectures=[arch], **kw))

        # Qwen2.5 as published: a sliding_window value, but use_sliding_window false and no layer_types
        q = cfg("Qwen2ForCausalLM", sliding_window=131072, use_sliding_window=False, max_window_layers=28)
        assert q.sliding_window is None and q.attention_bias and not q.o_bias and not q.qk_norm
        # every layer windowed: served; a mix of windowed and full layers: refused, clearly
        assert cfg("Qwen2ForCausalLM", sliding_window=16, use_sliding_window=True,
                   max_window_layers=0).sliding_window == 16
        with pytest.raises(UnsupportedModelError, match="mix of sliding-window and full-attention layers"):
            cfg("Qwen3ForCausalLM", sliding_window=16, use_sliding_window=True, max_window_layers=2)
        with pytest.raises(UnsupportedModelError, match="mix of sliding-window"):
            cfg("Qwen2ForCausalLM", sliding_window=16,
                layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"])
        assert cfg("Qwen3ForCausalLM", attention_bias=True).o_bias
        assert cfg("MistralForCausalLM", sliding_window=None).sliding_window is None
        assert cfg("MistralForCausalLM", sliding_window=4096).sliding_window == 4096
        assert cfg("LlamaForCausalLM", attention_bias=True).o_bias
        with pytest.raises(UnsupportedModelError, match="yarn"):
            cfg("Qwen2ForCausalLM", rope_scaling={"rope_type": "yarn", "factor": 4.0})
        # features change the hash
        assert cfg("MistralForCausalLM", sliding_window=8).config_hash != cfg("MistralForCausalLM").config_hash

    def test_front_imports_of_ms_models_config_are_pure_python():
        code = ("import sys, ms_models.config, ms_models; "
                "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'mindspore', 'torch')); "
                "assert not bad, bad")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert p.returncode == 0, p.stderr

    def test_bf16_shards_load_with_progress_and_peak_close_to_weight_size(tmp_path):
        out = tmp_path / "mem.json"
        env = dict(os.environ, GLOG_v="3", PYTHONPATH=REPO)
        p = subprocess.run([WORKER_PY, os.path.abspath(__file__), "--ms-memory", str(out)], cwd=str(tmp_path),
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"MindSpore side failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        r = json.loads(out.read_text())
        mib = 2**20
        print(f"weights {r['weight_bytes'] / mib:.1f} MiB: RSS peak +{r['peak_delta'] / mib:.1f} MiB, "
              f"final +{r['final_delta'] / mib:.1f} MiB")
        assert r["hwm_reset"] < mib, "VmHWM was not reset"
        # no second copy of the weights at any time: the peak is the final size (weights + a fixed overhead of
        # MindSpore's allocator and the graph objects) plus at most a tenth of the weights of transients
        assert r["peak_delta"] - r["final_delta"] < 0.1 * r["weight_bytes"], r
        assert r["peak_delta"] < 1.1 * r["weight_bytes"] + 32 * mib, r
        pct = [l for l in r["log"] if l.startswith("loading weights: ")]
        assert len(pct) >= 5 and pct[-1].startswith("loading weights: 100%"), r["log"]
        assert any("3 safetensors file(s)" in l for l in r["log"]), r["log"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ms-memory":
    _ms_memory(sys.argv[2])
