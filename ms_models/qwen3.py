"""Qwen3ForCausalLM in MindSpore: Llama layout plus an RMSNorm over each head of q and k
(weights ``self_attn.q_norm`` / ``k_norm``, size head_dim) before RoPE; optional
``attention_bias`` (q/k/v/o), no MLP bias; ``head_dim`` may differ from hidden/heads."""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderModel, build_decoder
from .layers import DeviceOps

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "Qwen3ForCausalLM", cfg.architecture
    assert cfg.qk_norm and not cfg.mlp_bias and cfg.attention_bias == cfg.o_bias
    return build_decoder(cfg, weights, dev)
