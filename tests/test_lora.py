"""Multi-LoRA through vLLM's own LoRA surface (--enable-lora --lora-modules, /v1/models, a request's model name,
/v1/load_lora_adapter and /v1/unload_lora_adapter): base requests and several adapters mixed in one batch, each
greedy token equal to HF transformers' argmax on the checkpoint with that adapter merged by hand
(W' = W + scale * B @ A). The base is a tiny random Llama (perturbed norms and biases, odd MLP width) with the
default model's tokenizer; the adapters are random PEFT files written here (peft is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import (Server, cmdline, concurrent_greedy, descendants, hf_greedy, perturb_norms_and_biases,
                      require_default_model)
from lora_adapters import TARGETS, make_adapter
from test_tp import start_group, stop_all

MAX_NEW = 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def make_base(path: Path) -> Path:
    import torch
    import transformers as T

    torch.manual_seed(11)
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=97, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, initializer_range=0.1)
    perturb_norms_and_biases(T.LlamaForCausalLM(cfg)).to(torch.float32).save_pretrained(path)
    for f in TOKENIZER_FILES:
        src = require_default_model() / f
        if src.exists():
            shutil.copy(src, path / f)
    return path


def merged(base: Path, deltas: dict, out: Path) -> Path:
    """The base checkpoint with the adapter merged: W + scale * B @ A."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    sd = model.state_dict()
    with torch.no_grad():
        for name, d in deltas.items():
            sd[name].add_(d)
    model.save_pretrained(out)
    return out


def post(url: str, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 49152, int(k)).tolist() for k in rng.integers(3, 20, n)]


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = make_base(d / "base")
    a1 = make_adapter(d / "a1", base, r=8, alpha=16, targets=TARGETS, seed=1)
    a2 = make_adapter(d / "a2", base, r=16, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=2, rslora=True)
    a3 = make_adapter(d / "a3", base, r=4, alpha=4, targets=["k_proj", "o_proj", "up_proj", "gate_proj"], seed=3)
    ps = prompts(6)
    want = {"base": hf_greedy(base, ps, MAX_NEW)}
    for name, deltas in (("a1", a1), ("a2", a2), ("a3", a3)):
        want[name] = hf_greedy(merged(base, deltas, d / f"merged_{name}"), ps, MAX_NEW)
    for name in ("a1", "a2", "a3"):   # the adapters change tokens, so the comparisons below can fail
        assert want[name] != want["base"], name
    return d, base, ps, want


def serve_args(d: Path, extra=()) -> list[str]:
    return ["--enable-lora", "--lora-modules", f"a1={d / 'a1'}", f"a2={d / 'a2'}", "--max-loras", "2",
            "--max-cpu-loras", "2", "--max-lora-rank", "16", "--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
            "--kv-cache-memory-bytes", str(32 << 20), *extra]


def mixed_batch(url: str, base: Path, ps, want, names) -> None:
    """One request per (prompt, adapter) pair, all in flight together: each equals HF on its merged checkpoint."""
    models = [str(base) if n == "base" else n for n in names]
    got = concurrent_greedy(url, models, ps, MAX_NEW)
    for i, n in enumerate(names):
        assert got[i] == want[n][i], f"prompt {i} with {n}: {got[i]} != HF {want[n][i]}"


def test_mixed_batch_runtime_load_and_bad_adapters(lora_setup, tmp_path):
    d, base, ps, want = lora_setup
    s = Server(base, serve_args(d), env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, log_path=tmp_path / "serve.log")
    try:
        s.wait_healthy()
        with urllib.request.urlopen(s.url + "/v1/models", timeout=30) as r:
            ids = {m["id"] for m in json.loads(r.read())["data"]}
        assert {"a1", "a2", str(base)} <= ids, ids
        names = ["base", "a1", "a2", "a1", "base", "a2"]
        mixed_batch(s.url, base, ps, want, names)

        # a third adapter loaded at run time: the workers hold at most --max-cpu-loras 2 adapters (they refuse a
        # third), so the front removes the least recently used one and loads it again when a request needs it
        assert post(s.url, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(d / "a3")})[0] == 200
        mixed_batch(s.url, base, ps, want, ["a3", "a1", "base", "a3", "a1", "base"])
        mixed_batch(s.url, base, ps, want, ["a2", "a3", "a2", "base", "a3", "a2"])
        log = s.tail(100000)
        assert "at most 2 adapters held" in log and "LoRA adapter id 1 removed" in log, log[-3000:]
        assert log.count("LoRA adapter 'a2' (id 2, rank 16) loaded") >= 2, log[-3000:]
        assert post(s.url, "/v1/unload_lora_adapter", {"lora_name": "a3"})[0] == 200
        code, body = post(s.url, "/v1/completions", {"model": "a3", "prompt": ps[0], "max_tokens": 2})
        assert code == 404, body

        # bad adapters: one clear error each, and the server keeps serving everything else
        cfg = json.loads((base / "config.json").read_text())
        make_adapter(tmp_path / "big", base, r=32, alpha=32, targets=["q_proj"], seed=4)
        make_adapter(tmp_path / "shape", base, r=4, alpha=4, targets=["q_proj"], seed=5,
                     shape_of={"q_proj": (cfg["hidden_size"] + 1, cfg["hidden_size"])})
        make_adapter(tmp_path / "target", base, r=4, alpha=4, targets=["lm_head"], seed=6)
        bad = {str(tmp_path / "missing"): ("No adapter found", 404),
               str(tmp_path / "big"): ("LoRA rank 32 is greater than max_lora_rank 16", 500),
               str(tmp_path / "shape"): ("do not match the model (expected [4, 64] and [64, 4] for rank 4)", 500),
               str(tmp_path / "target"): ("target modules ['lm_head'] are not supported", 500)}
        for path, (why, status) in bad.items():
            code, body = post(s.url, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
            assert code == status and why in body, (path, code, body)
        with urllib.request.urlopen(s.url + "/v1/models", timeout=30) as r:
            assert "bad" not in {m["id"] for m in json.loads(r.read())["data"]}
        mixed_batch(s.url, base, ps, want, ["a1", "base", "a2", "a2", "a1", "base"])

        # a worker lost and restarted gets the adapters again from the executor
        worker = next(p for p in descendants(s.proc.pid) if "ms_worker serve" in cmdline(p))
        os.kill(worker, signal.SIGKILL)
        end = time.monotonic() + 240
        while post(s.url, "/v1/completions", {"model": "a2", "prompt": ps[0], "max_tokens": 1})[0] != 200:
            assert time.monotonic() < end, s.tail()
            time.sleep(2)
        mixed_batch(s.url, base, ps, want, ["a2", "a1", "base", "a1", "a2", "a1"])
    finally:
        s.stop()


def test_tp2_offline_requests_load_adapters_on_demand(lora_setup, tmp_path):
    """vLLM's offline API with a LoRARequest per prompt (never added through add_lora: the executor loads each
    adapter when a request first needs it), on two external tensor-parallel ranks: the front streams the adapter
    files to them (an external worker may be on another host; the workers' logs say they loaded what was sent);
    LoRA weights sharded like their base layers."""
    d, base, ps, want = lora_setup
    procs, addresses, _, logs = start_group(base, 2, tmp_path)
    names = ["a2", "base", "a1", "a1", "a2", "base"]
    engine = {"tensor_parallel_size": 2, "additional_config": {"ms_rpc": {"workers": addresses}},
              "enable_lora": True, "max_loras": 2, "max_lora_rank": 16, "max_num_seqs": 8,
              "max_num_batched_tokens": 64}
    try:
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "offline_generate.py"), str(base), "ms_rpc",
                              json.dumps(ps), str(MAX_NEW), "--max-model-len", "128", "--kv-cache-mib", "32",
                              "--engine-args", json.dumps(engine),
                              "--loras", json.dumps([None if n == "base" else str(d / n) for n in names])],
                             capture_output=True, text=True, timeout=900)
        got = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert got, out.stdout[-3000:] + out.stderr[-3000:]
        for i, n in enumerate(names):
            assert got[0][i] == want[n][i], f"prompt {i} with {n}: {got[0][i]} != HF {want[n][i]}"
        for log in logs:
            text = log.read_text(errors="replace")
            assert "LoRA adapter 'a1' (id 2, rank 8) loaded from the files the front sent" in text, text[-2000:]
    finally:
        stop_all(procs)


class _Slots:
    """Stand-in for ms_models.lora.LoraSlots: records which adapter each slot was given."""

    max_loras, max_rank, num_layers = 2, 4, 1

    def __init__(self):
        self.held: dict[int, object] = {}

    def write(self, slot: int, weights) -> None:
        self.held[slot] = weights


def test_manager_evicts_least_recently_used_and_keeps_pinned():
    from ms_worker.lora import Adapter, LoraError, LoraManager

    slots = _Slots()
    m = LoraManager(slots, max_cpu_loras=3)
    for i in (1, 2, 3):
        assert m.add(Adapter(i, f"a{i}", 4, f"w{i}"), replace=False)
    with pytest.raises(LoraError, match=r"holds 3 adapters \(--max-cpu-loras 3\)"):
        m.add(Adapter(4, "a4", 4, "w4"), replace=False)
    assert not m.add(Adapter(1, "a1", 4, "other"), replace=False)      # already loaded: vLLM's False
    assert m.activate([1, 2]) == {1: 0, 2: 1}
    assert m.activate([1]) == {1: 0}                                    # 2 is now the least recently used
    assert m.activate([3]) == {3: 1} and slots.held[1] == "w3"
    assert m.pin(1) and not m.pin(9)
    assert m.activate([2]) == {2: 1}                                    # 1 is pinned: 3 goes
    with pytest.raises(ValueError, match="more than --max-loras 2"):
        m.activate([1, 2, 3])
    assert m.remove(1) and not m.remove(1) and m.ids() == [2, 3]
    assert m.activate([3, 2]) == {2: 1, 3: 0}
    assert m.add(Adapter(3, "a3", 4, "w3b"), replace=True)              # load_inplace: written again when next used
    assert m.activate([3]) == {3: 0} and slots.held[0] == "w3b"
