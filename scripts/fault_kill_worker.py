"""Fault script: kill -9 (or SIGSTOP: a hung worker) a worker during 16 concurrent streams, then check that the
front recovers.

Prints how each stream ended and when (after the kill), whether any hung, how long the executor took to
restart the worker and serve again, and whether a greedy request after the restart gives the same text as
before the kill (prefix cache reset: the same prompt must not reuse the dead worker's KV blocks).

Usage: .venv/bin/python scripts/fault_kill_worker.py [--streams 16] [--external] [--signal KILL|STOP] [--tp 3]
  --external: the worker runs outside the front (as under systemd/Kubernetes): the script kills it and
  starts a new one on the same port, and the front reconnects.
  --signal STOP: the worker is stopped, not killed (a hang: the front finds it by its heartbeat, whatever the
  step deadline); an external one is then killed and started again, as a supervisor would.
  --tp N: an embedded tensor-parallel group of N ranks; the signal goes to rank 1 alone.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import DEFAULT_MODEL, Server, cmdline, descendants, free_port, start_worker  # noqa: E402

PROMPT = "Count to a thousand:"


def complete(server, prompt: str, max_tokens: int, timeout: float = 120) -> tuple[int, str]:
    body = {"model": str(DEFAULT_MODEL), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())["choices"][0]["text"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:200]


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


def run(streams: int, external: bool, log_path: str, sig: signal.Signals = signal.SIGKILL, tp: int = 1) -> dict:
    """Returns the figures (also printed)."""
    worker = port = None
    extra = ["--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 30), "--tensor-parallel-size", str(tp)]
    if external:
        port = free_port()
        worker, address = start_worker(DEFAULT_MODEL, ["--port", str(port)], log_path=log_path + ".worker")
        extra += ["--additional-config", json.dumps({"ms_rpc": {"workers": [address]}})]
    server = Server(DEFAULT_MODEL, extra, log_path=log_path)
    figures = {}
    try:
        server.wait_healthy()
        before = complete(server, PROMPT, 24)
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
            worker.kill()
            worker.wait()
            worker, _ = start_worker(DEFAULT_MODEL, ["--port", str(port)], log_path=log_path + ".worker2")
        after = (0, "")
        for _ in range(60):                       # bounded: 60 tries, one every 3 s at most
            if server.proc.poll() is not None:
                break
            after = complete(server, PROMPT, 24, timeout=60)
            if after[0] == 200:
                break
            time.sleep(3)
        figures["served_again_s"] = time.monotonic() - t0 if after[0] == 200 else None
        figures["same_text_after_restart"] = after == before
        figures["front_alive"] = server.proc.poll() is None
        for k, v in figures.items():
            print(f"{k}: {round(v, 2) if isinstance(v, float) else v}")
        return figures
    finally:
        server.stop()
        if worker is not None:
            worker.kill()
            worker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--external", action="store_true")
    ap.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    ap.add_argument("--log", default="/tmp/fault_kill_worker.log")
    ap.add_argument("--tp", type=int, default=1)
    a = ap.parse_args()
    run(a.streams, a.external, a.log, signal.Signals["SIG" + a.signal], a.tp)


if __name__ == "__main__":
    main()
