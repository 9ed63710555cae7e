"""Greedy generation with vLLM's offline API, for comparing backends. Prints one JSON list of token id lists.

usage: offline_generate.py MODEL BACKEND PROMPTS_JSON MAX_NEW   (BACKEND: native | ms_rpc)
"""

import json
import sys

from vllm import LLM, SamplingParams, TokensPrompt

if __name__ == "__main__":
    model, backend, prompts, max_new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    kwargs = dict(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    if backend == "ms_rpc":
        kwargs["distributed_executor_backend"] = "ms_rpc"
    else:
        kwargs["gpu_memory_utilization"] = 0.2
        kwargs["kv_cache_memory_bytes"] = 512 * 2**20
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
