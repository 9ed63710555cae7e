"""A conformance kit for the ms_rpc.v1 contract: `python -m ms_rpc.conformance HOST:PORT [--model DIR]`.

It drives one running worker over gRPC with hand-built messages, as a front would (Describe ->
DetermineAvailableMemory -> InitializeCache -> Warmup -> numbered steps), and prints one line per check (`PASS
name` or `FAIL name: why`), then `N passed, M failed`; exit status 0 only when none failed. Expected tokens are
the worker's own (the same request with and without chunking, preemption or a prefix hit), never fixed values.

Run it against a freshly started worker that no front uses: it checks the calls a worker must refuse before its
KV cache exists, then initialises a small cache of its own. Needs grpcio, protobuf and numpy only.
"""
