"""MindSpore implementations of HF decoder-only LLMs with a paged KV cache.

Architectures (``SUPPORTED_ARCHITECTURES``): LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, and the mixture-of-experts MixtralForCausalLM,
Qwen2MoeForCausalLM, Qwen3MoeForCausalLM: one module each over the shared decoder
(``decoder.py``), blocks (``layers.py``) and MoE layer (``moe.py``).

    from ms_models import load_model, ModelConfig, UnsupportedModelError
    model = load_model(model_dir, device="cpu", use_jit=True)   # -> CausalLM
    model.allocate_kv_cache(num_blocks, block_size, max_num_seqs, max_model_len, max_num_batched_tokens)
    logits = model.forward(FlatBatch(...))   # ms_models.batch: one step's tokens, flat

Importing this package does not import MindSpore (``ModelConfig``/``UnsupportedModelError``
are pure Python, usable by the front); ``load_model`` imports it and calls
``ms_models.runtime.setup(device)``. Never imports torch or vllm.
"""
from .config import ModelConfig
from .registry import SUPPORTED_ARCHITECTURES, UnsupportedModelError

__all__ = ["load_model", "ModelConfig", "UnsupportedModelError", "SUPPORTED_ARCHITECTURES", "CausalLM"]


def load_model(model_dir: str, device: str = "cpu", use_jit: bool = True, **options):
    """Loads a HF model directory (config.json + safetensors); see ms_models.loader.load_model (its options:
    threads, tp_rank, tp_size, dtype, kernels)."""
    from .loader import load_model as _load

    return _load(model_dir, device=device, use_jit=use_jit, **options)


def __getattr__(name):
    if name == "CausalLM":
        from .model import CausalLM

        return CausalLM
    raise AttributeError(name)
