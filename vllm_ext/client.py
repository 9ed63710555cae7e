"""A gRPC client for one worker: deadlines on every call, errors that name the worker and the call.

Security (all optional; the embedded default is plaintext on loopback): TLS with a CA bundle that verifies the
worker, mutual TLS with a client certificate and key, and a shared bearer token sent as
`authorization: Bearer <token>` metadata on every call. Only protobuf messages cross the wire.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ms_rpc.security import read_file, read_token
from ms_rpc.v1 import MAX_MESSAGE_MB, PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc


class WorkerError(RuntimeError):
    def __init__(self, address: str, call: str, code: grpc.StatusCode | None, details: str):
        self.address, self.call, self.code, self.details = address, call, code, details
        name = code.name if code is not None else "ERROR"
        super().__init__(f"ms_rpc worker {address}: {call} failed ({name}): {details}")

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class ChannelSecurity:
    """How the front authenticates the worker and itself. Plaintext and no token by default."""

    tls: bool = False
    ca: bytes | None = field(default=None, repr=False)            # PEM roots; None = the system's
    cert: bytes | None = field(default=None, repr=False)          # client certificate chain (mutual TLS)
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None                                 # expected name in the worker's certificate
    token: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
             tls_key: str | None = None, tls_server_name: str | None = None, token: str | None = None,
             token_file: str | None = None) -> "ChannelSecurity":
        """From file paths (the ms_rpc settings); raises ValueError naming what is missing or unreadable."""
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("ms_rpc: a client certificate needs both tls_cert and tls_key")
        try:
            return cls(tls=bool(tls or tls_ca or tls_cert or tls_server_name),
                       ca=read_file(tls_ca, "TLS CA bundle") if tls_ca else None,
                       cert=read_file(tls_cert, "TLS client certificate") if tls_cert else None,
                       key=read_file(tls_key, "TLS client key") if tls_key else None,
                       server_name=tls_server_name or None, token=read_token(token, token_file))
        except ValueError as e:
            raise ValueError(f"ms_rpc: {e}") from None

    def describe(self) -> str:
        mode = ("mutual TLS" if self.cert else "TLS") if self.tls else "plaintext"
        return mode + (" + bearer token" if self.token else "")


class WorkerClient:
    def __init__(self, address: str, max_message_mb: int = MAX_MESSAGE_MB, security: ChannelSecurity | None = None):
        self.address = address
        self.security = security = security or ChannelSecurity()
        mb = max_message_mb * 2**20
        options = [("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb),
                   # retry a refused connection within a second or two (the worker may still be starting)
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
        if security.tls:
            if security.server_name:
                options.append(("grpc.ssl_target_name_override", security.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=security.ca, private_key=security.key,
                                                 certificate_chain=security.cert)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.metadata = (("authorization", f"Bearer {security.token}"),) if security.token else None
        self.closed = False
        self.stub = pb_grpc.ModelWorkerStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.watched: str | None = None     # the worker's health as its Health.Watch stream last said (watch_health)

    def call(self, name: str, request, timeout: float):
        return self._rpc(name, getattr(self.stub, name), request, timeout)

    def _rpc(self, name: str, method, request, timeout: float):
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise WorkerError(self.address, name, e.code(), e.details() or str(e)) from None
        except ValueError:
            if not self.closed:
                raise
            raise WorkerError(self.address, name, grpc.StatusCode.CANCELLED, "the front closed the channel") from None

    def start(self, name: str, request, timeout: float) -> grpc.Future:
        """The call sent without waiting for its reply; ``result(name, call)`` waits for it."""
        try:
            return getattr(self.stub, name).future(request, timeout=timeout, metadata=self.metadata)
        except ValueError:
            if not self.closed:
                raise
            raise WorkerError(self.address, name, grpc.StatusCode.CANCELLED, "the front closed the channel") from None

    def result(self, name: str, call: grpc.Future):
        try:
            return call.result()
        except grpc.RpcError as e:
            raise WorkerError(self.address, name, e.code(), e.details() or str(e)) from None
        except grpc.FutureCancelledError:
            raise WorkerError(self.address, name, grpc.StatusCode.CANCELLED, "the call was cancelled") from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The worker's grpc.health.v1 status for `service` ("SERVING", "NOT_SERVING", ...)."""
        r = self._rpc("Health.Check", self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def watch_health(self) -> None:
        """Keeps a Health.Watch stream of the worker's health ("" service) open on this channel: `watched` follows
        it (None when the stream ended or the worker has no Watch; then ask `health`). While a call is open on a
        channel, grpc keeps the one thread that completes the channel's calls; without one, that thread ends with
        each call and the next call starts a new one: on a busy host, that start was most of the time to send a
        step."""
        stream = self.health_stub.Watch(health_pb2.HealthCheckRequest(service=""), metadata=self.metadata)

        def follow():
            try:
                for reply in stream:
                    self.watched = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError:
                pass                            # closed by us, the worker gone, or no Watch: ask `health`
            self.watched = None

        threading.Thread(target=follow, name=f"ms_rpc_health_{self.address}", daemon=True).start()

    def wait_ready(self, timeout: float) -> None:
        """Wait until the worker answers and its health says SERVING (model loaded), or raise a WorkerError that
        names the worker and the last thing it said (refused connection, TLS handshake failure, still loading)."""
        end = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                status = self.health(timeout=max(0.2, min(left, 5.0)))
            except WorkerError as e:
                if e.code == grpc.StatusCode.UNIMPLEMENTED:
                    return                      # a worker without the health service: Describe decides
                last = e.details
            else:
                if status == "SERVING":
                    return
                last = f"health {status} (still loading the model, or draining)"
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))
        hint = ""
        if not self.security.tls:
            hint = "; if the worker serves TLS, set the front's ms_rpc tls_ca (and tls_cert/tls_key for mutual TLS)"
        raise WorkerError(self.address, "connect", grpc.StatusCode.UNAVAILABLE,
                          f"not ready within {timeout:.0f} s (is the worker running and the address right?): "
                          f"{last}{hint}")

    def check_liveness(self, timeout: float = 30.0) -> pb.LivenessReply:
        """Deep liveness: the worker runs a real one-token forward."""
        return self.call("CheckLiveness", pb.LivenessRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def heartbeat(self, timeout: float) -> pb.HeartbeatReply:
        """The step in flight and whether the worker is compiling; answered without waiting for the model."""
        return self.call("Heartbeat", pb.HeartbeatRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def describe(self, timeout: float = 10.0) -> pb.WorkerInfo:
        return self.call("Describe", pb.DescribeRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def determine_available_memory(self, block_size: int, requested: int, utilization: float = 0.0,
                                   max_num_batched_tokens: int = 0, max_num_seqs: int = 0,
                                   timeout: float = 600.0) -> pb.MemoryInfo:
        """The worker's KV cache budget: `requested` bytes, else `utilization` of its device's memory less what it
        needs besides the cache (it may run a profiling forward of max_num_batched_tokens tokens: compile time)."""
        req = pb.MemoryRequest(protocol_version=PROTOCOL_VERSION, block_size=block_size, requested_bytes=requested,
                               gpu_memory_utilization=utilization, max_num_batched_tokens=max_num_batched_tokens,
                               max_num_seqs=max_num_seqs)
        return self.call("DetermineAvailableMemory", req, timeout)

    def initialize_cache(self, cfg: pb.CacheConfig, timeout: float = 300.0) -> pb.CacheInfo:
        cfg.protocol_version = PROTOCOL_VERSION
        return self.call("InitializeCache", cfg, timeout)

    def warmup(self, timeout: float = 1800.0) -> pb.WarmupReply:
        return self.call("Warmup", pb.WarmupRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def run_dummy_batch(self, timeout: float) -> pb.DummyBatchReply:
        """This engine's part of a step it has nothing for (experts over data-parallel engines)."""
        return self.call("RunDummyBatch", pb.DummyBatchRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.call("Shutdown", pb.ShutdownRequest(protocol_version=PROTOCOL_VERSION), timeout)

    def close(self) -> None:
        """Closes the channel: calls in flight end CANCELLED, later ones too."""
        self.closed = True
        self.channel.close()
