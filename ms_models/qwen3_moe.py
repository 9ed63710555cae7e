"""Qwen3MoeForCausalLM in MindSpore: Qwen3 attention (q/k RMSNorm per head, optional attention_bias) and
routed experts (ms_models.moe) in the layers decoder_sparse_step / mlp_only_layers make sparse (the others
dense); norm_topk_prob from the config."""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderModel
from .layers import DeviceOps
from .moe import QWEN_EXPERTS, build_moe_decoder

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "Qwen3MoeForCausalLM", cfg.architecture
    return build_moe_decoder(cfg, weights, dev, QWEN_EXPERTS)
