"""Mixture-of-experts models (ms_models.moe): Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM from
ordinary HF checkpoints.

Tiny random checkpoints made here with HF transformers (fp32, seeded, 8 experts, top-2, hidden 64, GQA 4:2,
norms 1 + noise, routers scaled up so that routing differs clearly between tokens):
  qwen3_moe   2 sparse layers, norm_topk_prob true, saved single-file (per-expert tensors, as transformers writes
              them), sharded (small max_shard_size) and fused (transformers' in-memory gate_up_proj / down_proj)
  qwen2_moe   3 layers, the middle one dense (mlp_only_layers), shared expert with its sigmoid gate,
              norm_topk_prob false, q/k/v biases
  mixtral     2 layers, block_sparse_moe.experts.{e}.w1/w2/w3
Checks:
  * logits: the MindSpore model (worker env, test_ms_models.py's scenario: prefill, chunked prefill, decodes,
    mixed ragged flat batches split over small graphs) vs HF, |diff| < 1e-4, greedy tokens equal; the front's
    config hash equals the worker's;
  * served: greedy tokens through vLLM's engine with the ms_rpc executor (tests/offline_generate.py, as
    test_models.py serves) equal HF's, for Qwen3-MoE at TP 1;
  * tensor parallel > 1 is refused for MoE models at start-up, naming the reason (the front's check before it
    starts workers, and the worker's argument check).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
WORKER_PY = os.path.join(REPO, ".venv-worker", "bin", "python")
sys.path.insert(0, TESTS)
sys.path.insert(0, REPO)

from conftest import hf_greedy, perturb_norms_and_biases  # noqa: E402
from test_ms_models import check_against_hf, run_ms_side  # noqa: E402

VOCAB = 131
ATOL = 1e-4
SERVE_PROMPT_LENS = (1, 9, 23)
ROUTER_STD = 1.0


def _make(name, seed):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, num_experts_per_tok=2, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if name == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(num_hidden_layers=2, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                               num_experts=8, norm_topk_prob=True, **common)
        cls = T.Qwen3MoeForCausalLM
    elif name == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                               shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
                               **common)
        cls = T.Qwen2MoeForCausalLM
    else:
        cfg = T.MixtralConfig(num_hidden_layers=2, intermediate_size=32, num_local_experts=8, **common)
        cls = T.MixtralForCausalLM
    model = perturb_norms_and_biases(cls(cfg).to(torch.float32).eval())
    with torch.no_grad():  # routers (and the shared expert's gate): logits far apart, no near-ties
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0.0, ROUTER_STD)
    return model


def _safetensors_names(d):
    names = set()
    for fn in os.listdir(d):
        if fn.endswith(".safetensors"):
            with open(os.path.join(d, fn), "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                names |= set(json.loads(f.read(n))) - {"__metadata__"}
    return names


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (directory, HF fp32 model with exactly the checkpoint's weights)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("moe")
    out = {}
    for i, name in enumerate(("qwen3_moe", "qwen2_moe", "mixtral")):
        m = _make(name, seed=20 + i)
        m.save_pretrained(d / name)
        out[name] = (d / name, m)
    q3 = out["qwen3_moe"][1]
    q3.save_pretrained(d / "qwen3_moe_sharded", max_shard_size="40KB")
    fused = d / "qwen3_moe_fused"  # the module's own tensors, as transformers 5 holds them in memory
    fused.mkdir()
    (fused / "config.json").write_text((d / "qwen3_moe" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in q3.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    out["qwen3_moe_sharded"] = (d / "qwen3_moe_sharded", q3)
    out["qwen3_moe_fused"] = (fused, q3)
    return out


@pytest.fixture(scope="module")
def ms_forward(ckpts, tmp_path_factory):
    """test_ms_models.py's MindSpore scenario for every checkpoint, in one worker-env process."""
    return run_ms_side(ckpts, tmp_path_factory.mktemp("moe_forward"), VOCAB, timeout=600)


KERNEL_CHECK = """
import sys
import numpy as np
from ms_models.kernels import moe_ffn_op, set_omp_wait_policy
set_omp_wait_policy()
from ms_models import runtime
runtime.setup("cpu")
from mindspore import Tensor
rng = np.random.default_rng(0)
T, real, H, E, I, K = 512, 300, 64, 8, 96, 2
x = rng.standard_normal((T, H), dtype=np.float32)
logits = (rng.standard_normal((T, E)) * 3).astype(np.float32)
wg, wu = (rng.standard_normal((E, H, I), dtype=np.float32) * 0.2 for _ in range(2))
wd = rng.standard_normal((E, I, H), dtype=np.float32) * 0.2
qsl = np.array([0, 100, real, real], np.int32)
for norm in (0, 1):
    out = moe_ffn_op()(Tensor(x), Tensor(logits), Tensor(wg), Tensor(wu), Tensor(wd), Tensor(qsl),
                       Tensor(np.array([2, 0], np.int32)), Tensor(np.array([K, norm], np.int32))).asnumpy()
    ref = np.zeros_like(out)
    for t in range(real):
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        top = np.argsort(-p)[:K]
        w = p[top] / p[top].sum() if norm else p[top]
        for e, we in zip(top, w):
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            ref[t] += we * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    err = float(np.abs(out - ref).max())
    assert err < 1e-4 and not out[real:].any(), (norm, err)
    print("norm", norm, "max err", err)
"""


def test_kernel_matches_numpy_on_a_multithreaded_step(tmp_path):
    """The MoeFFN op alone, on a step large enough for its thread team (300 real tokens of a 512-row bucket, 8
    experts): each token's top-2 experts' SwiGLU, weighted, equals a numpy loop over tokens; padding rows are
    zero."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=REPO)
    p = subprocess.run([WORKER_PY, "-c", KERNEL_CHECK], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]


def test_checkpoints_hold_per_expert_or_fused_tensors(ckpts):
    """What the loader reads: transformers' save_pretrained writes one tensor per expert under the
    architecture's own names; the fused twin holds the stacked tensors."""
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in _safetensors_names(ckpts["qwen3_moe"][0])
    q2 = _safetensors_names(ckpts["qwen2_moe"][0])
    assert {"model.layers.0.mlp.shared_expert_gate.weight", "model.layers.2.mlp.experts.0.up_proj.weight",
            "model.layers.1.mlp.gate_proj.weight"} <= q2
    assert not any(n.startswith("model.layers.1.mlp.experts") for n in q2)
    mx = _safetensors_names(ckpts["mixtral"][0])
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.7.w3.weight"} <= mx
    assert "model.layers.0.mlp.experts.gate_up_proj" in _safetensors_names(ckpts["qwen3_moe_fused"][0])
    assert len([f for f in os.listdir(ckpts["qwen3_moe_sharded"][0]) if f.endswith(".safetensors")]) >= 2


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3_moe_sharded", "qwen3_moe_fused"])
def test_logits_match_hf(ckpts, ms_forward, name):
    cfg, r = check_against_hf(ckpts, ms_forward, name, ATOL)
    layers = {"qwen2_moe": (0, 2)}.get(name, (0, 1))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_layers) == (8, 2, layers)
    assert cfg.norm_topk_prob == (name != "qwen2_moe")
    assert cfg.shared_expert_intermediate_size == (48 if name == "qwen2_moe" else 0)


def test_served_greedy_qwen3_moe_equals_hf(ckpts):
    from test_models import MAX_NEW, _run_generate

    rng = np.random.default_rng(1)
    prompts = [[int(x) for x in rng.integers(0, VOCAB, size=L)] for L in SERVE_PROMPT_LENS]
    path = ckpts["qwen3_moe"][0]
    ours = _run_generate("ms_rpc", [path], prompts)[str(path)]
    hf = hf_greedy(path, prompts, MAX_NEW)
    assert [len(t) for t in ours] == [MAX_NEW] * len(prompts)
    assert ours == hf


def test_tensor_parallel_refused_for_moe(ckpts, tmp_path):
    from ms_models.config import ModelConfig
    from ms_models.parallel import check_tensor_parallel

    path = ckpts["qwen3_moe"][0]
    cfg = ModelConfig.from_model_dir(str(path))
    assert check_tensor_parallel(cfg, 1) is None
    assert "Qwen3MoeForCausalLM is a mixture-of-experts model" in check_tensor_parallel(cfg, 2)
    # the front, before it starts any worker (MsRpcExecutor._init_executor)
    from vllm_ext.executor import ConfigError, check_tensor_parallel_size

    check_tensor_parallel_size(str(path), 1)
    with pytest.raises(ConfigError, match=r"ms_rpc: tensor-parallel size 2: Qwen3MoeForCausalLM is a mixture-of-"):
        check_tensor_parallel_size(str(path), 2)
    # the worker, before it loads anything
    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        p = subprocess.run([WORKER_PY, "-m", "ms_worker", "serve", "--model", str(path), "--port", "0",
                            "--tp-size", "2", "--dist-addr", "127.0.0.1:1"], cwd=REPO, stdout=f,
                           stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    text = log.read_text()
    assert p.returncode == 2, text
    assert "tensor-parallel size 2: Qwen3MoeForCausalLM is a mixture-of-experts model" in text


def test_expert_parallel_refused_at_start_up(ckpts):
    """--enable-expert-parallel on a mixture-of-experts model stops vLLM's config building with one line naming the
    flag and ms_rpc (on a dense model vLLM's own check refuses it first)."""
    code = ("import sys\nfrom vllm.engine.arg_utils import EngineArgs\n"
            "try:\n"
            "    EngineArgs(model=sys.argv[1], dtype='float32', distributed_executor_backend='ms_rpc', max_model_len=128,"
            " enable_expert_parallel=True).create_engine_config()\n"
            "    print('ACCEPTED')\n"
            "except Exception as e:\n"
            "    print('REFUSED', ' | '.join(str(e).splitlines()))\n")
    out = subprocess.run([sys.executable, "-c", code, str(ckpts["qwen3_moe"][0])], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    line = next((l for l in out.stdout.splitlines() if l.startswith(("ACCEPTED", "REFUSED"))), out.stderr[-2000:])
    assert line.startswith("REFUSED"), line
    assert "--enable-expert-parallel " in line and "by --distributed-executor-backend ms_rpc" in line, line
