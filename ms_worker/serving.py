"""Running a worker as a service: health, auth, TLS, metrics and systemd notification around the gRPC server.

- Health: the standard `grpc.health.v1` service. Service "" is SERVING once the model is loaded and the worker
  accepts the handshake (Describe ... InitializeCache); "ms_rpc.v1.ModelWorker" is SERVING only once the KV cache
  is allocated (after InitializeCache). Both are NOT_SERVING while loading and while draining. Health is open to
  everyone (Kubernetes gRPC probes cannot send metadata); every ModelWorker call needs the token when one is set.
- Auth: `authorization: Bearer <token>` metadata, compared in constant time; refused calls get UNAUTHENTICATED and
  change nothing. TLS and mutual TLS come from grpc's own credentials (no pickling anywhere: protobuf only).
- Metrics: Prometheus text on a separate HTTP port (prometheus_client), fed by the same interceptor.
- sd_notify: READY=1 / STATUS= / STOPPING=1 to $NOTIFY_SOCKET (systemd Type=notify), dependency-free.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time

import grpc

from ms_rpc.security import read_file
from ms_rpc.v1 import worker_pb2 as pb

log = logging.getLogger("ms_worker")

SERVICE_NAME = "ms_rpc.v1.ModelWorker"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
STEP_CALLS = ("Execute", "Sample")


# -- systemd ----------------------------------------------------------------------------------------------------
def sd_notify(message: str) -> bool:
    """Send one sd_notify(3) message (e.g. "READY=1") to $NOTIFY_SOCKET; False when not run under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":                      # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


# -- security ---------------------------------------------------------------------------------------------------
def server_credentials(cert: str | None, key: str | None, client_ca: str | None):
    """grpc server credentials for TLS (cert + key) or mutual TLS (+ client_ca); None for a plaintext port."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS plus client certs)")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (read_file(key, "TLS key"), read_file(cert, "TLS certificate"))
    ca = read_file(client_ca, "client CA bundle") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


# -- metrics ----------------------------------------------------------------------------------------------------
class Metrics:
    """The worker's Prometheus metrics (its own registry, plus the standard process/platform collectors)."""

    def __init__(self, get_service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
        from prometheus_client import PlatformCollector, ProcessCollector

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.info = Info("ms_worker", "the worker process", registry=r)
        self.state = Gauge("ms_worker_serving", "1 while the worker serves (model loaded, not draining)",
                           registry=r)
        self.load_seconds = Gauge("ms_worker_model_load_seconds", "time taken to load the model", registry=r)
        self.step_seconds = Histogram(
            "ms_worker_step_seconds", "wall time of a step call (Execute; Sample for a deferred step)", ["call"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch_size = Histogram("ms_worker_batch_size", "requests scheduled in one step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.tokens = Counter("ms_worker_scheduled_tokens", "tokens computed (prompt and output)", registry=r)
        self.errors = Counter("ms_worker_rpc_errors", "ModelWorker calls that failed, by method and status code",
                              ["method", "code"], registry=r)
        self.liveness = Counter("ms_worker_liveness_checks", "deep liveness forwards run", registry=r)
        self.dummy_batches = Counter("ms_worker_dummy_batches", "forwards joined for the other data-parallel "
                                     "engines in steps this engine had nothing to run (RunDummyBatch)", registry=r)
        self._get_service = get_service
        self._last = (0, 0, 0)
        r.register(self)                    # collect(): the KV-cache gauges, read at scrape time

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        svc = self._get_service()
        total, used, active = self._last
        if svc is not None and svc.lock.acquire(timeout=1.0):
            try:
                st = svc.state
                if st is not None:
                    total, active = st.num_blocks, len(st.requests)
                    used = len({int(b) for req in st.requests.values() for b in req.block_ids})
                self._last = (total, used, active)
            finally:
                svc.lock.release()
        yield GaugeMetricFamily("ms_worker_kv_blocks_total", "KV cache blocks allocated", value=total)
        yield GaugeMetricFamily("ms_worker_kv_blocks_used", "KV cache blocks in the block tables of the requests "
                                "the worker holds", value=used)
        yield GaugeMetricFamily("ms_worker_kv_blocks_free", "KV cache blocks not in any held block table",
                                value=max(total - used, 0))
        yield GaugeMetricFamily("ms_worker_requests_active", "requests whose state the worker holds", value=active)
        model = getattr(svc, "model", None)
        if model is not None:
            yield GaugeMetricFamily("ms_worker_weight_bytes", "bytes of the model's weights on this worker",
                                    value=model.weight_bytes())
            kv = (model.num_blocks or 0) * model.kv_cache_bytes_per_block(model.block_size or 0)
            yield GaugeMetricFamily("ms_worker_kv_cache_bytes", "bytes of the KV cache allocated", value=kv)
            yield GaugeMetricFamily("ms_worker_graphs", "compiled graphs of the current KV cache",
                                    value=len(model.compiled) if model.use_jit else 0)
            yield CounterMetricFamily("ms_worker_graphs_compiled", "graphs compiled (warm-up compiles them all)",
                                      value=model.graphs_compiled)

    def serve(self, host: str, port: int):
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server


# -- the gRPC server --------------------------------------------------------------------------------------------
class DeferredServicer:
    """Answers every ModelWorker method; forwards to the real servicer once the model is loaded, UNAVAILABLE before.

    Registered before the model loads so the port (and health) answer during loading."""

    def __init__(self):
        self.target = None
        for m in pb.DESCRIPTOR.services_by_name["ModelWorker"].methods:
            setattr(self, m.name, self._forward(m.name))

    def _forward(self, name: str):
        def call(request, context):
            target = self.target
            if target is None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker is loading the model; retry when health says "
                                                           "SERVING")
            return getattr(target, name)(request, context)

        call.__name__ = name
        return call


class WorkerInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token on every ModelWorker call, parses the request (bytes that are not the method's
    message get INVALID_ARGUMENT), counts errors and step metrics, and runs hooks after successful calls (health
    follows InitializeCache). Health calls pass untouched."""

    def __init__(self, token: str | None = None, metrics: Metrics | None = None, after: dict | None = None):
        self._token = token.encode() if token else None
        self.metrics = metrics
        self.after = after or {}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        name = method.rsplit("/", 1)[-1]
        if self._token is not None:
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            if isinstance(given, bytes):
                given = given.decode(errors="replace")
            scheme, _, value = given.partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token)):
                return self._refuse(name, "missing" if not given else "invalid")
        if handler.unary_unary is None:
            return handler
        # The request arrives as bytes and is parsed in _wrap, so that a payload that is not the method's message
        # gets INVALID_ARGUMENT naming the problem (grpc's own parsing answers INTERNAL "Exception deserializing").
        return grpc.unary_unary_rpc_method_handler(self._wrap(name, handler.unary_unary, handler.request_deserializer),
                                                   request_deserializer=None,
                                                   response_serializer=handler.response_serializer)

    def _refuse(self, name: str, why: str):
        metrics = self.metrics

        def refuse(request, context):
            log.warning("refused %s from %s: %s bearer token", name, context.peer(), why)
            if metrics is not None:
                metrics.errors.labels(name, "UNAUTHENTICATED").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{why} bearer token: this worker requires 'authorization: Bearer <token>' "
                          f"(the front's ms_rpc 'token' / MS_RPC_TOKEN setting)")

        # The request body is never parsed for a refused call.
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _wrap(self, name: str, behavior, deserialize=None):
        metrics, hook = self.metrics, self.after.get(name)
        method = pb.DESCRIPTOR.services_by_name["ModelWorker"].methods_by_name.get(name)
        type_name = method.input_type.full_name if method is not None else "request"

        def call(raw, context):
            t0 = time.perf_counter()
            try:
                try:
                    request = deserialize(raw) if deserialize is not None else raw
                except Exception as e:  # noqa: BLE001 - DecodeError, or anything else the parser raises
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"malformed {name} request: {len(raw)} bytes that do not parse as {type_name} "
                                  f"({type(e).__name__}: {e})")
                reply = behavior(request, context)
            except BaseException:
                if metrics is not None:
                    code = context.code()
                    metrics.errors.labels(name, code.name if code is not None else "UNKNOWN").inc()
                raise
            if metrics is not None:
                if name in STEP_CALLS:
                    metrics.step_seconds.labels(name).observe(time.perf_counter() - t0)
                if name == "Execute":
                    metrics.batch_size.observe(len(request.new_requests) + len(request.cached_requests))
                    metrics.tokens.inc(sum(r.num_scheduled_tokens for r in request.new_requests)
                                       + sum(r.num_scheduled_tokens for r in request.cached_requests))
                elif name == "CheckLiveness":
                    metrics.liveness.inc()
                elif name == "RunDummyBatch" and reply.forward_s > 0:
                    metrics.dummy_batches.inc()
            if hook is not None:
                hook()
            return reply

        return call


class Heartbeat:
    """Logs (and reports to systemd) that a long phase is still going, every `every` seconds."""

    def __init__(self, what: str, every: float = 5.0):
        self.what, self.every = what, every
        self.t0 = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self):
        while not self._done.wait(self.every):
            msg = f"{self.what}: {time.perf_counter() - self.t0:.0f} s, resident memory {_rss_mib():.0f} MiB"
            log.info("%s", msg)
            sd_notify(f"STATUS={msg}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0
