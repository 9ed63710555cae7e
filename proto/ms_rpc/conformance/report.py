"""Runs the checks in order and prints one line per check: `PASS name` or `FAIL name: why`, then `N passed, M
failed`."""

from __future__ import annotations

import sys


class CheckFailed(AssertionError):
    """A check's finding: the worker did not do what the contract says."""


def expect(cond: bool, why: str) -> None:
    if not cond:
        raise CheckFailed(why)


class Report:
    def __init__(self, out=sys.stdout):
        self.out = out
        self.passed: list[str] = []
        self.failed: list[str] = []

    def run(self, name: str, fn, *args) -> bool:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any exception is this check's failure, the next check still runs
            why = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
            self.failed.append(name)
            print(f"FAIL {name}: {' '.join(why.split())}", file=self.out, flush=True)
            return False
        self.passed.append(name)
        print(f"PASS {name}", file=self.out, flush=True)
        return True

    def summary(self) -> int:
        print(f"{len(self.passed)} passed, {len(self.failed)} failed", file=self.out, flush=True)
        return 1 if self.failed else 0
