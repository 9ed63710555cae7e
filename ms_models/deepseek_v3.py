"""DeepseekV3ForCausalLM in MindSpore: multi-head latent attention over a latent KV cache, dense MLPs then
routed + shared experts (ms_models.mla); sigmoid scores + e_score_correction_bias, group-limited top-k, norm_topk_prob, times
routed_scaling_factor."""
from __future__ import annotations

from .config import ModelConfig
from .layers import DeviceOps
from .mla import MlaModel, build_mla_decoder

__all__ = ["build_network"]


def build_network(cfg: ModelConfig, weights, dev: DeviceOps) -> MlaModel:
    assert cfg.architecture == "DeepseekV3ForCausalLM", cfg.architecture
    return build_mla_decoder(cfg, weights, dev)
