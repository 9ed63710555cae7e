"""Bad set-ups and bad messages get one clear error, never a hang; the worker keeps serving.

Each test talks to a real worker process over a real gRPC channel, or starts the real vLLM engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import grpc
import pytest

from conftest import ROOT, start_worker
from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc

V = pb.PROTOCOL_VERSION_CURRENT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama checkpoint made with HF transformers (a different model than the default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def worker(tiny_model, tmp_path_factory):
    proc, address = start_worker(tiny_model, ["--no-jit"], log_path=tmp_path_factory.mktemp("w") / "worker.log")
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.ModelWorkerStub(channel)
    stub.InitializeCache(pb.CacheConfig(protocol_version=V, num_blocks=16, block_size=4), timeout=60)
    yield proc, address, stub
    channel.close()
    proc.kill()
    proc.wait()


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _step(step_id, **kw):
    return pb.StepRequest(protocol_version=V, step_id=step_id, **kw)


def _new(req_id="a", prompt=(1, 2, 3), blocks=(0,), scheduled=3):
    return pb.NewRequest(req_id=req_id, prompt_token_ids=list(prompt), block_ids=list(blocks),
                         num_scheduled_tokens=scheduled, sampling=pb.SamplingParams(temperature=0))


def test_protocol_version_mismatch_is_refused(worker):
    _, _, stub = worker
    code, details = _code(lambda: stub.Describe(pb.DescribeRequest(protocol_version=99), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "protocol version mismatch" in details and "v99" in details


def test_bad_steps_are_refused_and_change_nothing(worker):
    _, _, stub = worker
    # The first step after InitializeCache is 1; a gap is refused.
    code, details = _code(lambda: stub.Execute(_step(2, new_requests=[_new()]), timeout=60))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects step 1" in details
    # Unknown request, block ids outside the cache, token ids outside the vocabulary: refused, step not consumed.
    cases = [
        _step(1, cached_requests=[pb.CachedRequest(req_id="nope", num_computed_tokens=3, num_scheduled_tokens=1)]),
        _step(1, new_requests=[_new(blocks=(999,))]),
        _step(1, new_requests=[_new(prompt=(1, 5000, 2))]),
        _step(1, new_requests=[_new(scheduled=9)]),
    ]
    for msg in cases:
        code, details = _code(lambda: stub.Execute(msg, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "refused" in details
    # Garbage bytes where a StepRequest should be.
    channel = grpc.insecure_channel(worker[1])
    garbage = channel.unary_unary("/ms_rpc.v1.ModelWorker/Execute", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
    code, _ = _code(lambda: garbage(b"\xff\xff\xff\xff\x0f", timeout=10))
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    channel.close()
    # After all that, step 1 still works, and step 2 continues the same request.
    r1 = stub.Execute(_step(1, new_requests=[_new()], total_num_scheduled_tokens=3), timeout=60)
    assert [r.req_id for r in r1.results] == ["a"] and len(r1.results[0].sampled_token_ids) == 1
    r2 = stub.Execute(_step(2, cached_requests=[pb.CachedRequest(req_id="a", num_computed_tokens=3,
                                                                 num_scheduled_tokens=1)]), timeout=60)
    assert len(r2.results[0].sampled_token_ids) == 1
    # A replayed step is refused (exactly once).
    code, _ = _code(lambda: stub.Execute(_step(2), timeout=60))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_request_refused_alone_leaves_the_others(worker):
    """With refuse_alone (what the front sends), a request the worker cannot serve gets an error in its own result,
    its state is dropped, and the step's other requests are served and go on in the next steps."""
    _, _, stub = worker
    stub.InitializeCache(pb.CacheConfig(protocol_version=V, num_blocks=16, block_size=4), timeout=60)
    step1 = _step(1, refuse_alone=True, total_num_scheduled_tokens=6,
                  new_requests=[_new("good"), _new("bad", prompt=(1, 5000, 2), blocks=(1,))])
    r1 = stub.Execute(step1, timeout=60)
    by_id = {r.req_id: r for r in r1.results}
    assert set(by_id) == {"good", "bad"}
    assert len(by_id["good"].sampled_token_ids) == 1 and not by_id["good"].error
    bad = by_id["bad"]
    assert not bad.sampled_token_ids and "step 1" in bad.error and "'bad'" in bad.error and "vocabulary" in bad.error
    # Step 2: the good request decodes on; a cached delta for the refused one is refused alone too (its state is
    # gone), and so is one whose blocks lie outside the cache.
    step2 = _step(2, refuse_alone=True, total_num_scheduled_tokens=5, new_requests=[_new("big", blocks=(99,))],
                  cached_requests=[pb.CachedRequest(req_id="good", num_computed_tokens=3, num_scheduled_tokens=1),
                                   pb.CachedRequest(req_id="bad", num_computed_tokens=3, num_scheduled_tokens=1)])
    r2 = stub.Execute(step2, timeout=60)
    by_id = {r.req_id: r for r in r2.results}
    assert len(by_id["good"].sampled_token_ids) == 1 and not by_id["good"].error
    assert "not known" in by_id["bad"].error and "outside the KV cache" in by_id["big"].error
    # The same good request in a fresh run of the worker state gives the same tokens: the refusals changed nothing.
    stub.InitializeCache(pb.CacheConfig(protocol_version=V, num_blocks=16, block_size=4), timeout=60)
    a = stub.Execute(_step(1, new_requests=[_new("good")], total_num_scheduled_tokens=3), timeout=60)
    b = stub.Execute(_step(2, cached_requests=[pb.CachedRequest(req_id="good", num_computed_tokens=3,
                                                                num_scheduled_tokens=1)]), timeout=60)
    assert list(a.results[0].sampled_token_ids) == list(r1.results[0].sampled_token_ids)
    assert list(b.results[0].sampled_token_ids) == list(by_id["good"].sampled_token_ids)


def _engine_error(model, additional: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(model)!r}, dtype="float32", distributed_executor_backend="ms_rpc",
                additional_config=json.loads({additional!r}), max_model_len=128)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env)


def test_unreachable_worker_is_one_clear_error(default_model):
    out = _engine_error(default_model, '{"ms_rpc": {"workers": ["127.0.0.1:9"], "connect_timeout_s": 3}}')
    assert out.returncode != 0
    assert "ms_rpc worker 127.0.0.1:9: connect failed (UNAVAILABLE)" in out.stderr, out.stderr[-3000:]


def test_worker_with_another_model_is_refused(default_model, worker):
    out = _engine_error(default_model, f'{{"ms_rpc": {{"workers": ["{worker[1]}"]}}}}')
    assert out.returncode != 0
    assert f"ms_rpc worker {worker[1]} serves a different model" in out.stderr, out.stderr[-3000:]
    assert "vocab_size: front 49152 vs worker 131" in out.stderr


def test_unsupported_flags_are_refused_at_start_up(default_model):
    """Each engine flag ms_rpc cannot serve stops vLLM's own config building (what `vllm serve` runs first) with one
    line naming the flag and ms_rpc, before any worker starts."""
    flags = {"--kv-cache-dtype": dict(kv_cache_dtype="fp8"),
             "--enable-prompt-embeds": dict(enable_prompt_embeds=True),
             "--kv-transfer-config": dict(kv_transfer_config={"kv_connector": "ExampleConnector",
                                                              "kv_role": "kv_both"}),
             "--ec-transfer-config": dict(ec_transfer_config={"ec_connector": "ECExampleConnector",
                                                              "ec_role": "ec_both"}),
             "--logits-processors": dict(logits_processors=["vllm.v1.sample.logits_processor.MinPLogitsProcessor"])}
    code = textwrap.dedent(f"""
        import json, sys
        from vllm.config import ECTransferConfig, KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs
        for flag, kw in json.loads(sys.argv[1]).items():
            if "kv_transfer_config" in kw:
                kw["kv_transfer_config"] = KVTransferConfig(**kw["kv_transfer_config"])
            if "ec_transfer_config" in kw:
                kw["ec_transfer_config"] = ECTransferConfig(**kw["ec_transfer_config"])
            try:
                EngineArgs(model={str(default_model)!r}, dtype="float32", distributed_executor_backend="ms_rpc",
                           max_model_len=128, **kw).create_engine_config()
                print(flag, "ACCEPTED")
            except Exception as e:
                print(flag, "->", " | ".join(str(e).splitlines()) or repr(e))
    """)
    import json

    out = subprocess.run([sys.executable, "-c", code, json.dumps(flags)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    lines = {line.split(" ", 1)[0]: line for line in out.stdout.splitlines() if line.startswith("--")}
    assert set(lines) == set(flags), out.stdout + out.stderr[-3000:]
    for flag, line in lines.items():
        assert f"{flag} " in line.split("->", 1)[-1] and "by --distributed-executor-backend ms_rpc" in line, line


def test_installed_logits_processor_plugins_are_refused_at_start_up(default_model, tmp_path):
    """A package that registers a logits processor for vLLM (entry point group vllm.logits_processors, loaded by
    vLLM's model runner without any flag) stops an ms_rpc start-up with one line naming it."""
    dist = tmp_path / "my_logitsprocs-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-logitsprocs\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vllm.logits_processors]\n"
                                           "my_proc = vllm.v1.sample.logits_processor:MinPLogitsProcessor\n")
    code = textwrap.dedent(f"""
        from vllm.engine.arg_utils import EngineArgs
        EngineArgs(model={str(default_model)!r}, dtype="float32", distributed_executor_backend="ms_rpc",
                   max_model_len=128).create_engine_config()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ['PYTHONPATH']}"})
    assert out.returncode != 0
    assert "logits processor plugins (entry point group vllm.logits_processors: my_proc = " in out.stderr, \
        out.stderr[-3000:]
    assert "not supported by --distributed-executor-backend ms_rpc" in out.stderr


def test_worker_of_another_protocol_version_is_refused(default_model, tiny_model, tmp_path):
    """A worker whose Describe reports another protocol version (here a real worker patched to report v+1) is one
    clear start-up error naming the worker and both versions: the front checks too, not only the worker."""
    entry = tmp_path / "newer_worker.py"
    entry.write_text(textwrap.dedent("""
        import ms_worker.service as service
        describe = service.WorkerService.Describe
        def Describe(self, request, context):
            info = describe(self, request, context)
            info.protocol_version += 1
            return info
        service.WorkerService.Describe = Describe
        from ms_worker.cli import main
        raise SystemExit(main())
    """))
    proc, address = start_worker(tiny_model, ["--no-jit"], log_path=tmp_path / "worker.log", entry=[str(entry)])
    try:
        out = _engine_error(default_model, f'{{"ms_rpc": {{"workers": ["{address}"]}}}}')
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode != 0
    assert f"ms_rpc worker {address} speaks protocol version {V + 1}, this front speaks {V}" in out.stderr, \
        out.stderr[-3000:]
