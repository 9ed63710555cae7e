"""Run sampling cases through vLLM's offline API; print one JSON result (tokens and logprobs per case).

usage: offline_sampling.py MODEL BACKEND LOGPROBS_MODE CASES_JSON
  CASES_JSON: [{"prompt": [ids], "params": {SamplingParams kwargs}, "batch": 0}, ...] ("batch" optional)
With BACKEND ms_rpc, the seeded cases also run a second time alone, to check batch independence.
"""

import json
import sys

from vllm import LLM, SamplingParams, TokensPrompt


def run(llm, cases):
    """Each case's result, in order; the cases of each "batch" (0 unless given) are generated together, apart from
    the others (vLLM's sampler gives every request of a batch logprob_token_ids' layout when one asks for it, so
    those cases run in their own batch)."""
    res = [None] * len(cases)
    for b in sorted({c.get("batch", 0) for c in cases}):
        idx = [i for i, c in enumerate(cases) if c.get("batch", 0) == b]
        for i, r in zip(idx, run_batch(llm, [cases[i] for i in idx])):
            res[i] = r
    return res


def run_batch(llm, cases):
    prompts = [TokensPrompt(prompt_token_ids=c["prompt"]) for c in cases]
    params = []
    for c in cases:
        kw = dict(c["params"])
        if "logit_bias" in kw:                     # JSON keys are strings
            kw["logit_bias"] = {int(k): v for k, v in kw["logit_bias"].items()}
        params.append(SamplingParams(**kw))
    outs = llm.generate(prompts, params, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        lps = None
        if c.logprobs is not None:
            lps = [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]
        plps = None
        if o.prompt_logprobs is not None:
            plps = [None if step is None else {str(t): lp.logprob for t, lp in step.items()}
                    for step in o.prompt_logprobs]
        res.append({"tokens": list(c.token_ids), "logprobs": lps, "prompt_logprobs": plps})
    return res


if __name__ == "__main__":
    model, backend, mode, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    kwargs = dict(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0, logprobs_mode=mode,
                  max_num_batched_tokens=64,      # long prompts arrive in chunks
                  max_logprobs=-1)                # logprobs=-1 (the whole vocabulary) allowed
    kwargs["kv_cache_memory_bytes"] = 512 * 2**20        # both backends (vLLM's default is 0.92 of host RAM)
    if backend == "ms_rpc":
        kwargs["distributed_executor_backend"] = "ms_rpc"
    else:
        kwargs["gpu_memory_utilization"] = 0.2
    llm = LLM(**kwargs)
    out = {"batched": run(llm, cases)}
    seeded = [c for c in cases if c["params"].get("seed") is not None]
    if backend == "ms_rpc" and seeded:
        out["alone"] = [run(llm, [c])[0] for c in seeded]
    print("RESULT " + json.dumps(out))
