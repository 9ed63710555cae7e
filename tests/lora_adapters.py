"""Random PEFT LoRA adapters written by hand (peft is not installed): the tests' adapters and the benchmark's."""

from __future__ import annotations

import json
import math
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(path: Path, base: Path, r: int, alpha: float, targets, seed: int, rslora: bool = False,
                 extra: dict | None = None, shape_of=None) -> dict:
    """A PEFT adapter (adapter_config.json + adapter_model.safetensors) with random A and B; returns the deltas
    {HF weight name: scale * B @ A} it makes."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    h, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, inter = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
              "up_proj": (h, inter), "down_proj": (inter, h)}
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for i in range(cfg["num_hidden_layers"]):
        for t in targets:
            module = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            n_in, n_out = (shape_of or shapes).get(t, (h, h))
            a = torch.randn(r, n_in, generator=g) * 0.2
            b = torch.randn(n_out, r, generator=g) * 0.2
            key = f"base_model.model.model.layers.{i}.{module}.{t}"
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a.contiguous(), b.contiguous()
            deltas[f"model.layers.{i}.{module}.{t}.weight"] = scale * (b @ a)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": rslora,
        "bias": "none", "lora_dropout": 0.0, "base_model_name_or_path": str(base), **(extra or {})}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return deltas
