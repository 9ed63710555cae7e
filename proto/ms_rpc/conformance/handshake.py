"""Checks of the handshake: health before and after the cache, Describe, protocol version refusal, the order
Describe -> DetermineAvailableMemory -> InitializeCache -> Warmup, liveness and heartbeat."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import grpc

from ms_rpc.v1 import PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb

from .report import expect
from .session import Session
from .wire import MODEL_SERVICE_NAME

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# config.json keys of the HF checkpoint -> ModelInfo fields
CONFIG_FIELDS = {"vocab_size": "vocab_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "num_key_value_heads": "num_kv_heads", "hidden_size": "hidden_size",
                 "max_position_embeddings": "max_position_embeddings"}


def health_serving_after_load(s: Session) -> None:
    status = s.wire.health("")
    expect(status == "SERVING", f"health service \"\" is {status} on a loaded worker, expected SERVING")


def health_unknown_service(s: Session) -> None:
    status = s.wire.health("no.such.v1.Service")
    expect(status == "NOT_FOUND", f"health of an unknown service is {status}, expected NOT_FOUND")


def health_model_not_serving_before_cache(s: Session) -> None:
    status = s.wire.health(MODEL_SERVICE_NAME)
    expect(status == "NOT_SERVING", f"health of {MODEL_SERVICE_NAME} is {status} before InitializeCache, expected "
                                    "NOT_SERVING (a worker that already has a cache: start a fresh one for the kit)")


def describe(s: Session) -> None:
    info = s.wire.call("Describe", pb.DescribeRequest(protocol_version=PROTOCOL_VERSION))
    s.info = info
    expect(info.protocol_version == PROTOCOL_VERSION,
           f"WorkerInfo.protocol_version {info.protocol_version}, the kit speaks {PROTOCOL_VERSION}")
    expect(bool(info.worker_id), "WorkerInfo.worker_id is empty")
    m = info.model
    expect(m.vocab_size > 0 and m.num_layers > 0 and m.num_heads > 0 and m.num_kv_heads > 0 and m.head_dim > 0,
           f"ModelInfo has empty sizes: {' '.join(str(m).split())}")
    expect(info.dtype in DTYPE_BYTES, f"WorkerInfo.dtype {info.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    expect(info.world_size >= 1 and info.rank < info.world_size, f"rank {info.rank} of world size {info.world_size}")
    again = s.wire.call("Describe", pb.DescribeRequest(protocol_version=PROTOCOL_VERSION))
    expect(again.worker_id == info.worker_id, "worker_id changed between two Describe calls")


def describe_matches_checkpoint(s: Session) -> None:
    expect(s.info is not None, "no WorkerInfo (Describe failed)")
    cfg = json.loads((Path(s.model_dir) / "config.json").read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    wrong = [f"{field} {getattr(s.info.model, field)} (config.json {key} {cfg[key]})"
             for key, field in CONFIG_FIELDS.items() if key in cfg and getattr(s.info.model, field) != cfg[key]]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if s.info.model.head_dim != head_dim:
        wrong.append(f"head_dim {s.info.model.head_dim} (config.json {head_dim})")
    archs = cfg.get("architectures") or []
    if archs and s.info.model.architecture not in archs:
        wrong.append(f"architecture {s.info.model.architecture!r} (config.json {archs})")
    expect(not wrong, "ModelInfo differs from the checkpoint: " + "; ".join(wrong))


def protocol_version_refused(s: Session) -> None:
    for v in (0, PROTOCOL_VERSION + 1):
        for call, msg in [("Describe", pb.DescribeRequest(protocol_version=v)),
                          ("InitializeCache", pb.CacheConfig(protocol_version=v, num_blocks=1, block_size=16)),
                          ("Heartbeat", pb.HeartbeatRequest(protocol_version=v))]:
            s.expect_refused(call, msg, FAILED_PRECONDITION, f"{call} with protocol version {v}")


def order_before_cache(s: Session) -> None:
    """Warmup, Execute, Sample and CheckLiveness need the cache: FAILED_PRECONDITION before InitializeCache."""
    for call, msg in [("Warmup", pb.WarmupRequest(protocol_version=PROTOCOL_VERSION)),
                      ("Execute", pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=1)),
                      ("Sample", pb.SampleRequest(protocol_version=PROTOCOL_VERSION, step_id=1)),
                      ("CheckLiveness", pb.LivenessRequest(protocol_version=PROTOCOL_VERSION))]:
        s.expect_refused(call, msg, FAILED_PRECONDITION, f"{call} before InitializeCache")


def available_memory(s: Session) -> None:
    L = s.limits
    s.expect_refused("DetermineAvailableMemory", pb.MemoryRequest(protocol_version=PROTOCOL_VERSION, block_size=0,
                                                                  requested_bytes=2**20),
                     INVALID_ARGUMENT, "block_size 0")
    probe = s.wire.call("DetermineAvailableMemory", pb.MemoryRequest(
        protocol_version=PROTOCOL_VERSION, block_size=L.block_size, requested_bytes=2**28,
        max_num_batched_tokens=L.max_num_batched_tokens, max_num_seqs=L.max_num_seqs))
    m = s.info.model
    kv_heads = math.ceil(m.num_kv_heads / s.info.world_size)
    want = 2 * m.num_layers * kv_heads * m.head_dim * L.block_size * DTYPE_BYTES[s.info.dtype]
    expect(probe.bytes_per_block == want, f"bytes_per_block {probe.bytes_per_block}, K and V of {m.num_layers} "
                                          f"layers x {kv_heads} KV heads x {m.head_dim} x {L.block_size} tokens in "
                                          f"{s.info.dtype} are {want}")
    s.bytes_per_block = probe.bytes_per_block
    asked = L.num_blocks * probe.bytes_per_block
    r = s.wire.call("DetermineAvailableMemory", pb.MemoryRequest(
        protocol_version=PROTOCOL_VERSION, block_size=L.block_size, requested_bytes=asked,
        max_num_batched_tokens=L.max_num_batched_tokens, max_num_seqs=L.max_num_seqs))
    expect(r.available_kv_bytes == asked, f"requested_bytes {asked} gave available_kv_bytes {r.available_kv_bytes} "
                                          f"(vLLM's --kv-cache-memory-bytes is exact)")
    expect(r.sized_by == "kv_cache_memory_bytes", f"sized_by {r.sized_by!r} for a request in bytes")


def _cache_config(s: Session, **over) -> pb.CacheConfig:
    s.limits = dataclasses.replace(s.limits, max_model_len=min(s.limits.max_model_len,
                                                               s.info.model.max_position_embeddings))
    L = s.limits
    fields = dict(protocol_version=PROTOCOL_VERSION, num_blocks=L.num_blocks, block_size=L.block_size,
                  num_layers=s.info.model.num_layers, max_num_seqs=L.max_num_seqs,
                  max_num_batched_tokens=L.max_num_batched_tokens, max_model_len=L.max_model_len, sampling_seed=1234)
    return pb.CacheConfig(**{**fields, **over})


def initialize_cache(s: Session) -> None:
    s.expect_refused("InitializeCache", _cache_config(s, num_layers=s.info.model.num_layers + 1), INVALID_ARGUMENT,
                     "a cache for another layer count")
    s.expect_refused("InitializeCache", _cache_config(s, num_blocks=0), INVALID_ARGUMENT, "a cache of 0 blocks")
    r = s.wire.call("InitializeCache", _cache_config(s))
    s.cache_ready = True
    expect(r.next_step_id == 1, f"CacheInfo.next_step_id {r.next_step_id}, expected 1")
    if s.bytes_per_block:
        want = s.limits.num_blocks * s.bytes_per_block
        expect(r.allocated_bytes == want, f"allocated_bytes {r.allocated_bytes}, {s.limits.num_blocks} blocks of "
                                          f"{s.bytes_per_block} bytes are {want}")
    status = s.wire.health(MODEL_SERVICE_NAME)
    expect(status == "SERVING", f"health of {MODEL_SERVICE_NAME} is {status} after InitializeCache, expected SERVING")


def warmup(s: Session) -> None:
    expect(s.cache_ready, "no cache (InitializeCache failed)")
    r = s.wire.call("Warmup", pb.WarmupRequest(protocol_version=PROTOCOL_VERSION), timeout=max(s.wire.timeout, 1800))
    expect(r.seconds >= 0, f"WarmupReply.seconds {r.seconds}")


def liveness(s: Session) -> None:
    expect(s.cache_ready, "no cache (InitializeCache failed)")
    r = s.wire.call("CheckLiveness", pb.LivenessRequest(protocol_version=PROTOCOL_VERSION))
    expect(r.worker_id == s.info.worker_id, f"LivenessReply.worker_id {r.worker_id!r}, Describe said "
                                            f"{s.info.worker_id!r}")
    expect(r.forward_s > 0, f"LivenessReply.forward_s {r.forward_s}: no forward ran")
    expect((r.next_step_id, r.requests_active) == (s.next_step, len(s.live)),
           f"liveness says next step {r.next_step_id} with {r.requests_active} requests; the kit sent "
           f"{s.next_step - 1} steps and holds {len(s.live)}")


def liveness_changes_nothing(s: Session) -> None:
    """A request decoding around liveness probes gives the tokens it gives alone; the probe counts it."""
    p = s.prompt(24, seed=11)
    want = s.reference(p, 4)
    r = s.new_req(p)
    while len(r.out) < 4:
        s.advance([r])
        live = s.worker_state()
        expect(live == (s.next_step, 1), f"liveness says (next step, active requests) {live}, expected "
                                         f"{(s.next_step, 1)}")
    s.finish(r)
    expect(r.out == want, f"tokens {r.out} with liveness probes in between, {want} without")


def heartbeat(s: Session) -> None:
    r = s.wire.call("Heartbeat", pb.HeartbeatRequest(protocol_version=PROTOCOL_VERSION))
    expect(r.worker_id == s.info.worker_id, f"HeartbeatReply.worker_id {r.worker_id!r}, Describe said "
                                            f"{s.info.worker_id!r}")
    expect(r.step_id == 0 and r.step_s == 0, f"an idle worker's heartbeat says step {r.step_id} running for "
                                             f"{r.step_s} s")


BEFORE_CACHE = [
    ("health.serving_after_load", health_serving_after_load),
    ("health.unknown_service_not_found", health_unknown_service),
    ("health.model_service_not_serving_before_cache", health_model_not_serving_before_cache),
    ("handshake.describe", describe),
    ("handshake.protocol_version_refused", protocol_version_refused),
    ("handshake.calls_before_cache_refused", order_before_cache),
    ("handshake.available_memory", available_memory),
    ("handshake.initialize_cache", initialize_cache),
    ("handshake.warmup", warmup),
    ("liveness.after_cache", liveness),
    ("heartbeat.idle", heartbeat),
]
MODEL_DIR = [("handshake.describe_matches_checkpoint", describe_matches_checkpoint)]
AFTER_CACHE = [("liveness.changes_nothing", liveness_changes_nothing)]
