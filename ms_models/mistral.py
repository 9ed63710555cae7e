"""MistralForCausalLM in MindSpore: Llama layout without biases; when the config sets
``sliding_window`` every layer attends to the last ``sliding_window`` positions only
(key j is visible to the query at position i iff i - sliding_window < j <= i, as in HF)."""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderModel, build_decoder
from .layers import DeviceOps

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "MistralForCausalLM", cfg.architecture
    assert not (cfg.attention_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm)
    return build_decoder(cfg, weights, dev)
