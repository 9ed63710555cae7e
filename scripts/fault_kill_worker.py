"""Fault script: kill -9 (or SIGSTOP: a hung worker) a worker during 16 concurrent streams, then check that the
front recovers; or kill it during its warm-up at start-up.

Prints how each stream ended and when (after the kill), whether any hung, how long the executor took to
restart the worker and serve again, and the prefix cache across the restart: a prompt of more than three KV
blocks (vLLM's CPU block size, 128 tokens) is served twice before the fault (the second time from the prefix
cache: vLLM's prefix-cache hit counter grows) and again once the workers are back: its greedy tokens must
still equal HF's, and vLLM's counters must show no hit (the blocks the dead worker held are forgotten), then
hits again for the next request. `--idle-kill` kills the restarted worker once more while no request runs and
checks the same.

Usage: .venv/bin/python scripts/fault_kill_worker.py [--streams 16] [--external] [--signal KILL|STOP] [--tp 3]
                                                     [--idle-kill] [--during-warmup]
  --external: the worker runs outside the front (as under systemd/Kubernetes): the script kills it and
  starts a new one on the same port, and the front reconnects.
  --signal STOP: the worker is stopped, not killed (a hang: the front finds it by its heartbeat, whatever the
  step deadline); an external one is then killed and started again, as a supervisor would.
  --tp N: an embedded tensor-parallel group of N ranks; the signal goes to rank 1 alone.
  --during-warmup: kill -9 the embedded worker while it compiles its warm-up graphs at start-up: start-up
  fails with one error naming the worker; prints the exit code, how long after the kill and the error line.
"""

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import (DEFAULT_MODEL, Server, cmdline, descendants, free_port, hf_greedy, metric,  # noqa: E402
                      start_worker)

PROMPT = "Count to a thousand:"
BLOCK = 128                   # vLLM's CPU KV block size
LONG_PROMPT_LEN = 4 * BLOCK + 21
LONG_MAX_TOKENS = 8
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
BACK = "ms_rpc: workers back after"


def long_prompt() -> list[int]:
    """Fixed random token ids: more than three KV blocks, shared with no other prompt of this script."""
    return [int(t) for t in np.random.default_rng(19).integers(100, 20000, size=LONG_PROMPT_LEN)]


def complete(server, prompt, max_tokens: int, timeout: float = 120) -> tuple[int, str | list[int]]:
    """A greedy completion: (200, its token ids) or (HTTP status, the error's start)."""
    body = {"model": str(DEFAULT_MODEL), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())["choices"][0]["token_ids"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:200]


def cache_counters(server) -> tuple[float, float]:
    """vLLM's prefix-cache (hits, queries) counters, in tokens."""
    url = server.url + "/metrics"
    return metric(url, HITS), metric(url, QUERIES)


def long_request(server, prompt: list[int]) -> tuple[list[int] | None, float]:
    """The long prompt once: (its tokens or None, the prefix-cache hits it got)."""
    hits, queries = cache_counters(server)
    status, got = complete(server, prompt, LONG_MAX_TOKENS)
    for _ in range(50):            # bounded: the stats of the request's first step are usually there already
        if cache_counters(server)[1] - queries >= len(prompt):
            break
        time.sleep(0.1)
    return (got if status == 200 else None), cache_counters(server)[0] - hits


def wait_back(server, times: int, timeout: float = 300) -> bool:
    """Waits until the front's log says `times` times that the workers are back."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and server.proc.poll() is None:
        if server.tail(100000).count(BACK) >= times:
            return True
        time.sleep(0.5)
    return False


def stream(server, results: dict, i: int) -> None:
    body = {"model": str(DEFAULT_MODEL), "prompt": f"{PROMPT} {i}", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    n = 0
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    d = json.loads(line[6:])
                    if "error" in d:
                        results[i] = ("error event", time.monotonic(), d["error"].get("message", "")[:120])
                        return
                    if d["choices"][0].get("finish_reason") == "error":
                        results[i] = ("finish_reason error", time.monotonic(), f"after {n} chunks")
                        return
                    n += 1
        results[i] = ("completed", time.monotonic(), f"{n} chunks")
    except Exception as e:  # noqa: BLE001 - reported
        results[i] = ("exception", time.monotonic(), repr(e)[:120])


def run(streams: int, external: bool, log_path: str, sig: signal.Signals = signal.SIGKILL, tp: int = 1,
        idle_kill: bool = False) -> dict:
    """Returns the figures (also printed)."""
    worker = port = None
    extra = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(1 << 30), "--tensor-parallel-size", str(tp)]
    if external:
        port = free_port()
        worker, address = start_worker(DEFAULT_MODEL, ["--port", str(port)], log_path=log_path + ".worker")
        extra += ["--additional-config", json.dumps({"ms_rpc": {"workers": [address]}})]
    server = Server(DEFAULT_MODEL, extra, log_path=log_path)
    figures = {}
    prompt = long_prompt()
    expected = hf_greedy(DEFAULT_MODEL, [prompt], LONG_MAX_TOKENS)[0]
    try:
        server.wait_healthy()
        before = complete(server, PROMPT, 24)
        first, _ = long_request(server, prompt)
        second, figures["hits_before_fault"] = long_request(server, prompt)
        figures["long_equal_hf_before_fault"] = first == second == expected
        results: dict = {}
        threads = [threading.Thread(target=stream, args=(server, results, i)) for i in range(streams)]
        for t in threads:
            t.start()
        time.sleep(8)
        ranks = [p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)]
        if tp > 1:
            ranks = [p for p in ranks if "--rank 1 " in cmdline(p) + " "]
        pid = worker.pid if external else ranks[0]
        t0 = time.monotonic()
        os.kill(pid, sig)
        for t in threads:
            t.join(max(0.0, t0 + 60 - time.monotonic()))
        figures["hung"] = sum(t.is_alive() for t in threads)
        ends = sorted(when - t0 for how, when, _ in results.values() if how != "completed")
        figures["errored"] = len(ends)
        figures["completed"] = sum(how == "completed" for how, _, _ in results.values())
        figures["first_error_s"] = ends[0] if ends else None
        figures["last_error_s"] = ends[-1] if ends else None
        for i in sorted(results):
            how, when, what = results[i]
            print(f"stream {i:2d}: {how} after {when - t0:.2f} s: {what}")
        if external:
            worker = restart_external(worker, port, log_path + ".worker2")
        back = wait_back(server, 1)
        # Once the workers are back, the long prompt first: it must not hit the blocks the dead worker held.
        after = (0, "")
        for _ in range(60 if back else 0):        # bounded: 60 tries, one every 3 s at most
            after = complete(server, PROMPT, 24, timeout=60)
            if after[0] == 200 or server.proc.poll() is not None:
                break
            time.sleep(3)
        figures["served_again_s"] = time.monotonic() - t0 if after[0] == 200 else None
        figures["same_text_after_restart"] = after == before
        check_prefix_cache(server, prompt, expected, figures, "after_restart")
        if idle_kill and figures["served_again_s"] is not None:
            # No request runs now: the loss is found by the watchdog alone, and the cache must still be reset.
            if external:
                worker = restart_external(worker, port, log_path + ".worker3")
            else:
                os.kill([p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)][0],
                        signal.SIGKILL)
            figures["back_after_idle_kill"] = wait_back(server, 2)
            check_prefix_cache(server, prompt, expected, figures, "after_idle_kill")
        figures["front_alive"] = server.proc.poll() is None
        for k, v in figures.items():
            print(f"{k}: {round(v, 2) if isinstance(v, float) else v}")
        return figures
    finally:
        server.stop()
        if worker is not None:
            worker.kill()
            worker.wait()


def restart_external(worker, port: int, log_path: str):
    """What a supervisor does: the old worker killed, a new one on the same port."""
    worker.kill()
    worker.wait()
    return start_worker(DEFAULT_MODEL, ["--port", str(port)], log_path=log_path)[0]


def check_prefix_cache(server, prompt: list[int], expected: list[int], figures: dict, when: str) -> None:
    """The long prompt twice once the workers are back: the first must get no prefix-cache hit (the cache was
    reset with the lost workers) and HF's tokens, the second hits again (the cache works)."""
    got, figures[f"hits_{when}"] = long_request(server, prompt)
    again, figures[f"hits_{when}_again"] = long_request(server, prompt)
    figures[f"long_equal_hf_{when}"] = got == again == expected


def kill_during_warmup(log_path: str) -> dict:
    """Start `vllm serve`, kill -9 its embedded worker once the KV cache is allocated and warm-up has begun, and
    return how start-up ended (also printed)."""
    server = Server(DEFAULT_MODEL, ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)],
                    log_path=log_path)
    figures = {}
    try:
        end = time.monotonic() + 300
        while not re.search(r"KV cache: \d+ blocks of", server.tail(100000)):   # the worker's InitializeCache
            if server.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the worker never allocated its KV cache:\n{server.tail()}")
            time.sleep(0.1)
        time.sleep(1.0)                           # the front's Warmup call is under way
        workers = [p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)]
        figures["warmup_done_before_kill"] = "warm-up: " in server.tail(100000)
        t0 = time.monotonic()
        os.kill(workers[0], signal.SIGKILL)
        try:
            figures["exit_code"] = server.proc.wait(120)
            figures["exited_after_s"] = time.monotonic() - t0
        except Exception:  # noqa: BLE001 - reported as not exited
            figures["exit_code"] = figures["exited_after_s"] = None
        text = server.tail(100000)
        figures["error"] = next((line.strip() for line in text.splitlines()
                                 if "ConfigError: ms_rpc: start-up failed during the workers' warm-up" in line), None)
        figures["restarted"] = "restarting the local workers" in text
        for k, v in figures.items():
            print(f"{k}: {round(v, 2) if isinstance(v, float) else v}")
        return figures
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--external", action="store_true")
    ap.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    ap.add_argument("--log", default="/tmp/fault_kill_worker.log")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--idle-kill", action="store_true")
    ap.add_argument("--during-warmup", action="store_true")
    a = ap.parse_args()
    if a.during_warmup:
        kill_during_warmup(a.log)
    else:
        run(a.streams, a.external, a.log, signal.Signals["SIG" + a.signal], a.tp, a.idle_kill)


if __name__ == "__main__":
    main()
