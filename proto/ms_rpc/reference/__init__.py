"""A reference worker for the ms_rpc.v1 contract, written with numpy alone (no MindSpore, no torch):
`python -m ms_rpc.reference serve --model DIR --port P [--simulate-step-ms MS]`.

It is a second, independent implementation of what the contract asks of a worker: dense decoder models (Llama,
Mistral, Qwen2, Qwen3) in float32 over a paged KV cache, per-request state applied from each step's deltas, and a
sampler with logprobs. Slow, but exact. With --simulate-step-ms it runs no model and answers each step after that
many milliseconds with deterministic tokens (a stand-in for a fast accelerator).
"""
