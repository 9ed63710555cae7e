"""Checks of the wire itself: a message over the worker's size limit gets RESOURCE_EXHAUSTED and one just under it
is read; bytes that do not parse as the method's message get INVALID_ARGUMENT; neither changes anything."""

from __future__ import annotations

import grpc

from ms_rpc.v1 import PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb

from .report import expect
from .session import Session
from .wire import unknown_field

N = 2


def size_limit(s: Session) -> None:
    """Describe and a step padded (with a field no message defines, which parsers skip) past the limit are
    refused; the same step unpadded, and Describe padded to just under the limit, are served."""
    limit = s.wire.max_message_bytes
    describe = pb.DescribeRequest(protocol_version=PROTOCOL_VERSION).SerializeToString()
    s.expect_refused("Describe", describe + unknown_field(limit), grpc.StatusCode.RESOURCE_EXHAUSTED,
                     f"a Describe of {limit} bytes and more")
    info = s.wire.call("Describe", describe + unknown_field(limit - len(describe) - 64))
    expect(info.worker_id == s.info.worker_id, "Describe just under the size limit answered for another worker")
    p = s.prompt(12, seed=41)
    want = s.reference(p, N)
    r = s.new_req(p)
    msg, commit = s.build([(r, r.remaining)])
    try:
        s.expect_refused("Execute", msg.SerializeToString() + unknown_field(limit),
                         grpc.StatusCode.RESOURCE_EXHAUSTED, f"step {msg.step_id} over the size limit")
    finally:
        commit(None)
    s.generate(r, N)
    expect(r.out == want, f"after an oversized step was refused, the same request gave {r.out}, alone {want}")


def malformed(s: Session) -> None:
    """Bytes that are not a StepRequest (a truncated one, and garbage) get INVALID_ARGUMENT and change nothing."""
    p = s.prompt(12, seed=41)
    want = s.reference(p, N)
    r = s.new_req(p)
    msg, commit = s.build([(r, r.remaining)])
    raw = msg.SerializeToString()
    try:
        for what, bad in [("a truncated StepRequest", raw[:len(raw) // 2]),
                          ("garbage bytes", b"\xff\xff\xff\xff\x0f")]:
            s.expect_refused("Execute", bad, grpc.StatusCode.INVALID_ARGUMENT, what)
    finally:
        commit(None)
    s.generate(r, N)
    expect(r.out == want, f"after malformed steps were refused, the same request gave {r.out}, alone {want}")


CHECKS = [
    ("message.size_limit", size_limit),
    ("message.malformed", malformed),
]
