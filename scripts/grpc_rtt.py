"""The floor under the wire's cost: a bare gRPC Python unary round trip on loopback, nothing else.

An echo method (generic handler, bytes in, the same bytes out) on a grpc.server with a thread pool, as the workers
serve, called back to back from one client thread: blocking (``stub(msg)``) and as a future resolved at once
(``stub.future(msg).result()``, what the executor's step pipeline does so that several ranks, or two steps, can be
in flight). Message sizes bracket a step at 64 sequences (the executor's encoded Execute request and StepResult
are a few KB). Prints the median and mean round trip per size and call style; compare with the executor's
"encode + transfer + decode" per step (scripts/bench.py's step breakdown), measured on the same host.

Usage: .venv/bin/python scripts/grpc_rtt.py [--sizes 200,4000,20000] [--calls 1500]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from concurrent import futures

import grpc


def serve() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rtt.Echo", {"Echo": echo}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def round_trips(stub, msg: bytes, calls: int, as_future: bool) -> list[float]:
    for _ in range(100):  # warm-up
        stub(msg)
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        if as_future:
            stub.future(msg).result()
        else:
            stub(msg)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,4000,20000", help="message sizes in bytes, comma-separated")
    ap.add_argument("--calls", type=int, default=1500, help="timed round trips per size and call style")
    a = ap.parse_args()
    server, port = serve()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary("/rtt.Echo/Echo")
    print(f"grpc {grpc.__version__}, {platform.processor() or platform.machine()}; round trip in ms")
    for size in (int(s) for s in a.sizes.split(",") if s):
        for as_future in (False, True):
            ts = round_trips(stub, b"x" * size, a.calls, as_future)
            style = "future" if as_future else "blocking"
            print(f"size {size:6d} B  {style:8s}  median {statistics.median(ts) * 1e3:.3f}  "
                  f"mean {statistics.mean(ts) * 1e3:.3f}", flush=True)
    channel.close()
    server.stop(None)


if __name__ == "__main__":
    main()
