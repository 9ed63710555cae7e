"""KV cache size from vLLM's own flags (ms_worker.memory): --kv-cache-memory-bytes exactly; else
--gpu-memory-utilization of the device's memory less weights, runtime and activation peak; a cache that cannot fit is
one clear error at start-up naming the numbers and the flag. The rule alone (no worker), a real worker over gRPC,
and a real vLLM engine in front of it."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest

from conftest import ROOT, start_worker
from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc
from ms_worker import memory

V = pb.PROTOCOL_VERSION_CURRENT
GiB, MiB = 2**30, 2**20
BLOCK = 16


# -- the rule -----------------------------------------------------------------------------------------------------
def test_rule_bytes_fraction_and_refusals():
    kw = dict(total=16 * GiB, free=12 * GiB, weight_bytes=GiB, runtime=GiB // 2, activation_peak=GiB // 4)
    assert memory.size_kv_cache(requested_bytes=3 * GiB, **kw).available_kv_bytes == 3 * GiB
    b = memory.size_kv_cache(utilization=0.5, **kw)
    assert b.budget_bytes == 8 * GiB and b.sized_by == "gpu_memory_utilization"
    assert b.available_kv_bytes == 8 * GiB - GiB - GiB // 2 - GiB // 4
    with pytest.raises(memory.KvSizeError, match=r"13.00 GiB .*more than the host memory free on this worker: "
                                                 r"12.00 GiB of 16.00 GiB\. Decrease --kv-cache-memory-bytes") as e:
        memory.size_kv_cache(requested_bytes=13 * GiB, **kw)
    assert e.value.exhausted
    with pytest.raises(memory.KvSizeError, match=r"--gpu-memory-utilization 0.1 of 16.00 GiB host memory = 1.60 "
                                                 r"GiB.*too little\. Increase --gpu-memory-utilization") as e:
        memory.size_kv_cache(utilization=0.1, **kw)
    assert not e.value.exhausted
    with pytest.raises(memory.KvSizeError, match=r"more than the 12.00 GiB free.*Decrease --gpu-memory-utilization "
                                                 r"\(below 0\.84\)") as e:
        memory.size_kv_cache(utilization=0.95, **kw)
    assert e.value.exhausted


def test_activation_estimate_grows_with_the_step():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_heads=9, hidden_size=576, intermediate_size=1536, vocab_size=49152,
                          num_experts_per_tok=0, moe_intermediate_size=0, shared_expert_intermediate_size=0)
    small, big = (memory.estimate_activation_bytes(cfg, t, 8) for t in (256, 2048))
    assert 0 < small < big
    assert memory.estimate_activation_bytes(cfg, 2048, 8, tp_size=3) < big
    # a mixture of experts whose top_k expert rows outweigh the dense MLP's rows needs more
    moe = SimpleNamespace(**{**vars(cfg), "num_experts_per_tok": 8, "moe_intermediate_size": 768})
    assert memory.estimate_activation_bytes(moe, 2048, 8) > big


def test_peak_rss_increase_sees_a_transient_allocation():
    def spike():
        a = np.ones(64 * MiB // 8)        # touched: resident; freed on return
        return float(a[-1])

    assert memory.peak_rss_increase(spike) >= 60 * MiB


# -- a real worker over gRPC --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("kv") / "worker.log"
    proc, address = start_worker(default_model, ["--no-jit"], log)
    yield proc, address, log
    proc.kill()
    proc.wait()


def _memory(address, **fields) -> pb.MemoryInfo:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ModelWorkerStub(ch).DetermineAvailableMemory(
            pb.MemoryRequest(protocol_version=V, block_size=BLOCK, **fields), timeout=300)


def _refused(address, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        _memory(address, **fields)
    return e.value


def test_requested_bytes_are_the_cache(worker):
    _, address, _ = worker
    asked = 40 * MiB + 12345
    m = _memory(address, requested_bytes=asked)
    assert m.available_kv_bytes == asked and m.sized_by == "kv_cache_memory_bytes" and m.budget_bytes == 0
    num_blocks = m.available_kv_bytes // m.bytes_per_block
    with grpc.insecure_channel(address) as ch:
        info = pb_grpc.ModelWorkerStub(ch).InitializeCache(
            pb.CacheConfig(protocol_version=V, num_blocks=num_blocks, block_size=BLOCK), timeout=300)
    assert info.allocated_bytes == num_blocks * m.bytes_per_block
    assert asked - m.bytes_per_block < info.allocated_bytes <= asked


def test_fraction_is_total_less_weights_runtime_and_activation_peak(worker):
    _, address, _ = worker
    probe = _memory(address, requested_bytes=MiB)   # the device's total, the weights and the runtime, no profile
    assert probe.total_bytes > 0 and probe.weight_bytes > 0 and probe.runtime_bytes > 0
    # A fraction that leaves about 256 MiB for the cache after weights, runtime and up to 512 MiB of activations.
    util = float(np.float32((probe.weight_bytes + probe.runtime_bytes + 768 * MiB) / probe.total_bytes))
    m = _memory(address, gpu_memory_utilization=util, max_num_batched_tokens=256, max_num_seqs=8)
    assert m.sized_by == "gpu_memory_utilization" and m.activation_peak_bytes > 0
    assert m.budget_bytes == math.ceil(util * m.total_bytes)
    assert m.available_kv_bytes == m.budget_bytes - m.weight_bytes - m.runtime_bytes - m.activation_peak_bytes
    assert m.available_kv_bytes > 0
    # A bigger step needs more activations, so leaves less for the cache.
    big = _memory(address, gpu_memory_utilization=util, max_num_batched_tokens=2048, max_num_seqs=8)
    assert big.activation_peak_bytes > m.activation_peak_bytes
    assert big.available_kv_bytes == big.budget_bytes - big.weight_bytes - big.runtime_bytes - big.activation_peak_bytes


def test_impossible_sizes_are_one_clear_error(worker):
    _, address, _ = worker
    total = _memory(address, requested_bytes=MiB).total_bytes
    err = _refused(address, requested_bytes=total + GiB)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert f"KV cache of {(total + GiB) / GiB:.2f} GiB" in err.details() and f"of {total / GiB:.2f} GiB" in \
        err.details() and "Decrease --kv-cache-memory-bytes" in err.details(), err.details()
    err = _refused(address, gpu_memory_utilization=0.001)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "--gpu-memory-utilization 0.001 of" in err.details() and "weights" in err.details() and \
        "Increase --gpu-memory-utilization" in err.details(), err.details()
    err = _refused(address, gpu_memory_utilization=1.5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "(0, 1]" in err.details()


# -- a real vLLM engine -------------------------------------------------------------------------------------------
def _engine(model, address: str, **kwargs) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the engine core in this process: its config is ours
        from vllm import LLM
        if __name__ == "__main__":
            llm = LLM(model={str(model)!r}, dtype="float32", distributed_executor_backend="ms_rpc",
                      additional_config={{"ms_rpc": {{"workers": [{address!r}]}}}}, max_model_len=256,
                      max_num_seqs=4, block_size={BLOCK}, enforce_eager=True, **{kwargs!r})
            print("NUM_GPU_BLOCKS", llm.llm_engine.vllm_config.cache_config.num_gpu_blocks)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_vllm_engine_gets_exactly_the_requested_blocks_or_a_clear_error(default_model, worker):
    _, address, _ = worker
    per_block = _memory(address, requested_bytes=MiB).bytes_per_block
    asked = 48 * MiB
    out = _engine(default_model, address, kv_cache_memory_bytes=asked)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"NUM_GPU_BLOCKS {asked // per_block}\n" in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])
    assert "KV cache 0.05 GiB per worker (kv_cache_memory_bytes" in out.stdout + out.stderr, out.stdout[-4000:]

    out = _engine(default_model, address, kv_cache_memory_bytes=2**50)
    assert out.returncode != 0
    assert (f"ms_rpc: ms_rpc worker {address}: DetermineAvailableMemory failed (RESOURCE_EXHAUSTED): KV cache size: "
            f"KV cache of 1048576.00 GiB") in out.stdout + out.stderr and "Decrease --kv-cache-memory-bytes" in \
        out.stdout + out.stderr, (out.stdout + out.stderr)[-4000:]
