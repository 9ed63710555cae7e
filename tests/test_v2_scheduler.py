"""vLLM's scheduler in its V2-model-runner shape, with ms_rpc: a preempted request resumes as a *new* request (a
known id, all its tokens in prefill_token_ids, its whole block table), not as a resumed cached one. The executor
sends it to the worker as the resumed request it is (codec.encode_step); the worker would refuse a new request
with a known id.

vLLM selects the V2 model runner only with Triton, which this CPU install lacks (VLLM_USE_V2_MODEL_RUNNER=1 stops
its config), so the real engine runs in this process and its scheduler's `use_v2_model_runner` flag, the one that
switches the shape, is set on the instance. A KV cache of 20 blocks of 16 makes the eight prompts preempt each
other; every greedy token must equal HF's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import PROMPTS, ROOT, hf_greedy

MAX_NEW = 32

_RUN = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model=sys.argv[1], dtype="float32", distributed_executor_backend="ms_rpc", max_model_len=288,
              block_size=16, num_gpu_blocks_override=20, max_num_batched_tokens=64, max_num_seqs=8,
              enforce_eager=True)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    sched.use_v2_model_runner = True
    seen, resumed_as_new = set(), []
    schedule = sched.schedule
    def schedule_and_record(*args, **kwargs):
        so = schedule(*args, **kwargs)
        for r in so.scheduled_new_reqs:
            if r.req_id in seen:
                resumed_as_new.append(r.req_id)
            seen.add(r.req_id)
        return so
    sched.schedule = schedule_and_record
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(sys.argv[2])],
                        SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), ignore_eos=True), use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "finish": [o.outputs[0].finish_reason for o in outs],
                                  "resumed_as_new": len(resumed_as_new)}), flush=True)
""")


def test_requests_resumed_as_new_match_hf(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    out = subprocess.run([sys.executable, "-c", _RUN, str(default_model), json.dumps(prompt_ids), str(MAX_NEW)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["resumed_as_new"] > 0, "the small KV cache should preempt and resume requests"
    assert got["finish"] == ["length"] * len(PROMPTS), got["finish"]
    expected = hf_greedy(default_model, prompt_ids, MAX_NEW)
    for i, (g, e) in enumerate(zip(got["tokens"], expected)):
        assert g == e, f"prompt {i} ({PROMPTS[i][:30]!r}): {g} != {e}"
