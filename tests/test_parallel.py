"""Tensor and data parallelism through the real `vllm serve`: TP = 3 on the default model with the embedded
launcher (three worker ranks joined by MindSpore's collectives), and DP = 2 with two external workers, one per
DP rank. Greedy tokens are checked against HF transformers; worker-level TP checks are in tests/test_tp.py."""

from __future__ import annotations

import json

from conftest import (PROMPTS, Server, cmdline, concurrent_greedy, descendants, free_port, hf_greedy, metric,
                      start_worker)

MAX_NEW = 16


def _prompt_ids(model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return [tok(p)["input_ids"] for p in PROMPTS[:6]]


def test_tp3_embedded_matches_hf(default_model, tmp_path):
    prompt_ids = _prompt_ids(default_model)
    expected = hf_greedy(default_model, prompt_ids, MAX_NEW)
    server = Server(default_model, ["--tensor-parallel-size", "3", "--max-model-len", "512",
                                    "--kv-cache-memory-bytes", str(1 << 30)], log_path=tmp_path / "serve.log")
    try:
        server.wait_healthy()
        ranks = [cmdline(p) for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)]
        assert len(ranks) == 3, ranks
        assert concurrent_greedy(server.url, default_model, prompt_ids, MAX_NEW) == expected
    finally:
        server.stop()


def test_dp2_two_worker_groups_both_serve(default_model, tmp_path):
    prompt_ids = _prompt_ids(default_model)
    expected = hf_greedy(default_model, prompt_ids, MAX_NEW)
    workers, addresses, metrics = [], [], []
    try:
        for i in range(2):
            mport = free_port()
            proc, address = start_worker(default_model, ["--metrics-port", str(mport)],
                                         log_path=tmp_path / f"worker{i}.log")
            workers.append(proc)
            addresses.append(address)
            metrics.append(f"http://127.0.0.1:{mport}/metrics")
        cfg = {"ms_rpc": {"workers": addresses}}
        server = Server(default_model, ["--data-parallel-size", "2", "--max-model-len", "512",
                                        "--kv-cache-memory-bytes", str(1 << 30),
                                        "--additional-config", json.dumps(cfg)],
                        log_path=tmp_path / "serve.log")
        try:
            server.wait_healthy()
            assert concurrent_greedy(server.url, default_model, prompt_ids, MAX_NEW) == expected
            served = [metric(m, "ms_worker_scheduled_tokens_total") for m in metrics]
            assert all(n > 0 for n in served), served          # both DP ranks' workers computed tokens
        finally:
            server.stop()
    finally:
        for p in workers:
            p.kill()
            p.wait()
