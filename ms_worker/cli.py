"""`ms-worker serve`: load a model and serve the ms_rpc.v1 ModelWorker service over gRPC.

Start-up order: bind the port with only health answering (NOT_SERVING; ModelWorker calls get UNAVAILABLE
"loading") -> load the weights (progress logged every few seconds) -> health "" SERVING, sd_notify READY=1, ready
file written. The front's InitializeCache then turns "ms_rpc.v1.ModelWorker" SERVING. SIGTERM/SIGINT drains: both
health services go NOT_SERVING, new steps are refused, the step in flight finishes (or is cancelled after
--shutdown-grace-s), the port closes, exit 0.

Tensor parallel (--tp-size N > 1): before loading, each rank joins the group's MindSpore cluster (rank 0 first
starts its scheduler, `ms-worker sched`, as a child process: ms_worker.cluster), then loads only its 1/N shard.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import signal
import sys
import threading
import time
from concurrent import futures

from ms_rpc.security import is_loopback, read_token
from ms_rpc.v1 import MAX_MESSAGE_MB as DEFAULT_MAX_MESSAGE_MB
from ms_worker.memory import DEFAULT_UTILIZATION

DEFAULT_DIST_TIMEOUT_S = 300.0
ENV_PREFIX = "MS_WORKER_"


def _env(name: str, default=None):
    return os.environ.get(ENV_PREFIX + name, default)


def parse_device(device: str) -> tuple[str, int | None]:
    """"cpu", "ascend", "ascend:N" -> (kind, index or None)."""
    m = re.fullmatch(r"(cpu|ascend|npu)(?::(\d+))?", device.strip().lower())
    if not m or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise ValueError(f"unsupported device {device!r}: expected cpu or ascend:N")
    kind = "ascend" if m.group(1) == "npu" else m.group(1)
    return kind, (int(m.group(2)) if m.group(2) is not None and kind != "cpu" else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ms-worker", description="MindSpore model worker for vLLM's ms_rpc executor.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve", help="load a model and serve it over gRPC",
        description="Load an HF-format model directory and serve the ms_rpc.v1 worker API, the grpc.health.v1 "
                    "health service and (optionally) Prometheus metrics. Every flag also reads an environment "
                    "variable MS_WORKER_<FLAG>, shown in brackets; a flag on the command line wins.")
    g = s.add_argument_group("model and device")
    g.add_argument("--model", default=_env("MODEL"), help="HF model directory (config.json + safetensors) "
                   "[MS_WORKER_MODEL]")
    g.add_argument("--device", default=_env("DEVICE", "cpu"),
                   help="cpu (default), or ascend:N for NPU N (sets DEVICE_ID=N) [MS_WORKER_DEVICE]")
    g.add_argument("--dtype", default=_env("DTYPE", "auto"), choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight, compute and KV-cache dtype; auto (default): float32 on cpu (its only dtype), "
                        "bfloat16 on ascend (float16 also) [MS_WORKER_DTYPE]")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=int(_env("KV_CACHE_MEMORY_BYTES", "0")),
                   help="KV cache bytes when the front asks for neither a size nor a fraction (vLLM's front always "
                        "sends its --kv-cache-memory-bytes or --gpu-memory-utilization); 0 = by "
                        "--gpu-memory-utilization [MS_WORKER_KV_CACHE_MEMORY_BYTES]")
    g.add_argument("--gpu-memory-utilization", type=float,
                   default=float(_env("GPU_MEMORY_UTILIZATION", str(DEFAULT_UTILIZATION))),
                   help=f"likewise: the fraction of the device's memory (host RAM on cpu) for weights, activations "
                        f"and KV cache, as vLLM's flag (default {DEFAULT_UTILIZATION}, vLLM's) "
                        f"[MS_WORKER_GPU_MEMORY_UTILIZATION]")
    g.add_argument("--no-jit", action="store_true", default=_env("NO_JIT", "") == "1",
                   help="run eagerly (PyNative) instead of compiling the model with ms.jit [MS_WORKER_NO_JIT=1]")
    g.add_argument("--all-drafts", action="store_true", default=_env("ALL_DRAFTS", "") == "1",
                   help="with ngram speculative decoding, propose every draft the n-gram lookup finds, as vLLM's "
                        "proposer does (default: only the drafts whose expected accepted tokens pay for the rows "
                        "they add, by the step times this worker measures) [MS_WORKER_ALL_DRAFTS=1]")
    _add_tp_arguments(s.add_argument_group(
        "tensor parallelism", "N workers, started separately, each holding 1/N of the weights, form a MindSpore "
        "cluster whose scheduler rank 0 runs; the front sends every step to all of them"))

    g = s.add_argument_group("network and security")
    g.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="bind address (default 127.0.0.1); anything but loopback without TLS or a token logs a warning "
                        "[MS_WORKER_HOST]")
    g.add_argument("--port", type=int, default=int(_env("PORT", "50051")),
                   help="gRPC port (default 50051); 0 picks a free one (see --ready-file) [MS_WORKER_PORT]")
    g.add_argument("--tls-cert", default=_env("TLS_CERT"), help="PEM server certificate (chain): serve TLS "
                   "[MS_WORKER_TLS_CERT]")
    g.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key of --tls-cert [MS_WORKER_TLS_KEY]")
    g.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA"),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS) "
                        "[MS_WORKER_TLS_CLIENT_CA]")
    g.add_argument("--token", default=_env("TOKEN"),
                   help="shared bearer token required on every ModelWorker call (health stays open); prefer "
                        "the variable or --token-file, a flag shows in ps [MS_WORKER_TOKEN]")
    g.add_argument("--token-file", default=_env("TOKEN_FILE"), help="file holding the bearer token "
                   "[MS_WORKER_TOKEN_FILE]")
    g.add_argument("--max-message-mb", type=int, default=int(_env("MAX_MESSAGE_MB", str(DEFAULT_MAX_MESSAGE_MB))),
                   help=f"largest gRPC message received or sent, in MiB (default {DEFAULT_MAX_MESSAGE_MB}, as the "
                        f"front's client); a larger one gets RESOURCE_EXHAUSTED [MS_WORKER_MAX_MESSAGE_MB]")

    g = s.add_argument_group("operations")
    g.add_argument("--health-port", type=int, default=int(_env("HEALTH_PORT", "0")),
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for Kubernetes gRPC probes, "
                        "which cannot speak TLS); 0 = off (default) [MS_WORKER_HEALTH_PORT]")
    g.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "0")),
                   help="serve Prometheus metrics over HTTP on this port; 0 = off (default) [MS_WORKER_METRICS_PORT]")
    g.add_argument("--metrics-host", default=_env("METRICS_HOST"),
                   help="bind address of the metrics port (default: --host) [MS_WORKER_METRICS_HOST]")
    g.add_argument("--drain-s", type=float, default=float(_env("DRAIN_S", "0")),
                   help="on SIGTERM, keep the port open this long answering health NOT_SERVING and refusing new "
                        "steps before closing (lets probes and load balancers see the drain; default 0) [MS_WORKER_DRAIN_S]")
    g.add_argument("--shutdown-grace-s", type=float, default=float(_env("SHUTDOWN_GRACE_S", "30")),
                   help="on SIGTERM, how long the step in flight may take to finish before it is cancelled (default 30) "
                        "[MS_WORKER_SHUTDOWN_GRACE_S]")
    g.add_argument("--ready-file", default=_env("READY_FILE"),
                   help="write the bound port to this file once serving (used by the embedded launcher) "
                        "[MS_WORKER_READY_FILE]")
    g.add_argument("--parent-pid", type=int, default=0,
                   help="exit when this process is gone (the embedded launcher passes its own pid)")
    g.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO) [MS_WORKER_LOG_LEVEL]")

    c = sub.add_parser(
        "sched", help="MindSpore's cluster scheduler for N tensor-parallel workers (rank 0 starts it itself)",
        description="Run MindSpore's cluster scheduler (MS_ROLE=MS_SCHED) on --dist-addr for --tp-size workers "
                    "until they have all left. `ms-worker serve --tp-rank 0` starts this as its child process; "
                    "there is no need to run it by hand.")
    c.add_argument("--dist-addr", required=True, help="HOST:PORT to listen on (HOST: an address of this host)")
    c.add_argument("--tp-size", type=int, required=True, help="number of workers in the cluster")
    c.add_argument("--device", default="cpu", help="cpu (default) or ascend[:N], as the workers")
    c.add_argument("--dist-timeout-s", type=float, default=DEFAULT_DIST_TIMEOUT_S,
                   help=f"how long to wait for all workers to register (default {DEFAULT_DIST_TIMEOUT_S:g})")
    c.add_argument("--parent-pid", type=int, default=0, help="exit when this process (rank 0) is gone")
    return p


def _add_tp_arguments(g) -> None:
    g.add_argument("--tp-rank", "--rank", dest="rank", metavar="I", type=int,
                   default=int(_env("TP_RANK", _env("RANK", "0"))),
                   help="this worker's tensor-parallel rank, 0..N-1 (default 0) [MS_WORKER_TP_RANK, or "
                        "MS_WORKER_RANK]")
    g.add_argument("--tp-size", "--world-size", dest="world_size", metavar="N", type=int,
                   default=int(_env("TP_SIZE", _env("WORLD_SIZE", "1"))),
                   help="number of tensor-parallel workers, each holding 1/N of the weights; N must divide the "
                        "model's attention and KV heads (default 1) [MS_WORKER_TP_SIZE, or MS_WORKER_WORLD_SIZE]")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   default=_env("ENABLE_EXPERT_PARALLEL", "") not in ("", "0", "false"),
                   help="a mixture-of-experts model's routed experts are partitioned whole across the N ranks "
                        "(E/N each; N must divide E) instead of each rank holding 1/N of every expert, as vLLM's "
                        "flag of that name; the same on every rank [MS_WORKER_ENABLE_EXPERT_PARALLEL]")
    g.add_argument("--data-parallel-size", metavar="M", type=int, default=int(_env("DATA_PARALLEL_SIZE", "1")),
                   help="with --enable-expert-parallel: the experts are spread over M data-parallel engines' workers "
                        "(vLLM's --data-parallel-size), which form one MindSpore cluster of M x N ranks and run every "
                        "step's forward together (default 1) [MS_WORKER_DATA_PARALLEL_SIZE]")
    g.add_argument("--data-parallel-rank", metavar="D", type=int, default=int(_env("DATA_PARALLEL_RANK", "0")),
                   help="this worker's data-parallel engine, 0..M-1: its cluster rank is D x N + its tensor-parallel "
                        "rank (default 0) [MS_WORKER_DATA_PARALLEL_RANK]")
    g.add_argument("--dist-addr", metavar="HOST:PORT", default=_env("DIST_ADDR"),
                   help="where rank 0 runs the group's MindSpore cluster scheduler (HOST: an address of rank 0's "
                        "host), the same on every rank; needed when N > 1 [MS_WORKER_DIST_ADDR]")
    g.add_argument("--dist-timeout-s", metavar="S", type=float,
                   default=float(_env("DIST_TIMEOUT_S", str(DEFAULT_DIST_TIMEOUT_S))),
                   help=f"how long a rank waits for all N ranks to join the cluster before it fails, naming the "
                        f"missing ones (default {DEFAULT_DIST_TIMEOUT_S:g}) [MS_WORKER_DIST_TIMEOUT_S]")


def _check_args(args) -> str | None:
    """A reason to refuse the arguments before anything is loaded, or None."""
    if not args.model:
        return "no model given: pass --model DIR or set MS_WORKER_MODEL"
    if not os.path.isdir(args.model):
        return f"model directory not found: {args.model}"
    from ms_models.runtime import resolve_dtype

    try:
        resolve_dtype(parse_device(args.device)[0], args.dtype)
    except ValueError as e:
        return str(e)
    if not 1 <= args.max_message_mb <= 2047:
        return f"--max-message-mb {args.max_message_mb} is not in 1..2047 (gRPC sizes are 32-bit)"
    if not 0 < args.gpu_memory_utilization <= 1:
        return f"--gpu-memory-utilization {args.gpu_memory_utilization} is not in (0, 1]"
    if args.kv_cache_memory_bytes < 0:
        return f"--kv-cache-memory-bytes {args.kv_cache_memory_bytes} is negative"
    if args.world_size < 1 or not 0 <= args.rank < args.world_size:
        return f"rank {args.rank} is not in 0..{args.world_size - 1} (tensor-parallel size {args.world_size})"
    if args.data_parallel_size < 1 or not 0 <= args.data_parallel_rank < args.data_parallel_size:
        return (f"--data-parallel-rank {args.data_parallel_rank} is not in 0..{args.data_parallel_size - 1} "
                f"(--data-parallel-size {args.data_parallel_size})")
    if args.data_parallel_size > 1 and not args.enable_expert_parallel:
        return (f"--data-parallel-size {args.data_parallel_size} without --enable-expert-parallel: data-parallel "
                f"engines share a cluster only to spread the experts over their workers; otherwise start each "
                f"engine's workers on their own")
    if args.data_parallel_size > 1 and parse_device(args.device)[0] == "ascend":
        return (f"--data-parallel-size {args.data_parallel_size} --enable-expert-parallel: experts over data-parallel "
                f"engines run on the CPU path only (the Ascend path spreads the experts over one engine's "
                f"tensor-parallel ranks)")
    if cluster_of(args)[1] > 1 or args.enable_expert_parallel:
        from ms_models import ModelConfig, UnsupportedModelError
        from ms_models.parallel import check_tensor_parallel
        from ms_models.runtime import parse_dist_addr

        if cluster_of(args)[1] > 1:
            if not args.dist_addr:
                sizes = f"--tp-size {args.world_size}" + (f" x --data-parallel-size {args.data_parallel_size}"
                                                          if args.data_parallel_size > 1 else "")
                return (f"{sizes} needs --dist-addr HOST:PORT (MS_WORKER_DIST_ADDR): where rank 0 runs the group's "
                        "MindSpore cluster scheduler, the same on every rank")
            try:
                parse_dist_addr(args.dist_addr)
            except ValueError as e:
                return str(e)
            if args.dist_timeout_s <= 0:
                return "--dist-timeout-s must be positive"
        try:
            cfg = ModelConfig.from_model_dir(args.model)
        except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
            return f"cannot load model {args.model}: {e}"
        return check_tensor_parallel(cfg, args.world_size, args.enable_expert_parallel, args.data_parallel_size)
    return None


def cluster_of(args) -> tuple[int, int]:
    """(rank, size) of this worker in its MindSpore cluster: its tensor-parallel group, or with experts over
    data-parallel engines every engine's ranks (TensorParallel.cluster). After _check_args."""
    from ms_models.parallel import TensorParallel

    return TensorParallel(args.rank, args.world_size, args.enable_expert_parallel, args.data_parallel_rank,
                          args.data_parallel_size).cluster


def _weights_mib(model_dir: str) -> float:
    return sum(e.stat().st_size for e in os.scandir(model_dir) if e.name.endswith(".safetensors")) / 2**20


class Endpoints:
    """The worker's listening endpoints, opened before the model loads: the gRPC port (health NOT_SERVING, and the
    ModelWorker methods UNAVAILABLE "loading", until ``attach``), the optional plaintext health port and the
    Prometheus metrics server."""

    def __init__(self, args, creds, token):
        """``args``: `ms-worker serve`'s; ``creds``: the server's TLS credentials or None; ``token``: the bearer
        token or None."""
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from ms_rpc.v1 import worker_pb2_grpc as pb_grpc
        from ms_worker import serving

        self._health_pb2 = health_pb2
        self.args, self.creds, self.token = args, creds, token
        self.service = None
        self.metrics = serving.Metrics(lambda: self.service) if args.metrics_port else None
        self.health = health.HealthServicer()
        for name in ("", serving.SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        def cache_ready():
            self.health.set(serving.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

        interceptor = serving.WorkerInterceptor(token, self.metrics, after={"InitializeCache": cache_ready})
        mb = args.max_message_mb * 2**20
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"), interceptors=[interceptor],
            options=[("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.deferred = serving.DeferredServicer()
        pb_grpc.add_ModelWorkerServicer_to_server(self.deferred, self.server)
        self.health_server = self.metrics_server = None
        if args.health_port:
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.port = 0

    def open(self, log) -> bool:
        """Binds and starts every endpoint; False (logged, whatever started stopped again) when one cannot."""
        args, creds, token = self.args, self.creds, self.token
        address = f"{args.host}:{args.port}"
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            log.error("cannot bind %s", address)
            return False
        self.server.start()
        security = ("mutual TLS" if args.tls_client_ca else "TLS" if creds else "plaintext") + \
                   (" + bearer token" if token else "")
        log.info("listening on %s:%d (%s); health NOT_SERVING until the model is loaded", args.host, self.port,
                 security)
        if not is_loopback(args.host):
            if not creds and not token:
                log.warning("binding %s without TLS or a token: anyone who can reach this port can drive the worker; "
                            "pass --tls-cert/--tls-key (and --tls-client-ca) and/or --token-file", args.host)
            elif not creds:
                log.warning("binding %s without TLS: the bearer token travels in clear text", args.host)
        if self.health_server is not None:
            try:
                bound = self.health_server.add_insecure_port(f"{args.host}:{args.health_port}")
            except RuntimeError:
                bound = 0
            if bound == 0:
                log.error("cannot bind the health port %s:%d", args.host, args.health_port)
                self.health_server = None
                self.close()
                return False
            self.health_server.start()
            log.info("grpc.health.v1 alone (plaintext) on %s:%d", args.host, args.health_port)
        if self.metrics is not None:
            mhost = args.metrics_host or args.host
            try:
                self.metrics_server = self.metrics.serve(mhost, args.metrics_port)
            except OSError as e:
                log.error("cannot serve metrics on %s:%d: %s", mhost, args.metrics_port, e)
                self.close()
                return False
            log.info("Prometheus metrics on http://%s:%d/metrics", mhost, args.metrics_port)
        return True

    def attach(self, service, load_s: float) -> None:
        """The model is loaded: ModelWorker calls go to ``service``, health "" SERVING."""
        args = self.args
        self.service = self.deferred.target = service
        self.health.set("", self._health_pb2.HealthCheckResponse.SERVING)
        if self.metrics is not None:
            self.metrics.info.info({"worker_id": service.worker_id, "model": service.model_path,
                                    "device": args.device, "framework": service.framework, "rank": str(args.rank)})
            self.metrics.load_seconds.set(load_s)
            self.metrics.state.set(1)

    def draining(self) -> None:
        """Both health services NOT_SERVING (the gRPC port still answers the step in flight)."""
        self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.state.set(0)

    def close(self, grace: float | None = 0) -> None:
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def _join_cluster(args, kind: str, log) -> bool:
    """Tensor parallel: joins the group's MindSpore cluster before any MindSpore op (rank 0 first starts the
    cluster's scheduler, a child process: fork + exec before MindSpore runs anything here). Without tensor
    parallel: selects the device. False (logged) on failure."""
    from ms_models.runtime import ClusterJoinError, DeviceUnavailableError, resolve_dist_addr, setup

    rank, size = cluster_of(args)
    if size == 1:
        try:
            setup(kind)
        except DeviceUnavailableError as e:
            log.error("%s (--device %s)", e, args.device)
            return False
        return True
    from ms_worker import cluster

    sched = None
    if rank == 0:
        try:
            busy = cluster.check_port_free(*resolve_dist_addr(args.dist_addr, args.dist_timeout_s))
        except ClusterJoinError as e:
            busy = str(e)
        if busy:
            log.error("%s (--dist-addr %s)", busy, args.dist_addr)
            return False
        sched = cluster.Scheduler(args.dist_addr, size, kind, args.dist_timeout_s)
        sched.start()
        atexit.register(sched.stop)
        problem = sched.wait_listening(args.dist_timeout_s)
        if problem:
            log.error("%s", problem)
            sched.stop()
            return False
    from ms_worker import serving

    serving.sd_notify(f"STATUS=joining the tensor-parallel group on {args.dist_addr} as rank {rank} "
                      f"of {size}")
    log.info("rank %d of %d: joining the MindSpore cluster at %s (waiting up to %g s for all ranks)",
             rank, size, args.dist_addr, args.dist_timeout_s)
    try:
        setup(kind, dist_addr=args.dist_addr, join_timeout_s=args.dist_timeout_s, tp_rank=rank,
              tp_size=size)
    except DeviceUnavailableError as e:
        log.error("%s (--device %s)", e, args.device)
    except ClusterJoinError as e:
        log.error("%s", cluster.join_failure_message(rank, size, args.dist_addr, args.dist_timeout_s,
                                                     e, sched))
    else:
        if sched is not None:
            sched.joining = False
        log.info("rank %d of %d joined the MindSpore cluster at %s", rank, size, args.dist_addr)
        return True
    if sched is not None:
        sched.stop()
    return False


def _load(args, kind: str, log, t0: float):
    """The model of ``args`` on this rank (ms_models.CausalLM), or None (logged); ``t0``: when loading began."""
    from ms_models import UnsupportedModelError, load_model

    try:
        model = load_model(args.model, device=kind, use_jit=not args.no_jit, dtype=args.dtype,
                           expert_parallel=args.enable_expert_parallel, tp_rank=args.rank, tp_size=args.world_size,
                           dp_rank=args.data_parallel_rank, dp_size=args.data_parallel_size)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        log.error("cannot load model %s: %s", args.model, e)
        return None
    placement = ""
    if model.config.num_experts and cluster_of(args)[1] > 1:
        first, stop = model.tp.experts(model.config.num_experts)
        placement = (f"; experts {first}..{stop - 1} of {model.config.num_experts} whole" if args.enable_expert_parallel
                     else f"; 1/{args.world_size} of each of the {model.config.num_experts} experts")
    log.info("model %s loaded in %.1f s (%.1f MiB of weights%s%s)", args.model, time.perf_counter() - t0,
             model.weight_bytes() / 2**20,
             f", tensor-parallel rank {args.rank} of {args.world_size}" if args.world_size > 1 else "",
             placement + (f" over data-parallel engines: this is engine {args.data_parallel_rank} of "
                          f"{args.data_parallel_size}" if args.data_parallel_size > 1 else ""))
    return model


def _drain(args, service, endpoints: Endpoints, log) -> int:
    """Health NOT_SERVING, new steps refused, the step in flight given --shutdown-grace-s, the ports closed."""
    from ms_worker import serving

    log.info("draining: health NOT_SERVING, new steps refused")
    serving.sd_notify("STOPPING=1\nSTATUS=draining")
    service.stopping.set()
    endpoints.draining()
    if args.drain_s > 0:
        time.sleep(args.drain_s)
    finished = service.lock.acquire(timeout=args.shutdown_grace_s)
    if finished:
        service.lock.release()
    else:
        log.warning("the step in flight did not finish within %.1f s; cancelling it", args.shutdown_grace_s)
    endpoints.close(grace=1)
    if not finished:
        # The model call cannot be interrupted from Python: leave without waiting for its thread.
        log.warning("stopped with a step still running")
        logging.shutdown()
        os._exit(1)
    log.info("stopped")
    return 0


def serve(args) -> int:
    """`ms-worker serve`: the ports (health only), the cluster and the model, serving, then the drain (the module
    docstring's order)."""
    from ms_worker import serving

    log = logging.getLogger("ms_worker")
    problem = _check_args(args)
    if problem:
        log.error("%s", problem)
        return 2
    try:
        creds = serving.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        token = read_token(args.token, args.token_file)
    except ValueError as e:
        log.error("%s", e)
        return 2
    kind, index = parse_device(args.device)
    if index is not None:
        os.environ["DEVICE_ID"] = str(index)

    endpoints = Endpoints(args, creds, token)
    if not endpoints.open(log):
        return 2
    t0 = time.perf_counter()
    serving.sd_notify("STATUS=loading the model")
    log.info("loading %s (%.0f MiB of safetensors) on %s", args.model, _weights_mib(args.model), args.device)
    with serving.Heartbeat("still loading the model"):
        model = _load(args, kind, log, t0) if _join_cluster(args, kind, log) else None
        if model is None:
            endpoints.close()
            return 2
        import mindspore as ms

        from ms_worker.service import WorkerService

    load_s = time.perf_counter() - t0
    service = WorkerService(model, os.path.abspath(args.model), args.device,
                            kv_cache_bytes=args.kv_cache_memory_bytes,
                            memory_utilization=args.gpu_memory_utilization, framework=f"mindspore {ms.__version__}",
                            rank=args.rank, world_size=args.world_size, draft_budget=not args.all_drafts)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    endpoints.attach(service, load_s)
    log.info("serving ms_rpc.v1 on %s:%d (worker %s, device %s, rank %d/%d)", args.host, endpoints.port,
             service.worker_id, args.device, args.rank, args.world_size)
    serving.sd_notify(f"READY=1\nSTATUS=serving on {args.host}:{endpoints.port}")
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(endpoints.port))
        os.replace(tmp, args.ready_file)

    while not done.is_set() and not service.stopping.is_set():
        done.wait(0.5)
        if args.parent_pid and os.getppid() != args.parent_pid:
            log.warning("parent process %d is gone", args.parent_pid)
            break
    return _drain(args, service, endpoints, log)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under systemd (journald adds time and pid) the timestamp is left out.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), stream=sys.stderr, format=fmt)
    if args.command == "serve":
        return serve(args)
    if args.command == "sched":
        from ms_worker.cluster import run_scheduler

        return run_scheduler(args)
    return 2
