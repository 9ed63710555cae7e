"""MixtralForCausalLM in MindSpore: Mistral attention (no biases, optional sliding window on every layer);
every layer's MLP is routed experts (ms_models.moe), block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) /
w2 (down), the top-k weights always renormalised."""
from __future__ import annotations

from .config import ModelConfig
from .decoder import DecoderModel
from .layers import DeviceOps
from .moe import MIXTRAL_EXPERTS, build_moe_decoder

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> DecoderModel:
    assert cfg.architecture == "MixtralForCausalLM", cfg.architecture
    return build_moe_decoder(cfg, weights, dev, MIXTRAL_EXPERTS)
