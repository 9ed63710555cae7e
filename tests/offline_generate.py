"""Greedy generation with vLLM's offline API, for comparing backends. Prints one JSON list of token id lists.

usage: offline_generate.py MODEL BACKEND PROMPTS_JSON MAX_NEW [--skip-tokenizer-init] [--max-model-len N]
                           [--kv-cache-mib N] [--also MODEL2 ...] [--engine-args JSON] [--variants JSON]
                           [--loras JSON]
                                                                            (BACKEND: native | ms_rpc)

--skip-tokenizer-init: the model directory has no tokenizer (prompts are token ids; outputs are not detokenized).
--max-model-len: vLLM's max_model_len (default 512).
--kv-cache-mib: KV cache size for either backend (default 512 MiB).
--also: more models, run one after another in this process (one engine each, the same prompts), saving the
        start-up of a Python process per model (and, unless VLLM_ENABLE_V1_MULTIPROCESSING is set, of an engine
        core process: the engines run in this process). One RESULT line is printed per model, MODEL first.
--engine-args: more keyword arguments of vllm.LLM, e.g. '{"tensor_parallel_size": 2}'.
--variants: a list of such dicts; every model is run once per variant (on top of --engine-args), one engine after
        another in this process as with --also, one RESULT line each (model-major order).
--loras: one LoRA adapter directory (or null: the base model) per prompt, each passed as the prompt's
         LoRARequest (named after its directory, ids from 1 in order of first use); vLLM loads them on demand.
"""

import argparse
import gc
import json
import os

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("backend", choices=["native", "ms_rpc"])
    ap.add_argument("prompts", type=json.loads)
    ap.add_argument("max_new", type=int)
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-mib", type=int, default=0)
    ap.add_argument("--also", action="append", default=[])
    ap.add_argument("--engine-args", type=json.loads, default={})
    ap.add_argument("--variants", type=json.loads, default=[{}])
    ap.add_argument("--loras", type=json.loads, default=None)
    a = ap.parse_args()
    runs = [(m, {**a.engine_args, **v}) for m in [a.model, *a.also] for v in a.variants]
    if len(runs) > 1:  # several engines one after another: run each engine core in this process (no process start-up)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams, TokensPrompt

    for model, engine_args in runs:
        kwargs = dict(model=model, dtype="float32", max_model_len=a.max_model_len, enforce_eager=True, seed=0)
        if a.skip_tokenizer_init:
            kwargs["skip_tokenizer_init"] = True
        # The same explicit cache for both backends (vLLM's default, 0.92 of host RAM, is for serving)
        kwargs["kv_cache_memory_bytes"] = (a.kv_cache_mib or 512) * 2**20
        if a.backend == "ms_rpc":
            kwargs["distributed_executor_backend"] = "ms_rpc"
        else:
            kwargs["gpu_memory_utilization"] = 0.2
        llm = LLM(**kwargs, **engine_args)
        params = SamplingParams(temperature=0, max_tokens=a.max_new, ignore_eos=True,
                                detokenize=not a.skip_tokenizer_init)
        loras = None
        if a.loras is not None:
            from vllm.lora.request import LoRARequest

            ids = {d: i + 1 for i, d in enumerate(dict.fromkeys(d for d in a.loras if d))}
            loras = [d and LoRARequest(os.path.basename(d), ids[d], d) for d in a.loras]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in a.prompts], params, use_tqdm=False,
                            lora_request=loras)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
        if len(runs) > 1:  # stop this engine (and its ms_rpc worker) before starting the next
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
