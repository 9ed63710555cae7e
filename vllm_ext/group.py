"""The workers behind one executor: ranks 0..N-1 of one model (tensor parallel), external or local.

A group is started (local processes launched, or external addresses given), connected (each rank's health
SERVING, Describe checked: rank, world size, same model, same config on every rank), then handshaken
(InitializeCache, Warmup). Every step goes to every rank at once; rank 0's reply is the result. A group can
be torn down and started again: that is how the executor recovers from a worker that died or restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace

from ms_rpc.security import is_loopback
from ms_rpc.v1 import PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import WorkerClient, WorkerError
from vllm_ext.launcher import LocalWorker
from vllm_ext.settings import ConfigError, RpcSettings

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_addresses(workers: tuple[str, ...], tp_size: int, dp_index: int) -> list[str]:
    """This DP rank's worker addresses out of the configured list: one group of tp_size per DP rank, in order
    (DP rank r gets workers[r*tp_size:(r+1)*tp_size]). [] = the embedded default (local workers).

    vLLM runs each DP rank of a dense model as an independent engine (its parallel config then says DP size 1),
    so the rank comes from `data_parallel_index` and the list's length is checked against the groups it holds."""
    if not workers:
        return []
    if len(workers) % tp_size or (dp_index + 1) * tp_size > len(workers):
        raise ConfigError(f"ms_rpc: {len(workers)} worker addresses do not hold a group of {tp_size} (tensor parallel "
                          f"size) for data parallel rank {dp_index}: give tp_size x dp_size addresses, DP rank r "
                          f"using addresses r*{tp_size} .. r*{tp_size}+{tp_size - 1}: {list(workers)}")
    return list(workers[dp_index * tp_size:(dp_index + 1) * tp_size])


def _without_options(args: list[str], names: tuple[str, ...]) -> list[str]:
    """`args` less the options `names` (as `--name value` or `--name=value`)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out


def connect_worker(settings: RpcSettings, address: str, timeout: float | None = None) -> WorkerClient:
    """A client for the worker at `address` with the configured TLS/token, once its health says SERVING."""
    security = settings.channel_security()
    if not security.tls and not security.token and not is_loopback(address.rsplit(":", 1)[0]):
        log.warning("ms_rpc: worker %s is reached without TLS or a token: anyone who can reach its port can "
                    "drive it (see the ms_rpc tls_ca/token settings)", address)
    client = WorkerClient(address, security=security)
    try:
        client.wait_ready(settings.connect_timeout_s if timeout is None else timeout)
    except BaseException:
        client.close()
        raise
    return client


class WorkerGroup:
    def __init__(self, settings: RpcSettings, model: str, tp_size: int, addresses: list[str],
                 expert_parallel: bool = False, engine: int = 0, dp_size: int = 1):
        """``engine``: vLLM's data-parallel index of this engine; ``dp_size``: the engines that spread the experts
        over their workers (1: the experts stay within this engine's)."""
        self.settings, self.model, self.size = settings, model, tp_size
        self.engine = engine
        self.expert_parallel = expert_parallel   # vLLM's --enable-expert-parallel: the workers must agree
        self.dp_size = dp_size
        self.dp_rank = engine if dp_size > 1 else 0   # this engine's place among them
        self.external = list(addresses)
        self.local: list[LocalWorker] = []
        self.clients: list[WorkerClient] = []
        self.beats: list[WorkerClient] = []     # one more channel per rank, for heartbeats only
        self.infos: list[pb.WorkerInfo] = []
        self._pool = ThreadPoolExecutor(max_workers=tp_size, thread_name_prefix="ms_rpc_rank")

    @property
    def info(self) -> pb.WorkerInfo:
        return self.infos[0]

    @property
    def address(self) -> str:
        return self.clients[0].address if self.clients else ",".join(self.addresses())

    def addresses(self) -> list[str]:
        return self.external or [w.address for w in self.local]

    def describe_ranks(self) -> str:
        return ", ".join(f"rank {i} {c.address} ({inf.worker_id})" for i, (c, inf) in
                         enumerate(zip(self.clients, self.infos)))

    # -- start, connect, stop ------------------------------------------------------------------------------
    def launch(self) -> None:
        """The embedded default: start this group's local worker processes (all ranks at once: they find each
        other through MindSpore's cluster, whose scheduler rank 0 starts on a free loopback port)."""
        if not os.path.isdir(self.model):
            raise ConfigError(f"ms_rpc: the embedded worker needs a local model directory; {self.model!r} is not one")
        # The embedded workers listen on loopback in plaintext; a configured token still guards them.
        sec = self.settings.security
        self.settings = replace(self.settings, security={k: sec.get(k) for k in ("token", "token_file")})
        token = self.settings.channel_security().token
        # the ranks' MindSpore cluster: this engine's, or every engine's when they share the experts
        # (plugin._place_expert_cluster)
        dist = (self.settings.expert_cluster_addr if self.dp_size > 1 else
                f"127.0.0.1:{free_port()}" if self.size > 1 else None)
        try:
            for rank in range(self.size):
                extra = list(self.settings.worker_args)
                if rank > 0 or self.engine > 0:  # one port each: worker_args' metrics and health ports go to
                    extra = _without_options(extra, ("--metrics-port", "--health-port"))   # engine 0's rank 0
                if self.size > 1:
                    extra += ["--rank", str(rank), "--world-size", str(self.size)]
                if dist:
                    extra += ["--dist-addr", dist]
                if self.expert_parallel:
                    extra.append("--enable-expert-parallel")
                if self.dp_size > 1:
                    extra += ["--data-parallel-size", str(self.dp_size), "--data-parallel-rank", str(self.dp_rank)]
                self.local.append(LocalWorker(self.settings.worker_python, os.path.abspath(self.model), extra,
                                              token=token, rank=rank))
            for w in self.local:
                w.wait_ready()
        except BaseException:
            self.stop_local()
            raise

    def connect(self, model_check, timeout: float | None = None) -> None:
        """Clients for every rank; Describe each and check it: rank i of N, the same model as vLLM's
        (`model_check(info, address)` raises), and the same model config on every rank."""
        self.close_clients()
        for addr in self.addresses():
            self.clients.append(connect_worker(self.settings, addr, timeout))
            self.clients[-1].watch_health()
            self.beats.append(WorkerClient(addr, security=self.clients[-1].security))
        self.infos = [c.describe() for c in self.clients]
        for i, (c, inf) in enumerate(zip(self.clients, self.infos)):
            if inf.protocol_version != PROTOCOL_VERSION:
                raise ConfigError(f"ms_rpc worker {c.address} speaks protocol version {inf.protocol_version}, this "
                                  f"front speaks {PROTOCOL_VERSION}: run a worker and a front of the same release")
            if inf.world_size != self.size or inf.rank != i:
                raise ConfigError(f"ms_rpc worker {c.address} was started as rank {inf.rank} of {inf.world_size}; "
                                  f"this front expects rank {i} of {self.size} there (tensor parallel size "
                                  f"{self.size}, addresses in rank order)")
            model_check(inf, c.address)
            if inf.experts.num_experts and inf.experts.expert_parallel != self.expert_parallel:
                on, off = "with", "without"
                raise ConfigError(f"ms_rpc worker {c.address} was started {on if inf.experts.expert_parallel else off} "
                                  f"--enable-expert-parallel (experts {inf.experts.first_expert}.."
                                  f"{inf.experts.first_expert + inf.experts.local_experts - 1} of "
                                  f"{inf.experts.num_experts}); this front runs {on if self.expert_parallel else off} "
                                  f"it: start every worker and the front with the same flag")
            if inf.experts.num_experts and (max(inf.experts.data_parallel_size, 1), inf.experts.data_parallel_rank) \
                    != (self.dp_size, self.dp_rank):
                raise ConfigError(f"ms_rpc worker {c.address} shares its experts with "
                                  f"{max(inf.experts.data_parallel_size, 1)} data-parallel engine(s) as engine "
                                  f"{inf.experts.data_parallel_rank}; this front expects "
                                  + (f"engine {self.dp_rank} of {self.dp_size} (--data-parallel-size with "
                                     f"--enable-expert-parallel: start it with --data-parallel-size {self.dp_size} "
                                     f"--data-parallel-rank {self.dp_rank})" if self.dp_size > 1 else
                                     "every expert within this engine's workers (start it without "
                                     "--data-parallel-size)"))
            if inf.model.config_hash != self.infos[0].model.config_hash or inf.model_path != self.info.model_path:
                raise ConfigError(f"ms_rpc workers {self.clients[0].address} and {c.address} serve different models "
                                  f"({self.info.model_path} vs {inf.model_path})")

    def close_clients(self) -> None:
        for c in self.clients + self.beats:
            c.close()
        self.clients, self.beats, self.infos = [], [], []

    def abort(self) -> None:
        """Ends every call in flight on the ranks' step channels at once (they fail CANCELLED); connect() makes
        new ones."""
        for c in self.clients:
            c.close()

    def stop_local(self, kill: bool = False) -> None:
        for w in self.local:
            w.stop(kill=kill)
        self.local = []

    def local_dead(self, wait_s: float = 0.0) -> list[str]:
        """The local ranks whose process exited, as 'rank i (exit code c)'; with wait_s, waits that long for one
        to exit (a failed call may arrive just before its process is gone)."""
        end = time.monotonic() + wait_s
        while True:
            dead = [f"rank {w.rank} (exit code {w.proc.returncode})" for w in self.local if not w.alive()]
            if dead or time.monotonic() >= end:
                return dead
            time.sleep(0.05)

    def close(self) -> None:
        self.close_clients()
        self.stop_local()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- calls on every rank ---------------------------------------------------------------------------------
    def call_all(self, fn, abort_on_error: bool = False):
        """fn(client) on every rank at once; rank 0's result. The first failure (in rank order) is raised, after
        every rank answered or failed: ranks of one model move together or not at all. With abort_on_error, the
        first rank to fail ends the others' calls at once (they would wait in a collective for the failed rank)
        and its own error is raised."""
        if len(self.clients) == 1:
            return fn(self.clients[0])
        futures = [self._pool.submit(fn, c) for c in self.clients]
        if abort_on_error:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            first = next((f.exception() for f in futures if f in done and f.exception() is not None), None)
            if first is not None:
                self.abort()
                wait(futures)
                raise first
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
        return futures[0].result()

    def start_all(self, name: str, request, timeout: float) -> list:
        """The step call `name` sent to every rank at once, without waiting (finish_all waits)."""
        return [c.start(name, request, timeout) for c in self.clients]

    def finish_all(self, name: str, calls: list):
        """Waits for calls made by start_all; rank 0's reply. As call_all(abort_on_error=True): the first rank to
        fail ends the others' calls at once (they would wait in a collective for it) and its error is raised."""
        clients = self.clients[:len(calls)]
        if len(calls) > 1:
            ended, lock, left = threading.Event(), threading.Lock(), [len(calls)]

            def on_done(call):
                with lock:
                    left[0] -= 1
                    if left[0] == 0 or call.cancelled() or call.exception() is not None:
                        ended.set()

            for call in calls:
                call.add_done_callback(on_done)
            ended.wait()
            failed = next((i for i, call in enumerate(calls)
                           if call.done() and (call.cancelled() or call.exception() is not None)), None)
            if failed is not None:
                self.abort()
                clients[failed].result(name, calls[failed])
        for c, call in zip(clients, calls):
            reply = c.result(name, call)
            if c is clients[0]:
                first = reply
        return first

    def handshake(self, cache: pb.CacheConfig, warmup: bool = True) -> float:
        """InitializeCache (a fresh copy of `cache` per rank) and, if asked, Warmup; returns warm-up seconds."""
        def init(c: WorkerClient):
            cfg = pb.CacheConfig()
            cfg.CopyFrom(cache)
            return c.initialize_cache(cfg)

        self.call_all(init)
        return self.warmup() if warmup else 0.0

    def warmup(self) -> float:
        """Warmup on every rank at once (their forwards hold collectives: the first rank to fail ends the others'
        calls); returns rank 0's seconds."""
        reply = self.call_all(lambda c: c.warmup(), abort_on_error=True)
        log.info("ms_rpc: worker warm-up compiled %d shapes in %.1f s", reply.compiled_shapes, reply.seconds)
        return reply.seconds

    def determine_available_memory(self, block_size: int, requested: int, utilization: float,
                                   max_num_batched_tokens: int, max_num_seqs: int) -> list[pb.MemoryInfo]:
        """Every rank's MemoryInfo (all at once: a profiling forward holds collectives across the ranks)."""
        futures = [self._pool.submit(c.determine_available_memory, block_size, requested, utilization,
                                     max_num_batched_tokens, max_num_seqs) for c in self.clients]
        return [f.result() for f in futures]

    def run_dummy_batch(self, timeout: float) -> None:
        """This engine's part of a step it has nothing for, on every rank (experts over data-parallel engines)."""
        self.call_all(lambda c: c.run_dummy_batch(timeout), abort_on_error=True)

    def check_liveness(self, timeout: float) -> None:
        """Every rank runs a real one-token forward, all at once (a forward holds collectives across the ranks)."""
        def check(c: WorkerClient):
            try:
                c.check_liveness(timeout=timeout)
            except WorkerError as e:
                if e.code is None or e.code.name != "UNIMPLEMENTED":
                    raise
                c.describe(timeout=5.0)

        self.call_all(check)
