"""vLLM's async scheduling on ms_rpc (`vllm serve --async-scheduling`): the engine schedules step N+1 while the
worker runs step N, so two steps are in flight; the worker applies N+1 after N, continuing from the tokens it
sampled in N. Through the real server, with chunked prefill, preemption (a small KV cache) and structured outputs
(whose steps are sampled by a later Sample call) in the same batches: greedy tokens stay exactly HF
transformers', every structured output is valid, and the steps really overlapped."""

from __future__ import annotations

import json
import re
import threading

from conftest import PROMPTS, Server, concurrent_greedy, hf_greedy

MAX_NEW = 24


def test_async_scheduling_serves_exact_tokens_with_two_steps_in_flight(default_model, tmp_path):
    import jsonschema
    import openai
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    log = tmp_path / "vllm_serve.log"
    s = Server(default_model, ["--async-scheduling", "--block-size", "16", "--max-num-batched-tokens", "64",
                               "--num-gpu-blocks-override", "20", "--max-model-len", "288", "--max-num-seqs", "8",
                               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
               env={"MS_RPC_STATS_INTERVAL_S": "1"}, log_path=log)
    try:
        s.wait_healthy()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                   "age": {"type": "integer"}}, "required": ["name", "age"]}
        structured: dict[str, str] = {}

        def constrained() -> None:
            r = client.chat.completions.create(
                model=str(default_model), temperature=0, max_tokens=40,
                messages=[{"role": "user", "content": "Describe a person as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
            structured["json"] = r.choices[0].message.content
            r = client.completions.create(model=str(default_model), prompt="Call me at", max_tokens=12,
                                          temperature=0, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
            structured["regex"] = r.choices[0].text

        side = threading.Thread(target=constrained)
        side.start()
        ours = concurrent_greedy(s.url, default_model, prompt_ids, MAX_NEW, stagger_s=0.3)
        side.join(600)
        assert not side.is_alive(), "the structured-output requests did not finish"
        jsonschema.validate(json.loads(structured["json"]), schema)
        assert re.fullmatch("[0-9]{3}-[0-9]{4}", structured["regex"]), structured["regex"]
    finally:
        s.stop()
    text = log.read_text(errors="replace")
    assert "async_scheduling" in text
    counts = re.findall(r"sent while the previous step was in flight: (\d+) of (\d+), waiting behind it "
                        r"([\d.]+)ms", text)
    assert counts, f"no step breakdown in the server log:\n{text[-3000:]}"
    overlapped, steps = (sum(int(c[i]) for c in counts) for i in (0, 1))
    assert steps >= MAX_NEW and overlapped >= steps // 2, f"{overlapped} of {steps} steps sent while one was in flight"
    # the worker reports the time a step sent early waited for the one ahead (StepTimings.wait_s): not the wire's
    assert max(float(c[2]) for c in counts) > 0, counts
    want = hf_greedy(default_model, prompt_ids, MAX_NEW)
    for i, (a, b) in enumerate(zip(ours, want)):
        assert a == b, f"prompt {i} ({PROMPTS[i][:30]!r}): ms_rpc with async scheduling {a} != HF {b}"
