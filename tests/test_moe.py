"""Mixture-of-experts models (ms_models.moe): Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM from
ordinary HF checkpoints.

Tiny random checkpoints made here with HF transformers (fp32, seeded, 8 experts, top-2, hidden 64, GQA 4:2,
norms 1 + noise, routers scaled up so that routing differs clearly between tokens):
  qwen3_moe   2 sparse layers, norm_topk_prob true, saved single-file (per-expert tensors, as transformers writes
              them), sharded (small max_shard_size) and fused (transformers' in-memory gate_up_proj / down_proj)
  qwen2_moe   3 layers, the middle one dense (mlp_only_layers), shared expert with its sigmoid gate,
              norm_topk_prob false, q/k/v biases, one KV head (multi-query)
  mixtral     2 layers, block_sparse_moe.experts.{e}.w1/w2/w3
Checks:
  * logits: the MindSpore model (worker env, test_ms_models.py's scenario: prefill, chunked prefill, decodes,
    mixed ragged flat batches split over small graphs) vs HF, |diff| < 1e-4, greedy tokens equal; the front's
    config hash equals the worker's;
  * served: greedy tokens through vLLM's engine with the ms_rpc executor (tests/offline_generate.py, as
    test_models.py serves) equal HF's, for Qwen3-MoE at TP 2 with --enable-expert-parallel and Qwen2-MoE at TP 2
    (its one KV head replicated on both ranks);
  * an expert placement that cannot be served (experts that do not divide, the flag on a dense model) is refused
    at start-up, naming the numbers (the front's check before it starts workers, and the worker's argument check).
"""
import json
import os
import re
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


def _make(name, seed, **overrides):
    """A tiny random HF model of architecture ``name`` (the module docstring's); ``overrides``: config fields."""
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
                               **dict(common, num_key_value_heads=1))
        cls = T.Qwen2MoeForCausalLM
    else:
        cfg = T.MixtralConfig(num_hidden_layers=2, intermediate_size=32, num_local_experts=8, **common)
        cls = T.MixtralForCausalLM
    for k, v in overrides.items():
        setattr(cfg, k, v)
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
def moe(wg, wu, wd, norm, first):
    wg, wu, wd = (np.ascontiguousarray(a) for a in (wg, wu, wd))
    return moe_ffn_op()(Tensor(x), Tensor(logits), Tensor(wg), Tensor(wu), Tensor(wd), Tensor(qsl),
                        Tensor(np.array([2, 0], np.int32)), Tensor(np.array([K, norm, first], np.int32))).asnumpy()
for norm in (0, 1):
    out = moe(wg, wu, wd, norm, 0)
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
    # expert parallel: three ranks holding experts 0-2, 3-5, 6-7 (routing over all 8) add up to the whole;
    # tensor parallel: two ranks holding intermediate columns 0-47 and 48-95 of every expert
    parts = [moe(wg[a:b], wu[a:b], wd[a:b], norm, a) for a, b in ((0, 3), (3, 6), (6, 8))]
    assert all(np.abs(q).max() > 0 for q in parts)
    ep_err = float(np.abs(sum(parts) - out).max())
    tp_err = float(np.abs(sum(moe(wg[:, :, c], wu[:, :, c], wd[:, c], norm, 0)
                              for c in (slice(0, 48), slice(48, 96))) - out).max())
    assert ep_err < 1e-5 and tp_err < 1e-5, (norm, ep_err, tp_err)
    print("norm", norm, "max err", err, "expert split", ep_err, "column split", tp_err)
"""


def test_kernel_matches_numpy_on_a_multithreaded_step(tmp_path):
    """The MoeFFN op alone, on a step large enough for its thread team (300 real tokens of a 512-row bucket, 8
    experts): each token's top-2 experts' SwiGLU, weighted, equals a numpy loop over tokens; padding rows are
    zero; the parts of ranks holding some experts whole (expert parallel) or some columns of every expert (tensor
    parallel) add up to it."""
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


def _serve(path, prompts, variants):
    """Greedy tokens through vLLM's engine with the ms_rpc executor (tests/offline_generate.py), one engine per
    variant (engine arguments) in one process, and that process's stderr (the embedded workers' logs)."""
    from test_models import MAX_NEW

    cmd = [sys.executable, os.path.join(TESTS, "offline_generate.py"), str(path), "ms_rpc", json.dumps(prompts),
           str(MAX_NEW), "--skip-tokenizer-init", "--max-model-len", "512", "--kv-cache-mib", "64",
           "--variants", json.dumps(variants)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    results = [json.loads(l[len("RESULT "):]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and len(results) == len(variants), out.stderr[-6000:]
    return results, out.stderr


def test_served_greedy_equals_hf_at_tp1_tp2_and_expert_parallel(ckpts):
    """Qwen3-MoE served at TP 1 and at TP 2 with --enable-expert-parallel (each rank 4 of the 8 experts whole),
    Qwen2-MoE (shared expert, one KV head replicated on both ranks) at TP 2 (each rank 1/2 of every expert and of the
    shared one): greedy tokens equal HF's, and the workers say where their experts are."""
    from test_models import MAX_NEW

    rng = np.random.default_rng(1)
    prompts = [[int(x) for x in rng.integers(0, VOCAB, size=L)] for L in SERVE_PROMPT_LENS]
    tp2, ep2 = {"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}
    for name, variants in (("qwen3_moe", [{}, ep2]), ("qwen2_moe", [tp2])):
        path = ckpts[name][0]
        hf = hf_greedy(path, prompts, MAX_NEW)
        results, log = _serve(path, prompts, variants)
        for v, ours in zip(variants, results):
            assert [len(t) for t in ours] == [MAX_NEW] * len(prompts), (name, v)
            assert ours == hf, (name, v)
        placed = re.findall(r"tensor-parallel rank (\d) of 2; "
                            r"(experts \d\.\.\d of 8 whole|1/2 of each of the 8 experts)", log)
        want = ([("0", "experts 0..3 of 8 whole"), ("1", "experts 4..7 of 8 whole")] if name == "qwen3_moe" else
                [("0", "1/2 of each of the 8 experts"), ("1", "1/2 of each of the 8 experts")])
        assert sorted(placed) == sorted(want), placed


def test_experts_over_two_data_parallel_engines_of_two_ranks(ckpts, tmp_path):
    """vLLM's --data-parallel-size 2 --tensor-parallel-size 2 --enable-expert-parallel: two engines of two ranks,
    each rank an external worker started as an operator would (--data-parallel-size 2 --data-parallel-rank D
    --rank R --world-size 2, one --dist-addr), all four in one MindSpore cluster, each holding 2 of the 8 experts
    whole; an engine's tensor-parallel sums are built from the cluster's collectives (layers.EngineSum). Every served
    greedy token equals HF's (each engine's tokens pass through the other engine's experts), in a concurrent batch
    that both engines compute and for a request alone (the other engine idle: its dummy batches join every
    forward). The engines' workers listed in each other's place are refused at start-up, naming the worker and
    the engine it was started for."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import Server, concurrent_greedy, free_port, metric, start_worker
    from test_models import MAX_NEW

    path = ckpts["qwen3_moe"][0]
    rng = np.random.default_rng(3)
    prompts = [[int(x) for x in rng.integers(0, VOCAB, size=L)] for L in (*SERVE_PROMPT_LENS, 5, 14, 30)]
    hf = hf_greedy(path, prompts, MAX_NEW)
    dist, mports = f"127.0.0.1:{free_port()}", [free_port() for _ in range(4)]
    ranks = [(d, r) for d in (0, 1) for r in (0, 1)]   # worker i: engine i // 2, rank i % 2 (the addresses' order)

    def worker(i):
        d, r = ranks[i]
        return start_worker(path, ["--enable-expert-parallel", "--data-parallel-size", "2", "--data-parallel-rank",
                                   str(d), "--rank", str(r), "--world-size", "2", "--dist-addr", dist,
                                   "--metrics-port", str(mports[i])], log_path=tmp_path / f"worker{i}.log")

    with ThreadPoolExecutor(4) as ex:   # each waits in the cluster for the others before it is ready
        started = list(ex.map(worker, range(4)))
    procs, addresses = [p for p, _ in started], [a for _, a in started]
    metrics = [f"http://127.0.0.1:{p}/metrics" for p in mports]
    common = ["--tensor-parallel-size", "2", "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20),
              "--skip-tokenizer-init", "--additional-config", json.dumps({"ms_rpc": {"workers": addresses}})]
    try:
        for i, (d, r) in enumerate(ranks):
            log = (tmp_path / f"worker{i}.log").read_text()
            assert (f"tensor-parallel rank {r} of 2; experts {2 * i}..{2 * i + 1} of 8 whole over data-parallel "
                    f"engines: this is engine {d} of 2") in log, log[-2000:]
        server = Server(path, ["--data-parallel-size", "2", "--enable-expert-parallel", *common],
                        log_path=tmp_path / "serve.log")
        try:
            server.wait_healthy()
            assert concurrent_greedy(server.url, path, prompts, MAX_NEW) == hf
            assert all(metric(m, "ms_worker_scheduled_tokens_total") > 0 for m in metrics)   # both engines ran
            dummies = sum(metric(m, "ms_worker_dummy_batches_total") for m in metrics)
            assert concurrent_greedy(server.url, path, prompts[-1:], MAX_NEW) == hf[-1:]
            assert sum(metric(m, "ms_worker_dummy_batches_total") for m in metrics) >= dummies + 2 * MAX_NEW
        finally:
            server.stop()
        # the engines' workers listed in each other's place: engine 0 would get engine 1's two workers
        swapped = [a for a in common]
        swapped[-1] = json.dumps({"ms_rpc": {"workers": addresses[2:] + addresses[:2]}})
        wrong = Server(path, ["--data-parallel-size", "2", "--enable-expert-parallel", *swapped],
                       log_path=tmp_path / "wrong.log")
        try:
            with pytest.raises(RuntimeError) as refused:
                wrong.wait_healthy(timeout=300)
            log = wrong.tail(300)
        finally:
            wrong.stop()
        assert (f"ms_rpc worker {addresses[2]} shares its experts with 2 data-parallel engine(s) as engine 1; this "
                f"front expects engine 0 of 2") in log, str(refused.value)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_expert_placement_that_cannot_be_served_is_refused(ckpts, tmp_path, default_model):
    """Experts that do not divide over the ranks with --enable-expert-parallel, the flag on a model without
    experts, experts over data-parallel engines on the Ascend path: refused by the front before any worker starts
    and by the worker before it loads anything, naming the numbers."""
    from ms_models.config import ModelConfig
    from ms_models.parallel import check_tensor_parallel
    from vllm_ext.executor import ConfigError, check_tensor_parallel_size

    six = tmp_path / "six_experts"   # a config only: both checks run before any weight is read
    six.mkdir()
    cfg = json.loads((ckpts["qwen3_moe"][0] / "config.json").read_text())
    (six / "config.json").write_text(json.dumps(dict(cfg, num_experts=6)))
    (six / "model.safetensors").write_bytes(b"")
    c = ModelConfig.from_model_dir(str(six))
    assert check_tensor_parallel(c, 2, expert_parallel=True) is None   # 3 experts each; 4 heads, 2 KV heads
    assert check_tensor_parallel(c, 4, expert_parallel=False) is None  # one KV head replicated on 2 ranks each
    want = "--enable-expert-parallel over 4 ranks: Qwen3MoeForCausalLM's 6 experts do not divide into 4 equal parts"
    assert want in check_tensor_parallel(c, 4, expert_parallel=True)
    with pytest.raises(ConfigError, match="ms_rpc: " + re.escape(want)):
        check_tensor_parallel_size(str(six), 4, expert_parallel=True)
    # experts over data-parallel engines: all their ranks share the experts
    assert check_tensor_parallel(c, 1, expert_parallel=True, dp_size=3) is None
    over_dp = ("--enable-expert-parallel over 4 ranks (4 data-parallel engines x 1): Qwen3MoeForCausalLM's 6 experts "
               "do not divide into 4 equal parts")
    assert over_dp in check_tensor_parallel(c, 1, expert_parallel=True, dp_size=4)
    assert check_tensor_parallel(c, 2, expert_parallel=True, dp_size=3) is None
    over_dp_tp = "over 4 ranks (2 data-parallel engines x 2): Qwen3MoeForCausalLM's 6 experts do not divide"
    with pytest.raises(ConfigError, match=re.escape(over_dp_tp)):
        check_tensor_parallel_size(str(six), 2, expert_parallel=True, dp_size=2)
    p = subprocess.run([WORKER_PY, "-m", "ms_worker", "serve", "--model", str(six), "--port", "0",
                        "--data-parallel-size", "2", "--data-parallel-rank", "1", "--dist-addr", "127.0.0.1:1"],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert p.returncode == 2 and "--data-parallel-size 2 without --enable-expert-parallel" in p.stderr, p.stderr[-3000:]
    dense = "--enable-expert-parallel: LlamaForCausalLM has no routed experts to place"
    ascend = "--data-parallel-size 2 --enable-expert-parallel: experts over data-parallel engines run on the CPU path"
    for model, extra, why in ((six, ["--tp-size", "4", "--tp-rank", "1", "--dist-addr", "127.0.0.1:1"], want),
                              (six, ["--data-parallel-size", "4", "--data-parallel-rank", "3", "--dist-addr",
                                     "127.0.0.1:1"], over_dp),
                              (default_model, [], dense),
                              (six, ["--device", "ascend", "--data-parallel-size", "2", "--data-parallel-rank", "0",
                                     "--dist-addr", "127.0.0.1:1"], ascend)):
        p = subprocess.run([WORKER_PY, "-m", "ms_worker", "serve", "--model", str(model), "--port", "0",
                            "--enable-expert-parallel", *extra], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
        assert p.returncode == 2 and why in p.stderr, p.stderr[-3000:]
