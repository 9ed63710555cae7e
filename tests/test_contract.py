"""The wire contract and the vLLM plugin hook, checked against the real grpcio-tools and the installed vLLM."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

from conftest import ROOT


def test_generated_code_is_up_to_date(tmp_path):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=proto", "--pyi_out=proto",
                    "--grpc_python_out=proto", "proto/ms_rpc/v1/worker.proto"], cwd=tmp_path, check=True)
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "proto/ms_rpc/v1" / name, ROOT / "proto/ms_rpc/v1" / name, shallow=False), (
            f"{name} is stale: run scripts/gen_proto.sh")


def test_plugin_maps_ms_rpc_and_import_path_still_works(default_model):
    code = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import sys
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.executor.abstract import Executor
from vllm_ext.executor import MsRpcExecutor
cfg = lambda b: EngineArgs(model=sys.argv[1], dtype="float32", distributed_executor_backend=b,
                           max_model_len=128).create_engine_config()
assert Executor.get_class(cfg("ms_rpc")) is MsRpcExecutor
assert Executor.get_class(cfg("vllm_ext.executor.MsRpcExecutor")) is MsRpcExecutor
from vllm.v1.executor.multiproc_executor import MultiprocExecutor
assert Executor.get_class(cfg("mp")) is MultiprocExecutor
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code, str(default_model)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_vllm_cli_starts():
    out = subprocess.run([str(ROOT / ".venv/bin/vllm"), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0.32.0" in out.stdout
