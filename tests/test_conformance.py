"""The conformance kit (`python -m ms_rpc.conformance`) against real MindSpore workers: it passes from the front
environment and from the worker environment, imports nothing of either side's frameworks, and fails, naming the
check, against a worker that breaks the contract (a proxy that accepts out-of-order steps)."""

from __future__ import annotations

import os
import re
import subprocess
from concurrent import futures

import grpc
import pytest

from conftest import FRONT_PY, ROOT, WORKER_PY, start_worker
from ms_rpc.v1 import worker_pb2 as pb

FORBIDDEN = ("torch", "vllm", "mindspore", "ms_worker", "ms_models", "vllm_ext")
# grpc imports the grpc_health package itself when installed; the kit encodes health messages by hand
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")


def _kit(python, address: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """The kit as a subprocess of `python`, with only the contract package on its path (not the repository)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "proto")}
    return subprocess.run([str(python), "-m", "ms_rpc.conformance", address, *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def _lines(out: subprocess.CompletedProcess) -> tuple[dict[str, str], tuple[int, int]]:
    """{check name: its line} and the summary (passed, failed); the summary must be the last line."""
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr[-3000:]
    m = SUMMARY.match(lines[-1])
    assert m, f"last line {lines[-1]!r} is not the summary\n{out.stderr[-3000:]}"
    checks = {}
    for line in lines[:-1]:
        verdict, _, rest = line.partition(" ")
        assert verdict in ("PASS", "FAIL"), line
        checks[rest.split(":", 1)[0]] = line
    return checks, (int(m.group(1)), int(m.group(2)))


@pytest.mark.parametrize("python", [FRONT_PY, WORKER_PY], ids=["front_env", "worker_env"])
def test_kit_imports_no_framework(python, tmp_path):
    imported = subprocess.run(
        [str(python), "-c", "import sys, ms_rpc.conformance.__main__; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "proto")})
    assert imported.returncode == 0, imported.stderr[-3000:]
    modules = imported.stdout.split()
    loaded = {m.split(".")[0] for m in modules}
    assert not loaded & set(FORBIDDEN), f"the kit imports {sorted(loaded & set(FORBIDDEN))}"
    assert not [m for m in modules if m.startswith("grpc_health.")], "the kit imports grpc_health's messages"


def test_kit_passes_against_the_worker(default_model, tmp_path):
    """From the worker environment (numpy 1); tests/test_reference.py runs it from the front's (numpy 2)."""
    python = WORKER_PY
    proc, address = start_worker(default_model, [], tmp_path / "worker.log")
    try:
        out = _kit(python, address, "--model", str(default_model), cwd=tmp_path)
    finally:
        proc.kill()
        proc.wait()
    checks, (passed, failed) = _lines(out)
    assert failed == 0 and out.returncode == 0, "\n".join(out.stdout.splitlines()[-60:]) + out.stderr[-3000:]
    assert passed == len(checks) >= 40, out.stdout
    for name in ("step_id.replay_refused", "delta.resumed_after_preemption", "delta.prefix_cache_hit",
                 "sampling.deferred_with_grammar_bitmask", "message.size_limit", "health.serving_after_load",
                 "handshake.describe_matches_checkpoint"):
        assert checks.get(name, "").startswith("PASS"), (name, out.stdout)


class ReplayAcceptingProxy(grpc.GenericRpcHandler):
    """Forwards every call to a real worker, except that an Execute the worker refuses with FAILED_PRECONDITION
    (a gap, a replay, a reorder, a step before the cache) is answered OK with an empty result."""

    def __init__(self, backend: str):
        self.channel = grpc.insecure_channel(backend)

    def service(self, details):
        method = details.method
        forward = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

        def call(raw: bytes, context):
            try:
                return forward(raw, timeout=120)
            except grpc.RpcError as e:
                if method.endswith("/Execute") and e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return pb.StepResult(step_id=pb.StepRequest.FromString(raw).step_id).SerializeToString()
                context.abort(e.code(), e.details())

        return grpc.unary_unary_rpc_method_handler(call)


def test_kit_fails_a_worker_that_accepts_out_of_order_steps(tiny_llama, tmp_path):
    proc, backend = start_worker(tiny_llama, ["--no-jit", "--max-message-mb", "1"], tmp_path / "worker.log")
    proxy = grpc.server(futures.ThreadPoolExecutor(4))
    handler = ReplayAcceptingProxy(backend)
    proxy.add_generic_rpc_handlers([handler])
    port = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    try:
        out = _kit(FRONT_PY, f"127.0.0.1:{port}", "--max-message-mb", "1", cwd=tmp_path)
    finally:
        proxy.stop(0)
        handler.channel.close()
        proc.kill()
        proc.wait()
    checks, (passed, failed) = _lines(out)
    assert out.returncode == 1 and failed >= 1, out.stdout + out.stderr[-3000:]
    for name in ("step_id.gap_refused", "step_id.replay_refused", "step_id.reorder_refused"):
        line = checks[name]
        assert re.match(rf"FAIL {re.escape(name)}: .*accepted.*expected FAILED_PRECONDITION", line), line
    # the checks the proxy does not touch still pass: the kit names what is wrong, not everything
    for name in ("handshake.describe", "handshake.initialize_cache", "bounds.block_id_beyond_cache"):
        assert checks[name].startswith("PASS"), checks[name]
    assert failed == len(checks) - passed
