"""LlamaForCausalLM (Llama 2/3 incl. llama3 RoPE scaling, SmolLM2, TinyLlama, ...) in MindSpore.

Optional ``attention_bias`` (q/k/v/o) and ``mlp_bias``; tied or untied embeddings.
"""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderLayer, DecoderModel, build_decoder
from .layers import DeviceOps

__all__ = ["LlamaDecoderLayer", "LlamaModel", "build_network"]

LlamaDecoderLayer = DecoderLayer
LlamaModel = DecoderModel


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "LlamaForCausalLM", cfg.architecture
    assert not cfg.qk_norm and cfg.sliding_window is None and cfg.attention_bias == cfg.o_bias
    return build_decoder(cfg, weights, dev)
