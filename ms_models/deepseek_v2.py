"""DeepseekV2ForCausalLM in MindSpore: multi-head latent attention over a latent KV cache, dense MLPs then
routed + shared experts (ms_models.mla); softmax scores, greedy or group-limited top-k, weights not renormalised, times
routed_scaling_factor."""
from __future__ import annotations

from .config import ModelConfig
from .layers import DeviceOps
from .mla import MlaModel, build_mla_decoder

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> MlaModel:
    assert cfg.architecture == "DeepseekV2ForCausalLM", cfg.architecture
    return build_mla_decoder(cfg, weights, dev)
