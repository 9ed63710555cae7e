"""The model's configuration, read from an HF config.json: the fields the numpy decoder needs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedModel(ValueError):
    """A checkpoint this worker cannot serve (architecture or feature), with the reason."""


@dataclass(frozen=True)
class Config:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    inv_freq: tuple            # RoPE inverse frequencies [head_dim / 2], scaling applied
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False      # Qwen3: RMSNorm of each head of q and k before RoPE
    sliding_window: int = 0    # every layer attends to the last N positions; 0 = full attention


def _rope(hf: dict, head_dim: int) -> tuple:
    """Inverse frequencies with HF's default, "linear" or "llama3" RoPE (config.json in transformers 4 or 5
    layout)."""
    merged = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(hf.get("rope_theta", merged.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if kind == "default":
        return tuple(inv)
    factor = float(merged["factor"])
    if kind == "linear":
        return tuple(inv / factor)
    if kind == "llama3":
        lo, hi = float(merged["low_freq_factor"]), float(merged["high_freq_factor"])
        old = float(merged.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return tuple(np.where(medium, (1 - smooth) * out / factor + smooth * out, out))
    raise UnsupportedModel(f"RoPE scaling {kind!r} (supported: default, linear, llama3)")


def load_config(model_dir) -> Config:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnsupportedModel(f"no config.json in {model_dir}")
    hf = json.loads(path.read_text())
    arch = next((a for a in hf.get("architectures") or [] if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModel(f"architectures {hf.get('architectures')} (supported: {', '.join(ARCHITECTURES)})")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UnsupportedModel(f"hidden_act {hf.get('hidden_act')!r} (supported: silu)")
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    window = 0
    if arch == "MistralForCausalLM":
        window = int(hf.get("sliding_window") or 0)
    elif arch.startswith("Qwen") and (hf.get("use_sliding_window") or
                                      "sliding_attention" in (hf.get("layer_types") or [])):
        raise UnsupportedModel("Qwen sliding-window layers")
    bias = bool(hf.get("attention_bias", False))
    return Config(
        architecture=arch, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), inv_freq=_rope(hf, head_dim),
        qkv_bias=True if arch == "Qwen2ForCausalLM" else bias,
        o_bias=False if arch == "Qwen2ForCausalLM" else bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=arch == "Qwen3ForCausalLM", sliding_window=window)
