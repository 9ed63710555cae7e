"""The floor under the wire's cost: a bare gRPC Python unary round trip on loopback, nothing else.

An echo method (generic handler, bytes in, the same bytes out) served by a separate process, as a worker serves
(a thread-pool grpc.server, as ms_worker; with ``--aio-server`` a grpc.aio server instead), called back to back from
one client thread: blocking (``stub(msg)``) and as a future resolved at once (``stub.future(msg).result()``, what
the executor's step pipeline does so that several ranks, or two steps, can be in flight), and from a grpc.aio
client. Message sizes bracket a step at 64 sequences (the executor's encoded Execute request and StepResult are a
few KB). Prints the median and mean round trip per size and call style; compare with the executor's "encode +
transfer + decode" per step (scripts/bench.py's step breakdown), measured on the same host. With ``--gap-ms G``
the client sleeps G ms before each call, as the front waits for a device step: both processes' threads are asleep
when the call comes, and a host whose idle CPUs halt (a VM) pays their wake-ups on every call.

Usage: .venv/bin/python scripts/grpc_rtt.py [--sizes 200,4000,20000] [--calls 1500] [--aio-server] [--gap-ms G]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import statistics
import time
from concurrent import futures

import grpc

SERVICE, METHOD = "rtt.Echo", "/rtt.Echo/Echo"


def _serve_threads(port_q) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": echo}),))
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _serve_aio(port_q) -> None:
    async def echo(request, context):
        return request

    async def main():
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
        port_q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def round_trips(stub, msg: bytes, calls: int, as_future: bool, gap_s: float) -> list[float]:
    for _ in range(100):  # warm-up
        stub(msg)
    out = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t = time.perf_counter()
        if as_future:
            stub.future(msg).result()
        else:
            stub(msg)
        out.append(time.perf_counter() - t)
    return out


async def aio_round_trips(port: int, msg: bytes, calls: int, gap_s: float) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(METHOD)
        for _ in range(100):
            await stub(msg)
        out = []
        for _ in range(calls):
            if gap_s:
                await asyncio.sleep(gap_s)
            t = time.perf_counter()
            await stub(msg)
            out.append(time.perf_counter() - t)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,4000,20000", help="message sizes in bytes, comma-separated")
    ap.add_argument("--calls", type=int, default=1500, help="timed round trips per size and call style")
    ap.add_argument("--aio-server", action="store_true", help="serve with grpc.aio instead of a thread pool")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="idle time before each call, as a device step (ms)")
    a = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=_serve_aio if a.aio_server else _serve_threads, args=(port_q,), daemon=True)
    server.start()
    port = port_q.get(timeout=60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary(METHOD)
    kind = "grpc.aio" if a.aio_server else "thread-pool"
    print(f"grpc {grpc.__version__}, {platform.processor() or platform.machine()}; {kind} server in its own process; "
          f"round trip in ms{f', {a.gap_ms:g} ms idle before each call' if a.gap_ms else ''}")
    try:
        for size in (int(s) for s in a.sizes.split(",") if s):
            msg = b"x" * size
            gap = a.gap_ms / 1000
            styles = [("blocking", round_trips(stub, msg, a.calls, False, gap)),
                      ("future", round_trips(stub, msg, a.calls, True, gap)),
                      ("aio", asyncio.run(aio_round_trips(port, msg, a.calls, gap)))]
            for style, ts in styles:
                print(f"size {size:6d} B  {style:8s}  median {statistics.median(ts) * 1e3:.3f}  "
                      f"mean {statistics.mean(ts) * 1e3:.3f}", flush=True)
    finally:
        channel.close()
        server.kill()


if __name__ == "__main__":
    main()
