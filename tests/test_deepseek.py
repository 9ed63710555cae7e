"""DeepSeek-V2/V3 (ms_models.mla): multi-head latent attention over a latent KV cache, YaRN RoPE, dense then
routed + shared experts, from ordinary HF checkpoints.

Tiny random checkpoints made here with HF transformers (fp32, seeded, hidden 64, 4 heads, kv_lora_rank 32,
qk_nope 16 + qk_rope 8, v_head_dim 16, 8 routed experts top-2 + 1 shared, first_k_dense_replace 1 of 3 layers,
YaRN factor 4 with mscale 1.0 != mscale_all_dim 0.8 so that both YaRN factors matter; norms 1 + noise, biases
and routers random so that routing differs clearly between tokens):
  v2         no q_lora_rank, topk_method group_limited_greedy (4 groups, 2 kept), routed_scaling_factor 1.5
  v2_greedy  topk_method greedy, attention_bias (q/kv_a/o biases)
  v3         q_lora_rank 24, sigmoid scores + random e_score_correction_bias, 4 groups / 2 kept, norm_topk_prob,
             routed_scaling_factor 2.5, interleaved rope dims
  v3_halves  rope_interleave false (rotate_half rope dims), norm_topk_prob false
Checks:
  * logits: the MindSpore model (worker env, test_ms_models.py's scenario: prefill, chunked prefill, decodes,
    mixed ragged batches over a paged cache of 4-token blocks) vs HF, |diff| < 1e-4, greedy tokens equal; the
    cache is one latent row of kv_lora_rank + qk_rope_head_dim floats per token; the front's config hash equals
    the worker's;
  * served: greedy tokens through vLLM's engine with the ms_rpc executor equal HF's, for V2 at TP 2 and V3 at
    TP 2 with expert parallel, several
    prompts in one generate call, one spanning several KV blocks and chunked-prefill steps; the engine's block
    count is what the worker's latent cache holds in --kv-cache-memory-bytes; V3 served by two data-parallel
    engines of two ranks sharing the experts (vllm serve, embedded workers);
  * a tensor-parallel size that does not divide the heads, or with --enable-expert-parallel the experts, and
    quantized checkpoints are refused at start-up, naming the numbers.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, WORKER_PY, hf_greedy, perturb_norms_and_biases
from test_ms_models import check_against_hf, run_ms_side

VOCAB = 131
ATOL = 1e-4
KV_LORA, ROPE = 32, 8
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
SERVE_PROMPT_LENS = (3, 17, 150)  # served prompts: the last one spans 10 blocks and 3 chunked-prefill steps
MAX_NEW = 16
VARIANTS = {
    "v2": ("v2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      routed_scaling_factor=1.5)),
    "v2_greedy": ("v2", dict(q_lora_rank=None, topk_method="greedy", attention_bias=True)),
    "v3": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "v3_halves": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=False, rope_interleave=False,
                             routed_scaling_factor=1.0)),
}


def _make(name, seed, **dims):
    """A VARIANTS checkpoint; ``dims`` override the common config values (test_fused_path: MLA dims that
    FlashAttentionScore takes)."""
    import torch
    import transformers as T

    arch, extra = VARIANTS[name]
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=KV_LORA, qk_nope_head_dim=16,
                  qk_rope_head_dim=ROPE, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=512,
                  initializer_range=0.1, rope_parameters=dict(YARN), tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(dims)
    extra = {k: v for k, v in extra.items() if k not in dims}
    if arch == "v2":
        model = T.DeepseekV2ForCausalLM(T.DeepseekV2Config(**common, **extra))
    else:
        model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**common, **extra))
    model = perturb_norms_and_biases(model.to(torch.float32).eval())
    with torch.no_grad():  # routers far apart (no near-ties), a correction bias that changes the choice
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (directory, HF fp32 model with exactly the checkpoint's weights)."""
    d = tmp_path_factory.mktemp("deepseek")
    out = {}
    for i, name in enumerate(VARIANTS):
        m = _make(name, seed=40 + i)
        m.save_pretrained(d / name)
        out[name] = (d / name, m)
    return out


@pytest.fixture(scope="module")
def ms_forward(ckpts, tmp_path_factory):
    """test_ms_models.py's MindSpore scenario for every checkpoint, in one worker-env process."""
    return run_ms_side(ckpts, tmp_path_factory.mktemp("deepseek_forward"), VOCAB, timeout=600)


def test_checkpoints_hold_what_the_variants_say(ckpts):
    """The checkpoints carry the parts under test: a correction bias that is not zero (V3), q_lora (V3) or not
    (V2), attention biases, YaRN parameters as written by transformers."""
    from safetensors import safe_open

    def names(name):
        with safe_open(str(ckpts[name][0] / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    v3, v2, v2g = names("v3"), names("v2"), names("v2_greedy")
    assert float(v3["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max()) > 0.1
    assert "model.layers.0.self_attn.q_a_proj.weight" in v3 and "model.layers.0.self_attn.q_proj.weight" in v2
    assert "model.layers.2.self_attn.o_proj.bias" in v2g and "model.layers.0.mlp.experts.0.up_proj.weight" not in v2
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in v2
    cfg = json.loads((ckpts["v3_halves"][0] / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_interleave"] is False


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf(ckpts, ms_forward, name):
    cfg, r = check_against_hf(ckpts, ms_forward, name, ATOL)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.moe_layers) == (1, KV_LORA + ROPE, (1, 2))
    # the latent cache: one row of kv_lora_rank + rope floats per token and layer (4-token blocks, 3 layers)
    assert int(r["kv_bytes"]) == 3 * 4 * (KV_LORA + ROPE) * 4


SERVE = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the engine cores in this process: their configs are ours
from vllm import LLM, SamplingParams, TokensPrompt
if __name__ == "__main__":
    prompts, max_new, kv_bytes, block = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for model, parallel in json.loads(sys.argv[5]):
        llm = LLM(model=model, dtype="float32", distributed_executor_backend="ms_rpc", max_model_len=256,
                  max_num_seqs=4, max_num_batched_tokens=64, block_size=block, enforce_eager=True,
                  skip_tokenizer_init=True, kv_cache_memory_bytes=kv_bytes, seed=0, **parallel)
        c = llm.llm_engine.vllm_config
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, detokenize=False),
                            use_tqdm=False)
        print("RESULT " + json.dumps([c.model_config.use_mla, c.cache_config.num_gpu_blocks,
                                      [list(o.outputs[0].token_ids) for o in outs]]), flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
"""


def test_served_greedy_equals_hf_on_an_mla_sized_cache(ckpts):
    """V2 (attention biases) at TP 2 (2 of the 4 heads per rank, each expert split), V3 at TP 1 and at TP 2 with
    --enable-expert-parallel (4 of the 8 experts per rank) through vLLM's engine with the ms_rpc executor
    (one process, one engine after the other): 3 prompts in one generate call, 16-token blocks, steps of at most
    64 tokens (the 150-token prompt is prefilled in chunks, beside the others' decodes); greedy tokens == HF.
    --kv-cache-memory-bytes buys exactly the blocks each rank's latent cache (replicated under TP) holds:
    block_size rows of kv_lora_rank + qk_rope_head_dim floats per layer (the front's MLAAttentionSpec; a
    full-attention spec would count K and V and get half)."""
    rng = np.random.default_rng(3)
    prompts = [[int(x) for x in rng.integers(3, VOCAB, size=L)] for L in SERVE_PROMPT_LENS]
    tp2 = {"tensor_parallel_size": 2}
    runs = [(ckpts["v2_greedy"][0], tp2), (ckpts["v3"][0], {}), (ckpts["v3"][0], dict(tp2, enable_expert_parallel=True))]
    kv_bytes, block = 3 * 2**20, 16
    out = subprocess.run([sys.executable, "-c", SERVE, json.dumps(prompts), str(MAX_NEW), str(kv_bytes), str(block),
                          json.dumps([(str(p), v) for p, v in runs])], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    lines = [json.loads(l[len("RESULT "):]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and len(lines) == len(runs), out.stderr[-6000:]
    assert "experts 0..3 of 8 whole" in out.stderr and "experts 4..7 of 8 whole" in out.stderr, out.stderr[-3000:]
    for (path, _), (use_mla, blocks, got) in zip(runs, lines):
        assert (use_mla, blocks) == (True, kv_bytes // (block * 3 * (KV_LORA + ROPE) * 4)), (path.name, blocks)
        hf = hf_greedy(path, prompts, MAX_NEW)
        assert [len(t) for t in got] == [MAX_NEW] * len(prompts)
        assert len({tuple(t) for t in hf}) == len(prompts), "the reference continuations must differ"
        assert got == hf, path.name


@pytest.mark.parametrize("tp", [1, 2])
def test_v3_over_two_data_parallel_engines(ckpts, tmp_path, tp):
    """V3 served with --data-parallel-size 2 --enable-expert-parallel, embedded, engines of one rank (DP x EP) and
    of two (--tensor-parallel-size 2: vllm-mindspore's DeepSeek-R1 layout): 2 x tp workers in one MindSpore cluster,
    8 / (2 x tp) of the routed experts each; at TP 2 the shared expert and the dense first layer are split by the
    engine's two ranks, each sending half its engine's tokens to the experts (moe.RoutedExperts). Greedy tokens == HF
    for prompts both engines serve at once, and for a request alone (one token a step: at TP 2 its engine's second
    rank sends a padding row; the idle engine runs a dummy batch)."""
    from conftest import Server, concurrent_greedy

    path = ckpts["v3"][0]
    rng = np.random.default_rng(5)
    prompts = [[int(x) for x in rng.integers(3, VOCAB, size=L)] for L in (*SERVE_PROMPT_LENS, 6, 29)]
    hf = hf_greedy(path, prompts, MAX_NEW)
    assert len({tuple(t) for t in hf}) == len(prompts), "the reference continuations must differ"
    server = Server(path, ["--data-parallel-size", "2", "--tensor-parallel-size", str(tp), "--enable-expert-parallel",
                           "--max-model-len", "512", "--kv-cache-memory-bytes", str(16 << 20),
                           "--skip-tokenizer-init"], log_path=tmp_path / "serve.log")
    try:
        server.wait_healthy()
        assert concurrent_greedy(server.url, path, prompts, MAX_NEW) == hf
        assert concurrent_greedy(server.url, path, prompts[:1], MAX_NEW) == hf[:1]
        log = (tmp_path / "serve.log").read_text(errors="replace")
    finally:
        server.stop()
    per = 8 // (2 * tp)
    for c in range(2 * tp):   # cluster rank c = engine * tp + rank
        place = f"experts {per * c}..{per * c + per - 1} of 8 whole over data-parallel engines: this is engine {c // tp} of 2"
        assert (f"tensor-parallel rank {c % tp} of {tp}; " if tp > 1 else "") + place in log, log[-3000:]


def test_parallel_sizes_that_do_not_divide_and_quantized_checkpoints_refused(ckpts, tmp_path):
    from ms_models.config import ModelConfig
    from ms_models.parallel import check_tensor_parallel
    from ms_models.registry import UnsupportedModelError
    from vllm_ext.executor import ConfigError, check_tensor_parallel_size

    path = ckpts["v3"][0]
    cfg = ModelConfig.from_model_dir(str(path))
    heads = "tensor-parallel size 3 does not divide the model's num_attention_heads 4 (each rank must own whole heads"
    experts = "--enable-expert-parallel over 3 ranks: DeepseekV3ForCausalLM's 8 experts do not divide into 3 equal"
    for ep, why in ((False, heads), (True, experts)):
        assert check_tensor_parallel(cfg, 2, expert_parallel=ep) is None
        assert why in check_tensor_parallel(cfg, 3, expert_parallel=ep)
        with pytest.raises(ConfigError, match="ms_rpc: " + re.escape(why)):
            check_tensor_parallel_size(str(path), 3, expert_parallel=ep)
    q = tmp_path / "fp8"
    q.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (q / "config.json").write_text(json.dumps(cfg))
    os.symlink(path / "model.safetensors", q / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match=r"quantized checkpoints .*'fp8'.* not supported"):
        ModelConfig.from_model_dir(str(q))
    # the worker, at start-up, before it loads anything
    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        p = subprocess.run([str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(q), "--port", "0"], cwd=ROOT,
                           stdout=f, stderr=subprocess.STDOUT, timeout=120)
    text = log.read_text()
    assert p.returncode != 0 and "quantized checkpoints (quantization_config, quant_method 'fp8')" in text, text


WARMUP_CHECK = """
import sys
from ms_models import load_model
m = load_model(sys.argv[1])
m.allocate_kv_cache(8, 4, max_num_seqs=2, max_model_len=16, max_num_batched_tokens=64)
m.warmup()
print("BUCKETS", list(m.buckets))
"""


def test_warmup_when_the_token_budget_exceeds_what_the_requests_can_hold(ckpts, tmp_path):
    """vLLM may give a step budget (max_num_batched_tokens; it chose 2048 for these models at max_model_len 256) above
    max_num_seqs * max_model_len; the graphs stop at that product, and warm-up's dummy requests fit the block
    tables."""
    p = subprocess.run([str(WORKER_PY), "-c", WARMUP_CHECK, str(ckpts["v2"][0])], cwd=str(tmp_path),
                       env=dict(os.environ, GLOG_v="3"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "BUCKETS [1, 2, 4, 8, 16, 32]" in p.stdout, p.stdout
