"""What ms_rpc serves of vLLM's options: every engine flag and request field that reaches the executor works or is
refused here, with one line naming it and ms_rpc (the README's table lists them all).

Flags are checked when vLLM resolves the executor class (plugin.py), before anything starts; request fields when
vLLM validates a request (the platform's validate_request, wrapped in plugin.py): a refused request gets a 400
alone.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError

from ms_rpc.v1 import SPEC_METHOD_NGRAM

# engine flag -> (how to read it from a VllmConfig: refused when truthy, why)
_FLAGS = {
    "--enable-prompt-embeds": (lambda c: c.model_config.enable_prompt_embeds,
                               "the workers take token ids only"),
    "--kv-transfer-config": (lambda c: c.kv_transfer_config is not None,
                             "the KV cache lives in the workers, out of reach of vLLM's KV connectors"),
    "--ec-transfer-config": (lambda c: c.ec_transfer_config is not None, "no encoder cache in the workers"),
    "--logits-processors": (lambda c: bool(c.model_config.logits_processors),
                            "custom logits processors run in vLLM's model runner, which ms_rpc replaces"),
    "--default-mm-loras": (lambda c: c.lora_config is not None and bool(c.lora_config.default_mm_loras),
                           "the workers take no multimodal inputs"),
    "--watermark-config": (lambda c: c.watermark_config is not None,
                           "the workers' sampler does not watermark"),
    "--enable-trace-replay": (lambda c: c.model_config.enable_trace_replay, "the workers do not replay traces"),
    "--return-sampling-mask": (lambda c: c.model_config.return_sampling_mask,
                               "the workers return no sampling masks"),
}

# SamplingParams field -> why it is refused when set (not None)
_FIELDS = {
    "prompt_logprob_token_ids": "the workers return the top-N prompt logprobs, not those of chosen tokens",
    "prompt_logprob_start": "the workers return prompt logprobs from the first position",
    "thinking_token_budget": "the workers' sampler does not enforce a thinking budget",
}


class UnsupportedOption(ValueError):
    pass


def check_engine_config(vllm_config) -> None:
    """Raises UnsupportedOption naming the first flag ms_rpc cannot serve."""
    dtype = vllm_config.cache_config.cache_dtype
    if dtype not in ("auto", None):
        raise UnsupportedOption(f"--kv-cache-dtype {dtype} is not supported by --distributed-executor-backend "
                                f"ms_rpc: the workers keep the KV cache in the model's compute dtype; use "
                                f"--kv-cache-dtype auto")
    spec = vllm_config.speculative_config
    if spec is not None and spec.method != SPEC_METHOD_NGRAM:
        raise UnsupportedOption(f"--speculative-config method {spec.method!r} is not supported by "
                                f"--distributed-executor-backend ms_rpc: the workers draft by n-gram lookup in the "
                                f"request's own tokens; supported: {SPEC_METHOD_NGRAM}")
    for flag, (is_set, why) in _FLAGS.items():
        if is_set(vllm_config):
            raise UnsupportedOption(f"{flag} is not supported by --distributed-executor-backend ms_rpc: {why}")
    # vLLM's model runner also loads every logits processor an installed package registers, without a flag
    from importlib.metadata import entry_points

    from vllm.v1.sample.logits_processor import LOGITSPROCS_GROUP

    plugins = sorted(f"{e.name} = {e.value}" for e in entry_points(group=LOGITSPROCS_GROUP))
    if plugins:
        raise UnsupportedOption(f"logits processor plugins (entry point group {LOGITSPROCS_GROUP}: "
                                f"{', '.join(plugins)}) are not supported by --distributed-executor-backend ms_rpc: "
                                f"{_FLAGS['--logits-processors'][1]}; uninstall them")


def check_request(params) -> None:
    """Raises vLLM's VLLMValidationError (a 400 for this request alone) naming the first field ms_rpc cannot
    serve."""
    for name, why in _FIELDS.items():
        if getattr(params, name, None) is not None:
            raise VLLMValidationError(f"{name} is not supported by ms_rpc: {why}", parameter=name)
