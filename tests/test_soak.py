"""Soak, bounded: 32 concurrent streaming clients with random lengths and random cancellations against the
real server (scripts/soak.py; SOAK_S seconds, 90 by default here, 600 for the full run). Every token is
checked against the greedy reference; nothing may be lost, duplicated, reordered, left running or left
holding KV blocks, and the worker's RSS must not keep growing after warm-up."""

from __future__ import annotations

import os
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402

# After the warm-up round the worker's RSS may still move while rarer batch shapes compile or leave the graph
# cache (a 90 s run measured +23 MiB/min); a leak per request or per step grows far faster (the unbounded graph
# memory this cache replaced grew about 1,000 MiB/min in the same test).
MAX_SLOPE_MIB_PER_MIN = float(os.environ.get("SOAK_MAX_SLOPE_MIB_PER_MIN", "60"))


def test_soak_streams_with_cancellations(default_model, tmp_path):
    f = soak.run(float(os.environ.get("SOAK_S", "90")), clients=32, cancel=0.25,
                 log_path=str(tmp_path / "serve.log"))
    assert f["completed"] > 32 and f["cancelled"] > 0, f
    assert f["mismatches"] == 0 and f["errors"] == 0 and f["exceptions"] == 0 and f["hung_clients"] == 0, f
    assert f["vllm_requests_running_end"] == 0 and f["vllm_kv_usage_end"] == 0, f
    assert f["worker_requests_active_end"] == 0 and f["worker_kv_blocks_used_end"] == 0, f
    assert f["worker_rss_slope_mib_per_min"] <= MAX_SLOPE_MIB_PER_MIN, f
