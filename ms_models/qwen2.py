"""Qwen2ForCausalLM (Qwen2, Qwen2.5) in MindSpore: Llama layout with a bias on q/k/v (not on o_proj)
and no MLP bias. Sliding-window layers (``use_sliding_window``) are served when every layer uses
the window; a mix is refused by the config (UnsupportedModelError)."""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderModel, build_decoder
from .layers import DeviceOps

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "Qwen2ForCausalLM", cfg.architecture
    assert cfg.attention_bias and not cfg.o_bias and not cfg.mlp_bias and not cfg.qk_norm
    return build_decoder(cfg, weights, dev)
