"""The MindSpore worker: a gRPC service that owns the weights, the paged KV cache and per-request state.

Never imports torch or vllm.
"""
