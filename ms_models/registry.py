"""Maps HF ``architectures`` names to MindSpore implementations.

Pure Python: importing this module does not import MindSpore.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable

__all__ = ["UnsupportedModelError", "SUPPORTED_ARCHITECTURES", "resolve_architecture", "get_builder"]


class UnsupportedModelError(ValueError):
    """The model (architecture or one of its features) is not implemented by ms_models."""


# architecture name -> "module:function"; the function builds the network Cell:
#   build(config: ModelConfig, weights: WeightSource, ops_set: layers.DeviceOps) -> nn.Cell
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "ms_models.llama:build_network",
    "MistralForCausalLM": "ms_models.mistral:build_network",
    "Qwen2ForCausalLM": "ms_models.qwen2:build_network",
    "Qwen3ForCausalLM": "ms_models.qwen3:build_network",
    "MixtralForCausalLM": "ms_models.mixtral:build_network",
    "Qwen2MoeForCausalLM": "ms_models.qwen2_moe:build_network",
    "Qwen3MoeForCausalLM": "ms_models.qwen3_moe:build_network",
    "DeepseekV2ForCausalLM": "ms_models.deepseek_v2:build_network",
    "DeepseekV3ForCausalLM": "ms_models.deepseek_v3:build_network",
}


def resolve_architecture(architectures: Iterable[str]) -> str:
    """Returns the first supported name in ``architectures`` or raises UnsupportedModelError."""
    archs = [a for a in (architectures or []) if isinstance(a, str)]
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    got = ", ".join(archs) if archs else "none listed in config.json 'architectures'"
    raise UnsupportedModelError(
        f"unsupported model architecture ({got}); ms_models supports: "
        + ", ".join(sorted(SUPPORTED_ARCHITECTURES)))


def get_builder(architecture: str) -> Callable:
    target = SUPPORTED_ARCHITECTURES.get(architecture)
    if target is None:
        resolve_architecture([architecture])  # raises with the supported list
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)
