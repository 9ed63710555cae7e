"""ms_rpc.v1, the wire contract. PROTOCOL_VERSION is the version both sides speak: the front sends it in every
request and checks the worker's Describe; the worker refuses any other. Additions within a version are optional
fields; a worker names the ones it implements in WorkerInfo.features (the FEATURE_* strings)."""

from ms_rpc.v1.worker_pb2 import PROTOCOL_VERSION_CURRENT as PROTOCOL_VERSION

SPEC_METHOD_NGRAM = "ngram"                     # the speculative method workers verify (vLLM's method name)
FEATURE_SPEC_DECODE_NGRAM = "spec_decode_ngram"  # drafts in the step, verified by the worker
FEATURE_STEPS_IN_FLIGHT = "steps_in_flight"      # a step call may arrive before its predecessor (STEP_ORDER_GRACE_S)
FEATURE_LORA = "lora"                            # LoRA adapters: LoadLora.., CacheConfig.lora, NewRequest.lora_id
FEATURE_LOGPROB_TOKEN_IDS = "logprob_token_ids"  # SamplingParams.logprob_token_ids: logprobs of chosen tokens
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT adapter's files, as LoadLora carries them
# A step call (Execute or Sample) that arrives before its predecessor was applied waits this long for it while no
# step runs (a front with two steps in flight sends them back to back), then is refused as out of order.
STEP_ORDER_GRACE_S = 2.0
ALL_LOGPROBS = 2**32 - 1  # SamplingParams.logprobs / prompt_logprobs for the whole vocabulary (vLLM's -1)
MAX_MESSAGE_MB = 64      # the default limit on one gRPC message, each way (worker --max-message-mb, front's client)

__all__ = ["PROTOCOL_VERSION", "SPEC_METHOD_NGRAM", "FEATURE_SPEC_DECODE_NGRAM", "FEATURE_STEPS_IN_FLIGHT",
           "FEATURE_LORA", "FEATURE_LOGPROB_TOKEN_IDS", "LORA_FILES", "STEP_ORDER_GRACE_S", "ALL_LOGPROBS",
           "MAX_MESSAGE_MB"]
