"""`ms-worker serve`: load a model and serve the ms_rpc.v1 ModelWorker service over gRPC."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

DEFAULT_MAX_MESSAGE_MB = 64


def _env(name: str, default=None):
    return os.environ.get(f"MS_WORKER_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ms-worker", description="MindSpore model worker for vLLM's ms_rpc executor.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve it over gRPC",
                       description="Load an HF-format model directory and serve the ms_rpc.v1 worker API. "
                                   "Every flag also reads an environment variable MS_WORKER_<FLAG>.")
    s.add_argument("--model", default=_env("MODEL"), help="HF model directory (config.json + safetensors) "
                   "[MS_WORKER_MODEL]")
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (default 127.0.0.1) [MS_WORKER_HOST]")
    s.add_argument("--port", type=int, default=int(_env("PORT", "50051")),
                   help="port; 0 picks a free one (see --ready-file) (default 50051) [MS_WORKER_PORT]")
    s.add_argument("--device", default=_env("DEVICE", "cpu"), help="cpu or ascend:N (default cpu) [MS_WORKER_DEVICE]")
    s.add_argument("--kv-cache-gb", type=float, default=float(_env("KV_CACHE_GB", "0")),
                   help="KV cache size offered when the front does not ask for one; 0 = 30%% of free memory, "
                        "at most 1 GiB [MS_WORKER_KV_CACHE_GB]")
    s.add_argument("--max-message-mb", type=int, default=int(_env("MAX_MESSAGE_MB", str(DEFAULT_MAX_MESSAGE_MB))),
                   help=f"largest gRPC message accepted (default {DEFAULT_MAX_MESSAGE_MB}) [MS_WORKER_MAX_MESSAGE_MB]")
    s.add_argument("--no-jit", action="store_true", default=_env("NO_JIT", "") == "1",
                   help="run eagerly (PyNative) instead of compiling the model with ms.jit [MS_WORKER_NO_JIT=1]")
    s.add_argument("--ready-file", default=_env("READY_FILE"),
                   help="write the bound port to this file once serving (used by the embedded launcher)")
    s.add_argument("--parent-pid", type=int, default=0,
                   help="exit when this process is gone (the embedded launcher passes its own pid)")
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="log level (default INFO)")
    return p


def serve(args) -> int:
    import grpc

    from ms_rpc.v1 import worker_pb2_grpc as pb_grpc

    log = logging.getLogger("ms_worker")
    if not args.model:
        log.error("no model given: pass --model DIR or set MS_WORKER_MODEL")
        return 2
    if not os.path.isdir(args.model):
        log.error("model directory not found: %s", args.model)
        return 2

    t0 = time.perf_counter()
    import mindspore as ms

    from ms_models import UnsupportedModelError, load_model
    from ms_models.runtime import setup
    from ms_worker.service import WorkerService

    setup(args.device)
    try:
        model = load_model(args.model, device=args.device, use_jit=not args.no_jit)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        log.error("cannot load model %s: %s", args.model, e)
        return 2
    log.info("model %s loaded in %.1f s (%.1f MiB of weights)", args.model, time.perf_counter() - t0,
             model.weight_bytes() / 2**20)

    mb = args.max_message_mb * 2**20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb)],
    )
    service = WorkerService(model, os.path.abspath(args.model), args.device,
                            kv_cache_bytes=int(args.kv_cache_gb * 2**30), framework=f"mindspore {ms.__version__}")
    pb_grpc.add_ModelWorkerServicer_to_server(service, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        log.error("cannot bind %s:%d", args.host, args.port)
        return 2
    server.start()
    log.info("serving ms_rpc.v1 on %s:%d (worker %s, device %s)", args.host, port, service.worker_id, args.device)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.ready_file)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.is_set() and not service.stopping.is_set():
        done.wait(0.5)
        if args.parent_pid and os.getppid() != args.parent_pid:
            log.warning("parent process %d is gone", args.parent_pid)
            break
    log.info("shutting down")
    service.stopping.set()
    server.stop(grace=5).wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args)
    return 2
