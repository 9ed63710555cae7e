"""The kit's connection to one worker: ModelWorker calls with hand-built messages, raw byte payloads, and the
standard grpc.health.v1 service encoded by hand (its two one-field messages), so that only grpcio and protobuf are
needed."""

from __future__ import annotations

import grpc

from ms_rpc.v1 import worker_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ModelWorker"]
MODEL_SERVICE_NAME = SERVICE.full_name           # "ms_rpc.v1.ModelWorker", as health names it
HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


class Refused(Exception):
    """A call answered with a non-OK status."""

    def __init__(self, call: str, code: grpc.StatusCode, details: str):
        self.call, self.code, self.details = call, code, details
        super().__init__(f"{call} failed ({code.name}): {details}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def unknown_field(size: int, number: int = 1000) -> bytes:
    """A length-delimited field of `size` bytes under a field number no ms_rpc message uses: parsers skip it."""
    return _varint(number << 3 | 2) + _varint(size) + b"\0" * size


def _health_status(raw: bytes) -> str:
    """grpc.health.v1.HealthCheckResponse {ServingStatus status = 1} -> the status name."""
    if not raw:
        return HEALTH_STATUS[0]
    if raw[0] != 0x08:
        raise ValueError(f"not a HealthCheckResponse: {raw[:8]!r}")
    return HEALTH_STATUS.get(raw[1], str(raw[1]))


class Wire:
    def __init__(self, address: str, max_message_mb: int, timeout: float):
        self.address = address
        self.timeout = timeout
        # The kit's own side has no size limit, so that the worker's limit is the one tested.
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                               ("grpc.max_receive_message_length", -1)])
        self.max_message_bytes = max_message_mb * 2**20

    def close(self) -> None:
        self.channel.close()

    def _method(self, name: str, out_type=None):
        path = f"/{SERVICE.full_name}/{name}"
        if out_type is None:
            out_type = getattr(pb, SERVICE.methods_by_name[name].output_type.name)
        return self.channel.unary_unary(path, request_serializer=None, response_deserializer=out_type.FromString)

    def call(self, name: str, request, timeout: float | None = None):
        """A ModelWorker call with a message (or raw bytes); its reply, or Refused."""
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        try:
            return self._method(name)(raw, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise Refused(name, e.code(), e.details() or "") from None

    def start(self, name: str, request, timeout: float | None = None):
        """A ModelWorker call sent without waiting; ``finish(name, call)`` gives its reply, or raises Refused."""
        return self._method(name).future(request.SerializeToString(), timeout=timeout or self.timeout)

    @staticmethod
    def finish(name: str, call):
        try:
            return call.result()
        except grpc.RpcError as e:
            raise Refused(name, e.code(), e.details() or "") from None

    def health(self, service: str = "", timeout: float = 10.0) -> str:
        """grpc.health.v1.Health/Check for `service`: the status name, or the gRPC code's name when refused."""
        request = b"\x0a" + _varint(len(service.encode())) + service.encode() if service else b""
        method = self.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                          response_deserializer=None)
        try:
            return _health_status(method(request, timeout=timeout))
        except grpc.RpcError as e:
            return e.code().name
