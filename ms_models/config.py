"""Model configuration: parsed from a Hugging Face ``config.json``.

Pure Python (no MindSpore import), so the front process can build the same
:class:`ModelConfig` and compare ``config_hash`` with what a worker reports.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from .registry import UnsupportedModelError, resolve_architecture

__all__ = ["ModelConfig", "read_hf_config", "canonical_rope_scaling", "architecture_features"]

# RoPE scaling types implemented by layers.RotaryEmbedding.
SUPPORTED_ROPE_TYPES = ("linear", "llama3")
# Architectures whose implementation also applies YaRN's attention factor (ms_models.mla); the others refuse yarn.
YARN_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def read_hf_config(model_dir: str) -> dict:
    """Reads ``<model_dir>/config.json``; clear errors for a missing/invalid directory."""
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"model_dir must be a path, got {type(model_dir).__name__}")
    model_dir = os.fspath(model_dir)
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"model directory does not exist: {model_dir}")
    if not os.path.isdir(model_dir):
        raise ValueError(f"model path is not a directory: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model directory: {model_dir}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"invalid config.json in {model_dir}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"invalid config.json in {model_dir}: top level is not an object")
    return cfg


def canonical_rope_scaling(hf: dict, yarn: bool = False) -> tuple[float, Optional[dict]]:
    """Returns (rope_theta, rope_scaling) from either config format.

    transformers < 5 writes ``rope_theta`` + ``rope_scaling`` ({"type"|"rope_type": ...});
    transformers >= 5 writes ``rope_parameters`` ({"rope_type", "rope_theta", ...}).
    rope_scaling is None for plain RoPE, otherwise a dict with "rope_type" and the
    numeric parameters (sorted keys, floats), e.g. {"factor": 8.0, ..., "rope_type": "llama3"}.
    ``yarn``: the architecture implements "yarn" (YaRN frequencies and attention factor, as HF computes them).
    """
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict) and "rope_type" not in params and "rope_theta" not in params:
        # per-layer-type dict (e.g. {"full_attention": {...}}): not a Llama layout
        raise UnsupportedModelError("per-layer rope_parameters are not supported")
    merged: dict = {}
    if isinstance(scaling, dict):
        merged.update(scaling)
    if isinstance(params, dict):
        merged.update(params)
    if theta is None:
        theta = merged.get("rope_theta", 10000.0)
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type == "default":
        extra = {k: v for k, v in merged.items() if k not in ("rope_type", "type", "rope_theta")}
        if extra.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        return float(theta), None
    supported = SUPPORTED_ROPE_TYPES + (("yarn",) if yarn else ())
    if rope_type not in supported:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: default, " + ", ".join(supported) + ")")
    out: dict[str, Any] = {"rope_type": rope_type, "factor": float(merged["factor"])}
    if rope_type == "yarn":  # HF's defaults (modeling_rope_utils._compute_yarn_parameters); None = not set
        out.update(beta_fast=float(merged.get("beta_fast") or 32), beta_slow=float(merged.get("beta_slow") or 1),
                   truncate=bool(merged.get("truncate", True)),
                   original_max_position_embeddings=int(merged.get("original_max_position_embeddings")
                                                        or hf.get("max_position_embeddings")))
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            if merged.get(k) is not None:
                out[k] = float(merged[k])
    if rope_type == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            out[k] = float(merged[k])
        out["original_max_position_embeddings"] = int(
            merged.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    return float(theta), dict(sorted(out.items()))


def _uniform_sliding_window(hf: dict, num_layers: int, sliding: list) -> Optional[int]:
    """The window when every layer in ``sliding`` (bools per layer) is windowed, None when none
    is; a mix of windowed and full-attention layers is not supported."""
    if not any(sliding):
        return None
    if not all(sliding):
        raise UnsupportedModelError(
            f"a mix of sliding-window and full-attention layers is not supported "
            f"({sum(sliding)} of {num_layers} layers use sliding_window={hf.get('sliding_window')})")
    window = hf.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(f"config.json: invalid sliding_window {window!r}")
    return int(window)


def architecture_features(arch: str, hf: dict) -> dict:
    """The per-architecture ModelConfig fields (biases, q/k norm, sliding window), following what
    HF transformers' implementation of ``arch`` does with the same config.json."""
    num_layers = int(hf["num_hidden_layers"])
    if arch == "LlamaForCausalLM":
        bias = bool(hf.get("attention_bias", False))
        return dict(attention_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        layer_types = hf.get("layer_types")
        if isinstance(layer_types, list) and layer_types:
            if len(layer_types) != num_layers:
                raise ValueError(f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
            sliding = [t == "sliding_attention" for t in layer_types]
        elif hf.get("use_sliding_window") and hf.get("sliding_window"):
            first = int(hf.get("max_window_layers", 28))  # HF default: 28
            sliding = [i >= first for i in range(num_layers)]
        else:
            sliding = [False] * num_layers
        window = _uniform_sliding_window(hf, num_layers, sliding)
        if arch == "Qwen2ForCausalLM":  # q/k/v always have a bias, o_proj never
            return dict(attention_bias=True, o_bias=False, sliding_window=window)
        bias = bool(hf.get("attention_bias", False))
        return dict(attention_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):  # every layer uses the window when one is set
        window = hf.get("sliding_window") or None                # (0 / null: none)
        feats = dict(sliding_window=_uniform_sliding_window(hf, num_layers, [window is not None] * num_layers))
        if arch == "MixtralForCausalLM":  # every layer is sparse; the experts' size is intermediate_size
            feats.update(_moe_features(hf, num_layers, int(hf.get("num_local_experts", 8)),
                                       int(hf["intermediate_size"]), norm_topk_prob=True))
        return feats
    if arch == "Qwen3MoeForCausalLM":  # Qwen3 attention; the window (use_sliding_window) is on every layer
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        bias = bool(hf.get("attention_bias", False))
        return dict(attention_bias=bias, o_bias=bias, qk_norm=True,
                    sliding_window=_uniform_sliding_window(hf, num_layers, [bool(window)] * num_layers),
                    **_qwen_moe_features(hf, num_layers))
    if arch == "Qwen2MoeForCausalLM":  # Qwen2 attention (qkv_bias, no o bias) and a gated shared expert
        layer_types = hf.get("layer_types")
        if isinstance(layer_types, list) and layer_types:
            if len(layer_types) != num_layers:
                raise ValueError(f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
            sliding = [t == "sliding_attention" for t in layer_types]
        else:  # HF's default layer_types for this architecture
            first = int(hf.get("max_window_layers", 28))
            sliding = [bool((i + 1) % 2) and i < first and bool(hf.get("use_sliding_window")) for i in
                       range(num_layers)]
        return dict(attention_bias=bool(hf.get("qkv_bias", True)), o_bias=False,
                    sliding_window=_uniform_sliding_window(hf, num_layers, sliding),
                    shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size", 5632)),
                    **_qwen_moe_features(hf, num_layers))
    if arch in YARN_ARCHITECTURES:
        return _deepseek_features(arch, hf, num_layers)
    raise UnsupportedModelError(f"no configuration rules for architecture {arch}")


def _deepseek_features(arch: str, hf: dict, num_layers: int) -> dict:
    """DeepSeek-V2/V3 (ms_models.mla), as HF's DeepseekV2/V3 modeling reads the config: multi-head latent attention
    whose KV cache holds one latent row per token (num_kv_heads 1, head_dim kv_lora_rank + qk_rope_head_dim, as
    vLLM sizes MLA caches), dense MLPs before first_k_dense_replace, routed + shared experts after it."""
    v3 = arch == "DeepseekV3ForCausalLM"
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{arch}: mlp_bias is not supported")
    if int(hf.get("moe_layer_freq", 1) or 1) != 1:
        raise UnsupportedModelError(f"{arch}: moe_layer_freq != 1 is not supported")
    method = "noaux_tc" if v3 else (hf.get("topk_method") or "greedy")  # HF's V3 router ignores topk_method
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise UnsupportedModelError(f"{arch}: topk_method {method!r} is not supported "
                                    "(supported: greedy, group_limited_greedy)")
    experts = int(hf.get("n_routed_experts") or 0)
    first = int(hf.get("first_k_dense_replace") or 0)
    bias = bool(hf.get("attention_bias", False))
    feats = dict(attention_bias=bias, o_bias=bias, num_kv_heads=1,
                 head_dim=int(hf["kv_lora_rank"]) + int(hf["qk_rope_head_dim"]),
                 q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
                 qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
                 v_head_dim=int(hf["v_head_dim"]), rope_interleave=bool(hf.get("rope_interleave", True)) or not v3)
    if experts and first < num_layers:
        groups = (int(hf.get("n_group") or 0), int(hf.get("topk_group") or 0))
        if method != "greedy":
            if groups[0] <= 0 or experts % groups[0] or not 1 <= groups[1] <= groups[0]:
                raise ValueError(f"config.json: n_group {groups[0]} / topk_group {groups[1]} do not split "
                                 f"{experts} experts ({arch}, topk_method {method})")
            feats.update(n_group=groups[0], topk_group=groups[1])
        feats.update(routing="sigmoid" if v3 else "softmax",
                     routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                     n_shared_experts=int(hf.get("n_shared_experts") or 0),
                     **_moe_features(hf, num_layers, experts, int(hf["moe_intermediate_size"]),
                                     bool(hf.get("norm_topk_prob")) and v3, range(first, num_layers)))
    return feats


def _moe_features(hf: dict, num_layers: int, num_experts: int, expert_size: int, norm_topk_prob: bool,
                  moe_layers=None) -> dict:
    top_k = int(hf.get("num_experts_per_tok", 2))
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"config.json: num_experts_per_tok {top_k} is not in 1..{num_experts} (the experts)")
    layers = tuple(range(num_layers)) if moe_layers is None else tuple(moe_layers)
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
                norm_topk_prob=bool(norm_topk_prob), moe_layers=layers)


def _qwen_moe_features(hf: dict, num_layers: int) -> dict:
    """Qwen2-MoE / Qwen3-MoE: layer i is sparse iff num_experts > 0, (i + 1) % decoder_sparse_step == 0 and i is
    not in mlp_only_layers (as HF's decoder layer decides); the others are dense MLPs of intermediate_size."""
    # transformers >= 5 writes num_experts as num_local_experts (its attribute map), the published configs num_experts
    experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
    step = int(hf.get("decoder_sparse_step", 1))
    dense = set(hf.get("mlp_only_layers") or [])
    layers = [i for i in range(num_layers) if experts > 0 and (i + 1) % step == 0 and i not in dense]
    if not layers:
        return dict(moe_layers=())
    return _moe_features(hf, num_layers, experts, int(hf["moe_intermediate_size"]),
                         bool(hf.get("norm_topk_prob", False)), layers)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The config fields the MindSpore implementation depends on.

    ``config_hash`` is the sha256 (hex) of the canonical JSON (sorted keys, no spaces)
    of every other field; two processes that load the same model agree on it.
    """
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections have a bias
    o_bias: bool = False          # o_proj has a bias (Llama: = attention_bias; Qwen2: q/k/v only)
    mlp_bias: bool = False
    qk_norm: bool = False         # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: Optional[int] = None  # every layer attends to the last N positions only (Mistral)
    # mixture of experts (ms_models.moe): the layers in moe_layers route each token to num_experts_per_tok of
    # num_experts experts of moe_intermediate_size; the other layers are dense MLPs of intermediate_size
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the top-k routing weights are divided by their sum
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token uses, sigmoid-gated
    moe_layers: tuple = ()
    # DeepSeek routing (ms_models.mla): "softmax" (V2) or "sigmoid" + e_score_correction_bias (V3) scores, chosen
    # among the topk_group best of n_group expert groups (0: no groups), weights times routed_scaling_factor;
    # n_shared_experts dense experts of n * moe_intermediate_size every token uses
    routing: str = ""
    n_group: int = 0
    topk_group: int = 0
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    # multi-head latent attention (ms_models.mla; kv_lora_rank 0: none): q through a q_lora_rank bottleneck (0:
    # one q_proj), per head qk_nope_head_dim + qk_rope_head_dim query/key dims and v_head_dim value dims; the
    # cache holds the kv_lora_rank latent and the rotated qk_rope_head_dim key (head_dim = their sum)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # the rope dims are (x0, x1), (x2, x3) ... pairs (else halves, rotate_half)
    dtype: str = "float32"  # compute / weight / KV-cache dtype of the MindSpore model
    config_hash: str = ""

    def hash_fields(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("config_hash")
        return d

    def compute_hash(self) -> str:
        blob = json.dumps(self.hash_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: str = "float32") -> "ModelConfig":
        """Builds a ModelConfig from a parsed HF config.json (raises UnsupportedModelError)."""
        archs = hf.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        arch = resolve_architecture(archs)  # raises UnsupportedModelError
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method", "?") if isinstance(
                hf["quantization_config"], dict) else "?"
            raise UnsupportedModelError(f"quantized checkpoints (quantization_config, quant_method {method!r}) are "
                                        "not supported: ms_models loads float weights only")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim") or hidden // heads
            theta, scaling = canonical_rope_scaling(hf, yarn=arch in YARN_ARCHITECTURES)
            fields = dict(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                intermediate_size=int(hf["intermediate_size"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                dtype=dtype,
            )
            fields.update(architecture_features(arch, hf))
            cfg = cls(**fields)
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from e
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_attention_heads {cfg.num_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_kv_heads}")
        if cfg.head_dim % 2:
            raise ValueError(f"head_dim {cfg.head_dim} must be even for RoPE")
        return dataclasses.replace(cfg, config_hash=cfg.compute_hash())

    @classmethod
    def from_model_dir(cls, model_dir: str, dtype: str = "float32") -> "ModelConfig":
        cfg = read_hf_config(model_dir)
        try:
            return cls.from_hf_config(cfg, dtype=dtype)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{e} (model: {os.fspath(model_dir)})") from None
