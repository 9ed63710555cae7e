"""Faults end to end: a worker killed or hung under load, or killed during its warm-up, with the real `vllm serve`,
real worker processes and real streams (scripts/fault_kill_worker.py measures the same and prints the figures).

What must hold: every stream ends (with an error or complete), none hangs; the first error comes within 5 s of a
kill, within 10 s of a SIGSTOP (the heartbeat, whatever the step deadline);
then the executor brings the worker back (the embedded default restarts it; an external one is reconnected
when restarted on its port) and a new request succeeds, with the same greedy text as before the fault, without
restarting vLLM. A prompt of more than three KV blocks served from vLLM's prefix cache before the fault gets no
prefix-cache hit after it (vLLM's own counters; the dead worker's blocks are forgotten, also when it died with no
request running) and still HF's greedy tokens. A worker killed during warm-up stops start-up with one error
naming it. After repeated loss, the executor gives up through vLLM's failure callback and the server stops.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from conftest import ROOT, Server, free_port, start_worker

sys.path.insert(0, str(ROOT / "scripts"))
import fault_kill_worker  # noqa: E402
from fault_kill_worker import BLOCK  # noqa: E402


def _check_prefix_cache(f: dict, when: str) -> None:
    assert f[f"hits_{when}"] == 0, f              # the blocks the lost worker held are not reused
    assert f[f"hits_{when}_again"] > 3 * BLOCK, f  # while the new worker's are
    assert f[f"long_equal_hf_{when}"], f


def _check_recovery(f: dict) -> None:
    assert f["hits_before_fault"] > 3 * BLOCK and f["long_equal_hf_before_fault"], f
    assert f["hung"] == 0, f
    assert f["errored"] + f["completed"] == 16, f
    assert f["errored"] > 0 and f["first_error_s"] <= 5.0, f
    assert f["front_alive"], f
    assert f["served_again_s"] is not None, f
    assert f["same_text_after_restart"], f
    _check_prefix_cache(f, "after_restart")


def test_embedded_worker_killed_under_16_streams_is_restarted(tmp_path):
    """Also kills the restarted worker once more with no request running: the watchdog alone finds it, and the
    prefix cache is reset all the same."""
    f = fault_kill_worker.run(16, external=False, log_path=str(tmp_path / "serve.log"), idle_kill=True)
    _check_recovery(f)
    assert f["back_after_idle_kill"], f
    _check_prefix_cache(f, "after_idle_kill")


def test_external_worker_killed_and_restarted_is_reconnected(tmp_path):
    _check_recovery(fault_kill_worker.run(16, external=True, log_path=str(tmp_path / "serve.log")))


def test_worker_killed_during_warm_up_stops_start_up_naming_it(tmp_path):
    """Killed while it compiles its warm-up graphs at start-up, the embedded worker is not restarted: vLLM exits
    with an error within seconds, one line naming the worker, the call, and how the local worker exited."""
    f = fault_kill_worker.kill_during_warmup(str(tmp_path / "serve.log"))
    assert not f["warmup_done_before_kill"], f
    assert f["exit_code"] not in (0, None) and f["exited_after_s"] < 60, f
    assert f["error"] and "ms_rpc worker 127.0.0.1:" in f["error"] and "Warmup failed" in f["error"], f
    assert "local worker rank 0 (exit code -9) exited" in f["error"], f
    assert not f["restarted"], f


def test_hung_worker_is_found_by_its_heartbeat(tmp_path):
    """SIGSTOP the embedded worker under 4 streams, with the default step deadline (>= 120 s): its heartbeat stops,
    every stream ends with an error within 10 s naming the worker, the executor kills and replaces it, and the
    same greedy text is served again."""
    log = tmp_path / "serve.log"
    f = fault_kill_worker.run(4, external=False, log_path=str(log), sig=signal.SIGSTOP)
    assert f["hung"] == 0 and f["completed"] == 0 and f["errored"] == 4, f
    assert f["last_error_s"] <= 10.0, f
    assert f["front_alive"] and f["served_again_s"] is not None and f["same_text_after_restart"], f
    _check_prefix_cache(f, "after_restart")
    text = log.read_text()
    assert "no heartbeat for" in text and "ms_rpc worker 127.0.0.1:" in text, text[-3000:]


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


def test_health_watch_follows_a_draining_worker(default_model, tmp_path):
    """The step channel's Health.Watch stream (WorkerClient.watch_health; the watchdog reads `watched` to notice a
    draining worker at once): SERVING while the worker serves, NOT_SERVING once it drains (SIGTERM: the
    reference worker's health turns NOT_SERVING, then its port closes within its grace), None once it is gone."""
    from vllm_ext.client import WorkerClient

    proc, address = start_worker(default_model, ["--simulate-step-ms", "10"], tmp_path / "reference.log",
                                 entry=["-m", "ms_rpc.reference"])
    client = WorkerClient(address)

    def wait_for(want, limit_s: float):
        end = time.monotonic() + limit_s
        while client.watched != want and time.monotonic() < end:
            time.sleep(0.02)
        return client.watched

    try:
        client.wait_ready(60)
        client.watch_health()
        assert wait_for("SERVING", 10) == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert wait_for("NOT_SERVING", 10) == "NOT_SERVING", (tmp_path / "reference.log").read_text()
        assert proc.poll() is None                # still draining: the stream said so before the port closed
        proc.wait(timeout=30)
        assert wait_for(None, 10) is None         # the stream ended with the worker: callers ask `health` again
    finally:
        client.close()
        proc.kill()
        proc.wait()
