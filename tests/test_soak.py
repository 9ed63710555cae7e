"""Soak, bounded: 32 concurrent streaming clients with random lengths and random cancellations against the
real server (scripts/soak.py; SOAK_S seconds, 90 by default here, 600 for the full run). Every token is
checked against the greedy reference; nothing may be lost, duplicated, reordered, left running or left
holding KV blocks, and the worker's RSS must stay flat after warm-up (the slope is printed)."""

from __future__ import annotations

import os
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402

# Worker memory after the warm-up round: the worker compiles all its graphs (one per token bucket) in warm-up and
# none while serving, so RSS stays flat.
GROWTH_LIMIT_MIB = 40       # less than one compiled graph


def test_soak_streams_with_cancellations(default_model, tmp_path):
    f = soak.run(float(os.environ.get("SOAK_S", "90")), clients=32, cancel=0.25,
                 log_path=str(tmp_path / "serve.log"))
    assert f["completed"] > 32 and f["cancelled"] > 0, f
    assert f["mismatches"] == 0 and f["errors"] == 0 and f["exceptions"] == 0 and f["hung_clients"] == 0, f
    assert f["vllm_requests_running_end"] == 0 and f["vllm_kv_usage_end"] == 0, f
    assert f["worker_requests_active_end"] == 0 and f["worker_kv_blocks_used_end"] == 0, f
    assert f["graphs_compiled_after_warmup"] == 0, f
    growth = f["worker_rss_end_mib"] - f["worker_rss_start_mib"]
    assert growth <= GROWTH_LIMIT_MIB, f
