"""Fault check, the first piece of a fault script: kill -9 the embedded worker during 16 concurrent streams.

Prints how each stream ended and how long after the kill, whether any stream hung, and how and when the front
exited. Usage: .venv/bin/python scripts/fault_kill_worker.py   (after `make envs model`)
"""

import json
import os
import signal
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import DEFAULT_MODEL, Server, cmdline, descendants  # noqa: E402

STREAMS = 16


def stream(server, results: dict, i: int) -> None:
    body = {"model": str(DEFAULT_MODEL), "prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True,
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
                        results[i] = ("error event", time.monotonic(), d["error"].get("message", "")[:160])
                        return
                    n += 1
        results[i] = ("completed", time.monotonic(), f"{n} chunks")
    except Exception as e:  # noqa: BLE001 - reported
        results[i] = ("exception", time.monotonic(), repr(e)[:160])


def main() -> None:
    server = Server(DEFAULT_MODEL, ["--max-model-len", "512"],
                    log_path=os.environ.get("FAULT_LOG", "/tmp/fault_kill_worker.log"))
    try:
        server.wait_healthy()
        results: dict = {}
        threads = [threading.Thread(target=stream, args=(server, results, i)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        time.sleep(8)
        worker = [p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)][0]
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        for t in threads:
            t.join(60)
        print(f"streams still open 60 s after the kill: {sum(t.is_alive() for t in threads)}")
        for i in sorted(results):
            how, when, what = results[i]
            print(f"stream {i:2d}: {how} after {when - t0:.2f} s: {what}")
        for _ in range(30):
            if server.proc.poll() is not None:
                break
            time.sleep(1)
        print(f"front exit code: {server.proc.poll()} ({time.monotonic() - t0:.1f} s after the kill)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
