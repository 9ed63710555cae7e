"""vLLM's own tests (the installed release's sdist) on ms_rpc: scripts/vllm_upstream_tests.py's smoke selection
(logprobs and prompt logprobs in every batch composition, the whole vocabulary), each case one that passes on
native vLLM CPU (the script's two-backend runs, README), must pass on ms_rpc. The two-backend comparison takes
~25 minutes here (native compiles each engine for ~85 s), so make test runs the ms_rpc side only."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_vllm_upstream_smoke_selection_passes_on_ms_rpc(default_model):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_upstream_tests.py"), "--select", "smoke",
                          "--backends", "ms_rpc"], capture_output=True, text=True, timeout=1500)
    rows = re.findall(r"^\| (v1/\S+) \| (\w+) \|$", out.stdout, re.M)
    assert len(rows) >= 5, f"the selection did not run:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    failed = [node for node, result in rows if result != "passed"]
    assert not failed, out.stdout
