"""`python -m ms_rpc.reference serve --model DIR [--port P] [--simulate-step-ms MS]`: the gRPC server.

Health (grpc.health.v1): "" SERVING once the model is loaded, "ms_rpc.v1.ModelWorker" SERVING once the KV cache
exists; both NOT_SERVING while draining. Every ModelWorker call's request arrives as bytes and is parsed here, so
that bytes that are not the method's message get INVALID_ARGUMENT; messages over --max-message-mb get gRPC's
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ms_rpc.v1 import MAX_MESSAGE_MB
from ms_rpc.v1 import worker_pb2 as pb

from .config import UnsupportedModel, load_config
from .service import Service

log = logging.getLogger("ms_rpc.reference")
SERVICE = pb.DESCRIPTOR.services_by_name["ModelWorker"]


def _handler(service: Service, method) -> grpc.RpcMethodHandler:
    parse = getattr(pb, method.input_type.name).FromString
    call = getattr(service, method.name)

    def handle(raw: bytes, context):
        try:
            request = parse(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError or whatever else the parser raises
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"worker {service.worker_id}: malformed {method.name} request: {len(raw)} bytes that do "
                          f"not parse as {method.input_type.full_name} ({type(e).__name__})")
        return call(request, context)

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None,
                                               response_serializer=lambda m: m.SerializeToString())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ms_rpc.reference",
                                description="A numpy reference worker for the ms_rpc.v1 contract.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve it over gRPC")
    s.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    s.add_argument("--ready-file", help="write the bound port to this file once serving")
    s.add_argument("--max-message-mb", type=int, default=MAX_MESSAGE_MB,
                   help=f"largest gRPC message received or sent, in MiB (default {MAX_MESSAGE_MB})")
    s.add_argument("--kv-cache-memory-bytes", type=int, default=2**30,
                   help="KV cache bytes when the front asks for neither a size nor a fraction (default 1 GiB)")
    s.add_argument("--simulate-step-ms", type=float, default=None, metavar="MS",
                   help="load no weights: answer every step after MS milliseconds with deterministic tokens")
    s.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def serve(args) -> int:
    try:
        cfg = load_config(args.model)
        if args.simulate_step_ms is not None:
            from .simulate import Simulator

            if args.simulate_step_ms < 0:
                raise ValueError(f"--simulate-step-ms {args.simulate_step_ms} is negative")
            backend, kind = Simulator(cfg), f"simulated, {args.simulate_step_ms:g} ms a step"
        else:
            from .model import Decoder

            backend, kind = Decoder(cfg, args.model), "float32"
    except (UnsupportedModel, FileNotFoundError, KeyError, ValueError) as e:
        log.error("cannot serve %s: %s", args.model, e)
        return 2
    if not 1 <= args.max_message_mb <= 2047:
        log.error("--max-message-mb %d is not in 1..2047", args.max_message_mb)
        return 2

    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    service = Service(cfg, backend, os.path.abspath(args.model), f"numpy {np.__version__} ({kind})",
                      args.kv_cache_memory_bytes,
                      on_cache_ready=lambda: health_servicer.set(SERVICE.full_name,
                                                                 health_pb2.HealthCheckResponse.SERVING),
                      min_step_s=(args.simulate_step_ms or 0.0) / 1000.0)
    mb = args.max_message_mb * 2**20
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE.full_name, {m.name: _handler(service, m) for m in SERVICE.methods if hasattr(service, m.name)})])
    try:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError:
        port = 0
    if not port:
        log.error("cannot bind %s:%d", args.host, args.port)
        return 2
    server.start()
    log.info("serving ms_rpc.v1 on %s:%d: %s (%s), worker %s", args.host, port, args.model, kind, service.worker_id)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(args.ready_file + ".tmp", args.ready_file)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5) and not service.stopping.is_set():
        pass
    log.info("draining: health NOT_SERVING, new steps refused")
    service.stopping.set()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return serve(args)
