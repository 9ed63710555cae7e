"""`python -m ms_rpc.conformance HOST:PORT [--model DIR]`: run every check against one worker."""

from __future__ import annotations

import argparse
import sys

from ms_rpc.v1 import MAX_MESSAGE_MB

from . import bounds, handshake, messages, sampling, steps
from .report import Report
from .session import Session
from .wire import Wire


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ms_rpc.conformance", description=__doc__)
    ap.add_argument("address", metavar="HOST:PORT", help="a freshly started worker (plaintext, no token)")
    ap.add_argument("--model", metavar="DIR", help="the HF checkpoint the worker serves: its config.json is checked "
                                                   "against Describe")
    ap.add_argument("--max-message-mb", type=int, default=MAX_MESSAGE_MB,
                    help=f"the worker's message size limit in MiB (default {MAX_MESSAGE_MB})")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="deadline of each call (Warmup: 30 min)")
    args = ap.parse_args(argv)

    wire = Wire(args.address, args.max_message_mb, args.timeout_s)
    s = Session(wire)
    s.model_dir = args.model
    report = Report()
    checks = (handshake.BEFORE_CACHE + (handshake.MODEL_DIR if args.model else []) + handshake.AFTER_CACHE
              + steps.CHECKS + bounds.CHECKS + sampling.CHECKS + messages.CHECKS)
    try:
        for name, fn in checks:
            if not report.run(name, fn, s):
                s.resync()
        s.resync()
    finally:
        wire.close()
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
