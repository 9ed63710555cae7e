"""Qwen2MoeForCausalLM in MindSpore: Qwen2 attention (q/k/v bias from qkv_bias, no o bias) and routed
experts (ms_models.moe) plus a shared expert gated by sigmoid(h @ shared_expert_gate), in the layers
decoder_sparse_step / mlp_only_layers make sparse (the others dense)."""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderModel
from .layers import DeviceOps
from .moe import QWEN_EXPERTS, build_moe_decoder

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "Qwen2MoeForCausalLM", cfg.architecture
    return build_moe_decoder(cfg, weights, dev, QWEN_EXPERTS)
