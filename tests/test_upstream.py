"""vLLM's own tests (the installed release's sdist) pass on ms_rpc wherever they pass on native vLLM CPU:
scripts/vllm_upstream_tests.py with its quick selection (logprobs: all four modes, the whole vocabulary, prompt
logprobs over 16-token prefill chunks) exits 0 only when no test fails on ms_rpc alone."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_vllm_upstream_quick_selection_has_no_ms_rpc_only_failure(default_model):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_upstream_tests.py"), "--select", "quick"],
                         capture_output=True, text=True, timeout=1500)
    summary = re.search(r"^(\d+) tests: both pass (\d+), ms_rpc only fails (\d+), native only fails (\d+), "
                        r"both fail (\d+)$", out.stdout, re.M)
    assert summary, f"no summary line:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    total, ours_only = int(summary.group(1)), int(summary.group(3))
    assert ours_only == 0 and out.returncode == 0, out.stdout
    assert total >= 10, out.stdout     # the selection ran (not collected empty or all skipped)
