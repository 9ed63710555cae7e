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


def test_the_vllm_internals_ms_rpc_relies_on(default_model):
    """Where vLLM has no public hook, plugin.py uses its internals (listed in plugin.py's docstring). Each is
    exercised here on the installed vLLM's own objects, so that a vLLM that renames or changes one fails this test
    by name instead of failing requests silently: the plugin's Scheduler.__init__ hook hands a real scheduler to the
    executor; a request put in grammar_compile_error_reqs ends with FINISHED_ERROR when update_from_output applies
    the step; the prefix-cache reset runs before the next schedule (a prompt cached a moment ago is computed
    afresh). Also every config attribute and SamplingParams field vllm_ext.support reads exists, and the platform's
    validate_request (wrapped) refuses each request field ms_rpc refuses."""
    code = """
import sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
import torch
from vllm_ext import plugin, support
from vllm_ext.executor import awaiting_scheduler

B = 16
cfg = EngineArgs(model=sys.argv[1], dtype="float32", distributed_executor_backend="ms_rpc", max_model_len=256,
                 block_size=B, enable_prefix_caching=True).create_engine_config()
for flag, (is_set, _) in support._FLAGS.items():       # each reads an attribute that exists (AttributeError)
    assert not is_set(cfg), flag
values = {"prompt_logprob_token_ids": [[1, 2]], "prompt_logprob_start": 0,
          "thinking_token_budget": 0}
for name in support._FIELDS:                            # each is a field vLLM still has, and is refused
    assert hasattr(SamplingParams(), name), name
    try:
        current_platform.validate_request({"type": "token", "prompt_token_ids": [1, 2]},
                                          SamplingParams(**{name: values[name]}))
        raise AssertionError(f"{name} was not refused")
    except VLLMValidationError as e:
        assert name in str(e) and "ms_rpc" in str(e), e

class Executor:                                         # stands for MsRpcExecutor: takes the handle
    handle = None
    def attach_scheduler(self, handle):
        Executor.handle = handle
awaiting_scheduler.append(Executor())
spec = FullAttentionSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32)
cfg.cache_config.num_gpu_blocks = 64                   # what the engine core sets before building its scheduler
kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
sched = Scheduler(cfg, kv, StructuredOutputManager(cfg), block_size=B, log_stats=True)
handle = Executor.handle
assert isinstance(handle, plugin.SchedulerHandle), "Scheduler.__init__ did not hand the scheduler over"
hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
init_none_hash(hash_fn)
hasher = get_request_block_hasher(B, hash_fn)
prompt = list(range(100, 100 + 3 * B + 5))

def step(rid, tokens, fail=False):
    # one request of `prompt` scheduled and its step applied: (tokens it got from the cache, its outputs)
    sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=1), None, block_hasher=hasher))
    so = sched.schedule()
    (new,) = so.scheduled_new_reqs
    if fail:
        handle.end_with_error({rid})
    out = sched.update_from_output(so, ModelRunnerOutput(req_ids=[rid], req_id_to_index={rid: 0},
                                                         sampled_token_ids=[tokens]))
    return new.num_computed_tokens, [o for outs in out.values() for o in outs.outputs]

assert step("a", [7])[0] == 0                           # computed; its full blocks cached
computed, outs = step("b", [], fail=True)               # served from the cache, then ended with an error
assert computed == 3 * B, computed
assert [(o.request_id, o.finish_reason) for o in outs] == [("b", FinishReason.ERROR)], outs
assert "b" not in sched.requests
handle.reset_prefix_cache_before_next_schedule()
assert step("c", [7])[0] == 0                           # the cache was reset before this schedule
assert step("d", [7])[0] == 3 * B                       # and fills again
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code, str(default_model)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
