"""ms_rpc against vLLM's own native CPU backend: the same checkpoint, the same prompts, the same greedy tokens.

Both run through vLLM's offline API (`LLM.generate`, all prompts batched together), each in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROMPTS, ROOT

MAX_NEW = 32


def generate(model, backend: str, prompt_ids) -> list[list[int]]:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "offline_generate.py"), str(model), backend,
                          json.dumps(prompt_ids), str(MAX_NEW)], capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"{backend} failed:\n{out.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_greedy_tokens_identical_to_native_vllm_cpu(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = generate(default_model, "ms_rpc", prompt_ids)
    native = generate(default_model, "native", prompt_ids)
    assert len(ours) == len(native) == len(PROMPTS)
    for i, (a, b) in enumerate(zip(ours, native)):
        assert len(a) == MAX_NEW
        assert a == b, f"prompt {i} ({PROMPTS[i][:30]!r}): ms_rpc {a} != native {b}"
