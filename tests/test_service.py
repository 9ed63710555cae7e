"""The worker as a service: CLI, grpc.health.v1 across start-up and drain, sd_notify, Prometheus metrics, deep
liveness, and TLS / mutual TLS / bearer-token security, each against real worker processes over real gRPC (and
one real vLLM engine over mutual TLS + token)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ROOT, WORKER_PY, free_port, start_worker
from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc

V = pb.PROTOCOL_VERSION_CURRENT
SERVICE = "ms_rpc.v1.ModelWorker"
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200),
                  ("grpc.min_reconnect_backoff_ms", 100)]


def _status(stub, service: str = "") -> str:
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as e:
        return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def _new(req_id="a", prompt=(1, 2, 3), blocks=(0,), scheduled=3):
    return pb.NewRequest(req_id=req_id, prompt_token_ids=list(prompt), block_ids=list(blocks),
                         num_scheduled_tokens=scheduled, sampling=pb.SamplingParams(temperature=0))


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_help_documents_every_flag_and_its_variable():
    out = subprocess.run([str(ROOT / ".venv-worker/bin/ms-worker"), "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "MS_WORKER_TOKEN": "s3cret-in-env"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    flags = set(re.findall(r"(--[a-z][a-z-]+)", text)) - {"--help", "--token-"}
    for flag in ["--model", "--host", "--port", "--device", "--dtype", "--rank", "--world-size", "--tls-cert",
                 "--tls-key", "--tls-client-ca", "--token", "--token-file", "--metrics-port", "--drain-s"]:
        assert flag in flags, flag
    for flag in flags - {"--parent-pid"}:
        var = "MS_WORKER_" + flag[2:].upper().replace("-", "_")
        assert var in text, f"{flag}: {var} not documented"
    assert "s3cret-in-env" not in out.stdout, "--help must not print a token taken from the environment"


def test_bad_arguments_are_refused_before_loading(tiny_llama):
    for args, msg in [(["--device", "gpu"], "unsupported device"), (["--dtype", "float16"], "not supported on cpu"),
                      (["--rank", "1"], "rank 1 is not in 0..0"), (["--tls-cert", "/nonexistent.crt"], "both"),
                      (["--tls-client-ca", "/x.pem"], "needs --tls-cert"),
                      (["--device", "ascend"], "MindSpore cannot use device 'ascend'")]:   # a CPU-only MindSpore
        out = subprocess.run([str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(tiny_llama), "--port", "0",
                              *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and msg in out.stderr, (args, out.stderr[-2000:])
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ERROR ms_worker\[\d+\]: ", out.stderr, re.M), out.stderr


# -- health, readiness, sd_notify, drain --------------------------------------------------------------------------
def test_health_across_startup_cache_and_drain(tiny_llama, tmp_path):
    sock_dir = tempfile.mkdtemp(prefix="sdn")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(sock_dir, "notify"))
    notify.settimeout(0.2)
    messages: list[str] = []

    def drain_notify():
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except (TimeoutError, socket.timeout):
                return

    port = free_port()
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(tiny_llama), "--no-jit",
                             "--port", str(port), "--drain-s", "3"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "NOTIFY_SOCKET": os.path.join(sock_dir, "notify")})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT)
    health = health_pb2_grpc.HealthStub(channel)
    worker = pb_grpc.ModelWorkerStub(channel)
    try:
        # Start-up: (port not yet bound) -> NOT_SERVING while loading -> SERVING.
        seen, loading_reply = [], None
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            s = _status(health)
            if not seen or seen[-1] != s:
                seen.append(s)
            if s == "NOT_SERVING" and loading_reply is None:
                try:
                    worker.Describe(pb.DescribeRequest(protocol_version=V), timeout=5)
                    loading_reply = "answered"
                except grpc.RpcError as e:
                    loading_reply = f"{e.code().name}: {e.details()}"
            if s == "SERVING":
                break
            time.sleep(0.05)
        seen = [s for s in seen if s != "UNAVAILABLE"]
        assert seen == ["NOT_SERVING", "SERVING"], (seen, (tmp_path / "worker.log").read_text())
        assert loading_reply is not None and (loading_reply.startswith("UNAVAILABLE: worker is loading the model")
                                              or (loading_reply == "answered")), loading_reply
        drain_notify()
        assert any(m.startswith("READY=1") for m in messages), messages
        assert any("STATUS=loading the model" in m for m in messages), messages

        # The model worker service turns SERVING only once the KV cache exists; deep liveness needs the cache too.
        assert _status(health, SERVICE) == "NOT_SERVING"
        err = _rpc_error(lambda: worker.CheckLiveness(pb.LivenessRequest(protocol_version=V), timeout=30))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no KV cache" in err.details()
        worker.InitializeCache(pb.CacheConfig(protocol_version=V, num_blocks=8, block_size=4), timeout=60)
        assert _status(health, SERVICE) == "SERVING"
        live = worker.CheckLiveness(pb.LivenessRequest(protocol_version=V), timeout=60)
        assert live.forward_s > 0 and live.next_step_id == 1 and live.requests_active == 0
        # A request in flight is untouched by a liveness forward.
        r1 = worker.Execute(pb.StepRequest(protocol_version=V, step_id=1, new_requests=[_new()]), timeout=60)
        live = worker.CheckLiveness(pb.LivenessRequest(protocol_version=V), timeout=60)
        assert live.next_step_id == 2 and live.requests_active == 1
        r2 = worker.Execute(pb.StepRequest(protocol_version=V, step_id=2, cached_requests=[
            pb.CachedRequest(req_id="a", num_computed_tokens=3, num_scheduled_tokens=1)]), timeout=60)
        assert len(r1.results[0].sampled_token_ids) == len(r2.results[0].sampled_token_ids) == 1

        # Drain: SIGTERM -> both NOT_SERVING while the port stays open (--drain-s 3), new steps refused, exit 0.
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.5
        while _status(health) != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _status(health) == "NOT_SERVING" and _status(health, SERVICE) == "NOT_SERVING"
        err = _rpc_error(lambda: worker.Execute(pb.StepRequest(protocol_version=V, step_id=3), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
        assert time.monotonic() - t_term < 3, "the drain checks ran past the drain window"
        assert proc.wait(30) == 0
        drain_notify()
        assert any(m.startswith("STOPPING=1") for m in messages), messages
        assert _status(health) == "UNAVAILABLE"       # the port is closed
        text = (tmp_path / "worker.log").read_text()
        assert "draining" in text and "stopped" in text, text
    finally:
        channel.close()
        _stop(proc)
        log.close()
        notify.close()


def test_sigterm_lets_the_step_in_flight_finish(default_model, tmp_path):
    """A long prefill (eager, ~2 s here) is running when SIGTERM arrives: it completes, then the worker exits 0."""
    proc, address = start_worker(default_model, ["--no-jit"], tmp_path / "worker.log")
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.ModelWorkerStub(channel)
    try:
        stub.InitializeCache(pb.CacheConfig(protocol_version=V, num_blocks=64, block_size=16), timeout=60)
        n = 480
        step = pb.StepRequest(protocol_version=V, step_id=1, new_requests=[
            _new("long", prompt=[100 + i % 50 for i in range(n)], blocks=range(30), scheduled=n)])
        done = {}

        def run():
            try:
                done["reply"] = stub.Execute(step, timeout=120)
            except grpc.RpcError as e:
                done["reply"] = e
            done["t"] = time.monotonic()

        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.3)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        th.join(120)
        assert isinstance(done["reply"], pb.StepResult), done["reply"]
        assert len(done["reply"].results[0].sampled_token_ids) == 1
        assert done["t"] > t_term, "the step finished before SIGTERM: make it longer"
        assert proc.wait(60) == 0
    finally:
        channel.close()
        _stop(proc)


# -- metrics ------------------------------------------------------------------------------------------------------
def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):      # raises on anything that is not valid exposition text
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_when_requests_are_served(tiny_llama, tmp_path):
    mport = free_port()
    proc, address = start_worker(tiny_llama, ["--no-jit", "--metrics-port", str(mport)], tmp_path / "worker.log")
    url = f"http://127.0.0.1:{mport}/metrics"
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.ModelWorkerStub(channel)
    try:
        m0 = _scrape(url)
        assert m0[("ms_worker_serving", ())] == 1
        assert m0[("ms_worker_kv_blocks_total", ())] == 0
        assert ("process_resident_memory_bytes", ()) in m0
        stub.InitializeCache(pb.CacheConfig(protocol_version=V, num_blocks=16, block_size=4), timeout=60)
        stub.Execute(pb.StepRequest(protocol_version=V, step_id=1, total_num_scheduled_tokens=8, new_requests=[
            _new("a", prompt=(1, 2, 3), blocks=(0,), scheduled=3),
            _new("b", prompt=(4, 5, 6, 7, 8), blocks=(1, 2), scheduled=5)]), timeout=60)
        stub.Execute(pb.StepRequest(protocol_version=V, step_id=2, cached_requests=[
            pb.CachedRequest(req_id="a", num_computed_tokens=3, num_scheduled_tokens=1)]), timeout=60)
        _rpc_error(lambda: stub.Execute(pb.StepRequest(protocol_version=V, step_id=9), timeout=60))
        front = _front_client(address)                   # the executor's client: its deep liveness check
        assert front.check_liveness().requests_active == 2
        front.close()
        m1 = _scrape(url)
        step = ("ms_worker_step_seconds_count", (("call", "Execute"),))
        assert m1[step] - m0.get(step, 0) == 2
        assert m1[("ms_worker_step_seconds_sum", (("call", "Execute"),))] > 0
        assert m1[("ms_worker_batch_size_count", ())] == 2 and m1[("ms_worker_batch_size_sum", ())] == 3
        assert m1[("ms_worker_scheduled_tokens_total", ())] == 9
        assert m1[("ms_worker_kv_blocks_total", ())] == 16
        assert m1[("ms_worker_kv_blocks_used", ())] == 3 and m1[("ms_worker_kv_blocks_free", ())] == 13
        assert m1[("ms_worker_requests_active", ())] == 2
        assert m1[("ms_worker_rpc_errors_total", (("code", "FAILED_PRECONDITION"), ("method", "Execute")))] == 1
        assert m1[("ms_worker_liveness_checks_total", ())] == 1
        # Finishing both requests frees their blocks.
        stub.Execute(pb.StepRequest(protocol_version=V, step_id=3, finished_req_ids=["a", "b"]), timeout=60)
        m2 = _scrape(url)
        assert m2[("ms_worker_requests_active", ())] == 0 and m2[("ms_worker_kv_blocks_used", ())] == 0
    finally:
        channel.close()
        _stop(proc)


# -- security -----------------------------------------------------------------------------------------------------
def _front_client(address: str, connect_timeout_s: float = 20, **ms_rpc):
    """The executor's own connection code (settings parsing, credentials, health wait), as the front runs it."""
    from vllm_ext.group import connect_worker
    from vllm_ext.settings import RpcSettings

    cfg = SimpleNamespace(additional_config={"ms_rpc": {"connect_timeout_s": connect_timeout_s, **ms_rpc}})
    return connect_worker(RpcSettings.from_vllm_config(cfg), address)


def _describe(address: str, **ms_rpc) -> str:
    client = _front_client(address, **ms_rpc)
    try:
        return client.describe().worker_id
    finally:
        client.close()


def _refused(address: str, **ms_rpc) -> str:
    from vllm_ext.client import WorkerError

    with pytest.raises(WorkerError) as e:
        _describe(address, connect_timeout_s=3, **ms_rpc)
    return str(e.value)


@pytest.fixture(scope="module")
def tls_workers(tiny_llama, pki, tmp_path_factory):
    """Three workers: TLS, mutual TLS, bearer token (from the environment, as systemd/Kubernetes pass it)."""
    logs = tmp_path_factory.mktemp("secure_workers")
    tls = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    started = {}
    health_port = free_port()
    try:
        started["tls"] = start_worker(tiny_llama, ["--no-jit", *tls, "--health-port", str(health_port)],
                                      logs / "tls.log")
        started["mtls"] = start_worker(tiny_llama, ["--no-jit", *tls, "--tls-client-ca", str(pki["ca_cert"])],
                                       logs / "mtls.log")
        started["token"] = start_worker(tiny_llama, ["--no-jit"], logs / "token.log",
                                        env={"MS_WORKER_TOKEN": "t0ken-for-tests"})
        yield {**{k: v[1] for k, v in started.items()}, "tls_health": f"127.0.0.1:{health_port}"}, logs
    finally:
        for proc, _ in started.values():
            _stop(proc)


def test_tls_worker(tls_workers, pki):
    addresses, logs = tls_workers
    a = addresses["tls"]
    assert _describe(a, tls_ca=str(pki["ca_cert"]))
    assert _describe(a, tls_ca=str(pki["ca_cert"]), tls_server_name="localhost")
    # Plaintext to a TLS port, and a CA that did not sign the worker's certificate: refused, clearly.
    msg = _refused(a)
    assert f"ms_rpc worker {a}: connect failed (UNAVAILABLE)" in msg and "tls_ca" in msg, msg
    msg = _refused(a, tls_ca=str(pki["rogue_ca_cert"]))
    assert "connect failed" in msg and re.search(r"(?i)certificate|handshake|ssl", msg), msg
    # ... and the worker keeps serving the right client.
    assert _describe(a, tls_ca=str(pki["ca_cert"]))
    # The plaintext health port (for Kubernetes probes) answers health and nothing else.
    channel = grpc.insecure_channel(addresses["tls_health"])
    assert _status(health_pb2_grpc.HealthStub(channel)) == "SERVING"
    err = _rpc_error(lambda: pb_grpc.ModelWorkerStub(channel).Describe(pb.DescribeRequest(protocol_version=V),
                                                                       timeout=10))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()
    assert "listening on 127.0.0.1" in (logs / "tls.log").read_text() and "(TLS)" in (logs / "tls.log").read_text()


def test_mutual_tls_worker(tls_workers, pki):
    addresses, _ = tls_workers
    a = addresses["mtls"]
    good = dict(tls_ca=str(pki["ca_cert"]), tls_cert=str(pki["client_cert"]), tls_key=str(pki["client_key"]))
    wid = _describe(a, **good)
    # No client certificate, or one from another CA: the handshake is refused.
    for bad in [dict(tls_ca=str(pki["ca_cert"])),
                dict(tls_ca=str(pki["ca_cert"]), tls_cert=str(pki["rogue_client_cert"]),
                     tls_key=str(pki["rogue_client_key"]))]:
        msg = _refused(a, **bad)
        assert f"ms_rpc worker {a}: " in msg and "failed (UNAVAILABLE)" in msg, msg
    assert _describe(a, **good) == wid
    # A certificate without its key is a configuration error, before any connection.
    from vllm_ext.executor import ConfigError

    with pytest.raises(ConfigError, match="needs both tls_cert and tls_key"):
        _describe(a, tls_ca=str(pki["ca_cert"]), tls_cert=str(pki["client_cert"]))


def test_token_worker(tls_workers, tmp_path):
    addresses, logs = tls_workers
    a = addresses["token"]
    wid = _describe(a, token="t0ken-for-tests")
    (tmp_path / "token").write_text("t0ken-for-tests\n")
    assert _describe(a, token_file=str(tmp_path / "token")) == wid
    # Health stays open (Kubernetes probes send no metadata); every ModelWorker call needs the token.
    channel = grpc.insecure_channel(a)
    assert _status(health_pb2_grpc.HealthStub(channel)) == "SERVING"
    stub = pb_grpc.ModelWorkerStub(channel)
    for md, why in [(None, "missing"), ((("authorization", "Bearer wrong"),), "invalid"),
                    ((("authorization", "t0ken-for-tests"),), "invalid")]:
        for call, req in [(stub.Describe, pb.DescribeRequest(protocol_version=V)),
                          (stub.Execute, pb.StepRequest(protocol_version=V, step_id=1)),
                          (stub.Shutdown, pb.ShutdownRequest(protocol_version=V))]:
            err = _rpc_error(lambda: call(req, timeout=10, metadata=md))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            assert err.details().startswith(f"{why} bearer token"), err.details()
    channel.close()
    msg = _refused(a)
    assert f"ms_rpc worker {a}: Describe failed (UNAUTHENTICATED): missing bearer token" in msg, msg
    msg = _refused(a, token="nope")
    assert "Describe failed (UNAUTHENTICATED): invalid bearer token" in msg, msg
    # The refused Shutdown did nothing: the worker still serves, same process.
    assert _describe(a, token="t0ken-for-tests") == wid
    assert "refused Describe from" in (logs / "token.log").read_text()


def test_binding_beyond_loopback_without_security_warns(tiny_llama, tmp_path):
    proc, _ = start_worker(tiny_llama, ["--no-jit", "--host", "0.0.0.0"], tmp_path / "w.log")
    _stop(proc)
    assert "binding 0.0.0.0 without TLS or a token" in (tmp_path / "w.log").read_text()


# -- one real vLLM engine over mutual TLS + token -----------------------------------------------------------------
def _generate(model, ms_rpc: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(model)!r}, dtype="float32", distributed_executor_backend="ms_rpc",
                      additional_config={{"ms_rpc": json.loads({json.dumps(ms_rpc)!r})}}, max_model_len=256,
                      max_num_seqs=4, num_gpu_blocks_override=32, block_size=16)
            out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
            print("RESULT " + json.dumps(out[0].outputs[0].text))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_vllm_engine_over_mutual_tls_and_token(default_model, pki, tmp_path):
    tls = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
           "--tls-client-ca", str(pki["ca_cert"])]
    (tmp_path / "token").write_text("front-and-worker-share-this")
    proc, address = start_worker(default_model, [*tls, "--token-file", str(tmp_path / "token")],
                                 tmp_path / "worker.log")
    try:
        good = dict(workers=[address], tls_ca=str(pki["ca_cert"]), tls_cert=str(pki["client_cert"]),
                    tls_key=str(pki["client_key"]), token_file=str(tmp_path / "token"))
        out = _generate(default_model, good)
        assert out.returncode == 0, out.stderr[-4000:]
        text = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
        assert "Paris" in text, text
        assert "(mutual TLS + bearer token)" in out.stdout + out.stderr, out.stdout[-4000:]
        # (Wrong or missing credentials through the same connection code: the tests above.)
        assert proc.poll() is None
    finally:
        _stop(proc)
