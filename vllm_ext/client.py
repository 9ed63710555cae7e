"""A gRPC client for one worker: deadlines on every call, errors that name the worker and the call."""

from __future__ import annotations

import time

import grpc

from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT


class WorkerError(RuntimeError):
    def __init__(self, address: str, call: str, code: grpc.StatusCode | None, details: str):
        self.address, self.call, self.code, self.details = address, call, code, details
        name = code.name if code is not None else "ERROR"
        super().__init__(f"ms_rpc worker {address}: {call} failed ({name}): {details}")

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class WorkerClient:
    def __init__(self, address: str, max_message_mb: int = 64):
        self.address = address
        mb = max_message_mb * 2**20
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb)]
        )
        self.stub = pb_grpc.ModelWorkerStub(self.channel)

    def call(self, name: str, request, timeout: float):
        try:
            return getattr(self.stub, name)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise WorkerError(self.address, name, e.code(), e.details() or str(e)) from None

    def wait_ready(self, timeout: float) -> None:
        """Wait until the worker's port accepts connections, or raise a WorkerError naming it."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise WorkerError(self.address, "connect", grpc.StatusCode.UNAVAILABLE,
                              f"no answer within {timeout:.0f} s (is the worker running and the address right?)") from None

    def describe(self, timeout: float = 10.0) -> pb.WorkerInfo:
        return self.call("Describe", pb.DescribeRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def determine_available_memory(self, block_size: int, requested: int, timeout: float = 30.0) -> pb.MemoryInfo:
        req = pb.MemoryRequest(protocol_version=PROTOCOL_VERSION, block_size=block_size, requested_bytes=requested)
        return self.call("DetermineAvailableMemory", req, timeout)

    def initialize_cache(self, cfg: pb.CacheConfig, timeout: float = 300.0) -> pb.CacheInfo:
        cfg.protocol_version = PROTOCOL_VERSION
        return self.call("InitializeCache", cfg, timeout)

    def warmup(self, timeout: float = 1800.0) -> pb.WarmupReply:
        return self.call("Warmup", pb.WarmupRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def execute(self, step: pb.StepRequest, timeout: float) -> pb.StepResult:
        return self.call("Execute", step, timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.call("Shutdown", pb.ShutdownRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def close(self) -> None:
        self.channel.close()


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
