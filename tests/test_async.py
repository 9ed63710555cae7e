"""vLLM's async scheduling on ms_rpc (--async-scheduling): the engine schedules step N+1 while the worker runs step
N, so two steps are in flight; the worker applies N+1 after N, continuing from the tokens it sampled in N.
Greedy tokens stay exactly HF transformers' (the reference), and the steps really overlapped."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import PROMPTS, ROOT, hf_greedy

MAX_NEW = 24


def test_async_scheduling_greedy_tokens_match_hf(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "offline_generate.py"), str(default_model), "ms_rpc",
                          json.dumps(prompt_ids), str(MAX_NEW), "--async-scheduling"],
                         capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"ms_rpc failed:\n{out.stderr[-4000:]}"
    ours = json.loads(lines[-1][len("RESULT "):])
    overlap = re.search(r"async scheduling: (\d+) of (\d+) steps were sent while the previous one was in flight",
                        out.stdout)   # vLLM's log goes to stdout
    assert overlap, f"no async scheduling summary in the log:\n{out.stdout[-3000:]}"
    overlapped, steps = map(int, overlap.groups())
    assert steps >= MAX_NEW and overlapped >= steps // 2, overlap.group(0)
    want = hf_greedy(default_model, prompt_ids, MAX_NEW)
    for i, (a, b) in enumerate(zip(ours, want)):
        assert a == b, f"prompt {i} ({PROMPTS[i][:30]!r}): ms_rpc async {a} != HF {b}"
