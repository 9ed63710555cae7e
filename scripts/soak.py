"""Soak: many concurrent streaming clients with random lengths and random cancellations, for a bounded time.

Every streamed token is checked against the greedy reference (HF transformers, fp32) of its prompt: a lost,
duplicated or out-of-order token is a mismatch. Worker RSS is sampled throughout; its slope after warm-up is
reported, with the graphs the worker compiled and dropped after warm-up (its metrics). At the end no request may
be left: vLLM's KV usage and the worker's held requests and used KV blocks must all be zero. Prints one figure
per line; exit code 1 when a check fails.

Usage: .venv/bin/python scripts/soak.py [--duration 600] [--clients 32] [--cancel 0.25]   (after `make envs model`)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import (DEFAULT_MODEL, PROMPTS, Server, cmdline, descendants, free_port,  # noqa: E402
                      hf_greedy, metric, rss_mib)

MAX_NEW = 32          # the greedy references are as long as test_server.py proves batching-invariant


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples) or 1e-9
    return 60 * sum((t - mt) * (r - mr) for t, r in samples) / var


class Client(threading.Thread):
    def __init__(self, server, refs, prompts, deadline: float, cancel: float, seed: int, stats: dict, lock):
        super().__init__(daemon=True)
        self.server, self.refs, self.prompts, self.deadline = server, refs, prompts, deadline
        self.cancel, self.rng, self.stats, self.lock = cancel, random.Random(seed), stats, lock

    def count(self, key: str, detail: str | None = None) -> None:
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + 1
            if detail and len(self.stats.setdefault("examples", [])) < 5:
                self.stats["examples"].append(detail)

    def one(self) -> None:
        i = self.rng.randrange(len(self.prompts))
        max_tokens = self.rng.randint(1, MAX_NEW)
        stop_after = self.rng.randint(1, max_tokens) if self.rng.random() < self.cancel else None
        body = {"model": str(DEFAULT_MODEL), "prompt": self.prompts[i], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        req = urllib.request.Request(self.server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        got: list[int] = []
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    return self.count("errors", str(d["error"])[:200])
                got.extend(d["choices"][0].get("token_ids") or [])
                if stop_after is not None and len(got) >= stop_after:
                    break                              # cancel: close the stream mid-way
        ref = self.refs[i][:max_tokens]
        if got != ref[:len(got)] or (stop_after is None and len(got) != max_tokens):
            return self.count("mismatches", f"prompt {i} max {max_tokens}: got {got} want {ref}")
        self.count("cancelled" if stop_after is not None else "completed")
        with self.lock:
            self.stats["tokens"] = self.stats.get("tokens", 0) + len(got)

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                self.one()
            except Exception as e:  # noqa: BLE001 - counted
                self.count("exceptions", repr(e)[:200])


def warm_up(server, prompts: list[list[int]], clients: int) -> None:
    """One round of `clients` concurrent greedy requests over all prompts, then one of 8: the decode and prefill
    batch shapes the soak will use compile now (each new shape costs memory once)."""
    def one(i: int) -> None:
        body = {"model": str(DEFAULT_MODEL), "prompt": prompts[i % len(prompts)], "max_tokens": MAX_NEW,
                "temperature": 0, "ignore_eos": True}
        req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()

    for n in (clients, 8):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)


def run(duration: float, clients: int, cancel: float, log_path: str, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    refs = hf_greedy(DEFAULT_MODEL, prompts, MAX_NEW)
    wport = free_port()
    extra = ["--max-model-len", "512", "--max-num-seqs", str(clients), "--kv-cache-memory-bytes", str(1 << 30),
             "--additional-config", json.dumps({"ms_rpc": {"worker_args": ["--metrics-port", str(wport)]}})]
    server = Server(DEFAULT_MODEL, extra, log_path=log_path)
    stats: dict = {}
    try:
        server.wait_healthy()
        worker = [p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)][0]
        lock = threading.Lock()
        warm_up(server, prompts, clients)           # the batch shapes compile here, not inside the RSS slope
        wurl = f"http://127.0.0.1:{wport}/metrics"
        compiled = metric(wurl, "ms_worker_graphs_compiled_total")
        t0 = time.monotonic()
        threads = [Client(server, refs, prompts, t0 + duration, cancel, seed + k, stats, lock)
                   for k in range(clients)]
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads) and time.monotonic() < t0 + duration + 300:
            samples.append((time.monotonic() - t0, rss_mib(worker)))
            time.sleep(5)
        hung = sum(t.is_alive() for t in threads)
        warm = [s for s in samples if s[0] >= min(30.0, duration / 4)]
        end = time.monotonic() + 60                    # the last cancelled streams are aborted asynchronously
        while time.monotonic() < end:
            left = (metric(server.url + "/metrics", "vllm:num_requests_running")
                    + metric(server.url + "/metrics", "vllm:kv_cache_usage_perc"))
            if left == 0:
                break
            time.sleep(1)
        figures = {
            "duration_s": round(time.monotonic() - t0, 1), "clients": clients,
            "completed": stats.get("completed", 0), "cancelled": stats.get("cancelled", 0),
            "tokens_checked": stats.get("tokens", 0), "mismatches": stats.get("mismatches", 0),
            "errors": stats.get("errors", 0), "exceptions": stats.get("exceptions", 0), "hung_clients": hung,
            "worker_rss_start_mib": round(warm[0][1] if warm else 0, 1),
            "worker_rss_end_mib": round(samples[-1][1] if samples else 0, 1),
            "worker_rss_peak_mib": round(max((r for _, r in samples), default=0), 1),
            "worker_rss_slope_mib_per_min": round(slope_mib_per_min(warm), 2),
            "graphs_compiled_after_warmup": metric(wurl, "ms_worker_graphs_compiled_total") - compiled,
            "worker_graphs": metric(wurl, "ms_worker_graphs"),
            "vllm_requests_running_end": metric(server.url + "/metrics", "vllm:num_requests_running"),
            "vllm_kv_usage_end": metric(server.url + "/metrics", "vllm:kv_cache_usage_perc"),
            "worker_requests_active_end": metric(wurl, "ms_worker_requests_active"),
            "worker_kv_blocks_used_end": metric(wurl, "ms_worker_kv_blocks_used"),
        }
        for k, v in figures.items():
            print(f"{k}: {v}")
        for ex in stats.get("examples", []):
            print("example:", ex)
        return figures
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--cancel", type=float, default=0.25, help="share of streams closed early (default 0.25)")
    ap.add_argument("--log", default="/tmp/soak.log")
    a = ap.parse_args()
    f = run(a.duration, a.clients, a.cancel, a.log)
    ok = (f["mismatches"] == f["errors"] == f["exceptions"] == f["hung_clients"] == 0
          and f["vllm_kv_usage_end"] == 0 and f["worker_requests_active_end"] == 0
          and f["worker_kv_blocks_used_end"] == 0 and f["graphs_compiled_after_warmup"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
