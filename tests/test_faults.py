"""Faults end to end: a worker killed or hung under load, with the real `vllm serve`, real worker processes and
real streams (scripts/fault_kill_worker.py measures the same and prints the figures).

What must hold: every stream ends (with an error or complete), none hangs; the first error comes within 5 s;
then the executor brings the worker back (the embedded default restarts it; an external one is reconnected
when restarted on its port) and a new request succeeds, with the same greedy text as before the fault (the
prefix cache was reset), without restarting vLLM. After repeated loss, the executor gives up through vLLM's
failure callback and the server stops.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from conftest import ROOT, Server, cmdline, descendants, free_port, start_worker

sys.path.insert(0, str(ROOT / "scripts"))
import fault_kill_worker  # noqa: E402


def _check_recovery(f: dict) -> None:
    assert f["hung"] == 0, f
    assert f["errored"] + f["completed"] == 16, f
    assert f["errored"] > 0 and f["first_error_s"] <= 5.0, f
    assert f["front_alive"], f
    assert f["served_again_s"] is not None, f
    assert f["same_text_after_restart"], f


def test_embedded_worker_killed_under_16_streams_is_restarted(tmp_path):
    _check_recovery(fault_kill_worker.run(16, external=False, log_path=str(tmp_path / "serve.log")))


def test_external_worker_killed_and_restarted_is_reconnected(tmp_path):
    _check_recovery(fault_kill_worker.run(16, external=True, log_path=str(tmp_path / "serve.log")))


def test_hung_worker_misses_its_step_deadline(default_model, tmp_path):
    """SIGSTOP the embedded worker: the step deadline (floor 3 s here) fails the stream, names the worker and the
    step, and the executor replaces the hung worker."""
    log = tmp_path / "serve.log"
    cfg = {"ms_rpc": {"step_deadline_floor_s": 3, "step_deadline_factor": 5}}
    server = Server(default_model, ["--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 30),
                                    "--additional-config", json.dumps(cfg)], log_path=log)
    try:
        server.wait_healthy()
        out: dict = {}
        t = threading.Thread(target=fault_kill_worker.stream, args=(server, out, 0))
        t.start()
        time.sleep(6)
        worker = [p for p in descendants(server.proc.pid) if "ms_worker serve" in cmdline(p)][0]
        t0 = time.monotonic()
        os.kill(worker, signal.SIGSTOP)
        t.join(60)
        assert not t.is_alive(), "the stream hung"
        how, when, _ = out[0]
        assert how in ("error event", "finish_reason error") and when - t0 < 3 + 5, (how, when - t0)
        text = log.read_text()
        assert "missed its deadline" in text and "ms_rpc worker 127.0.0.1:" in text, server.tail()
        status, _ = fault_kill_worker.complete(server, "Hello", 4)
        for _ in range(40):                                    # bounded: the replacement worker loads
            if status == 200:
                break
            time.sleep(3)
            status, _ = fault_kill_worker.complete(server, "Hello", 4)
        assert status == 200, server.tail()
    finally:
        server.stop()


def test_gives_up_when_an_external_worker_stays_away(default_model, tmp_path):
    """An external worker that does not come back within reconnect_timeout_s: vLLM's failure callback fires, the
    server stops, and the log says which worker and why."""
    port = free_port()
    worker, address = start_worker(default_model, ["--port", str(port)], log_path=tmp_path / "worker.log")
    cfg = {"ms_rpc": {"workers": [address], "reconnect_timeout_s": 5}}
    log = tmp_path / "serve.log"
    server = Server(default_model, ["--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 30),
                                    "--additional-config", json.dumps(cfg)], log_path=log)
    try:
        server.wait_healthy()
        worker.kill()
        worker.wait()
        t0 = time.monotonic()
        server.proc.wait(timeout=60)
        text = log.read_text()
        assert "giving up on the workers" in text and address in text, server.tail()
        assert time.monotonic() - t0 < 60
    finally:
        server.stop()
        if worker.poll() is None:
            worker.kill()
