"""The MindSpore worker: a gRPC service that owns the weights, the paged KV cache and per-request state.

Never imports torch or vllm.
"""

from ms_models.kernels import set_omp_wait_policy

set_omp_wait_policy()  # before anything in this process imports MindSpore
