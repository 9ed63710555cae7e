"""HF safetensors weight loading and :func:`load_model`.

Reads the safetensors header itself and memory-maps the data (no torch, no copy of the
whole file); fp32 tensors are views of the mapped file, bf16/fp16/fp64 are converted to
fp32. Single ``model.safetensors``, sharded ``model.safetensors.index.json``, or any set
of ``*.safetensors`` files in the directory.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np

from .config import ModelConfig
from .registry import UnsupportedModelError, get_builder

__all__ = ["SafetensorsWeights", "load_model", "UnsupportedModelError"]

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsWeights:
    """Name -> fp32 numpy array over the safetensors files of one model directory."""

    def __init__(self, model_dir: str):
        self.model_dir = os.fspath(model_dir)
        files = self._find_files(self.model_dir)
        self._maps: dict[str, np.memmap] = {}
        self._index: dict[str, tuple] = {}  # name -> (file, dtype, shape, begin, end)
        for path in files:
            self._read_header(path)

    @staticmethod
    def _find_files(d: str) -> list:
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, "r", encoding="utf-8") as f:
                    wmap = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"invalid safetensors index {index}: {e}") from e
            files = sorted({os.path.join(d, fn) for fn in wmap.values()})
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"safetensors shards listed in {index} are missing: {missing}")
            return files
        single = os.path.join(d, "model.safetensors")
        if os.path.isfile(single):
            return [single]
        files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
        if files:
            return files
        raise FileNotFoundError(f"no *.safetensors weights in model directory {d} "
                                "(PyTorch .bin checkpoints are not supported)")

    def _read_header(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("file too short")
                (hlen,) = struct.unpack("<Q", raw)
                if hlen > 100 * 1024 * 1024:
                    raise ValueError(f"implausible header length {hlen}")
                header = json.loads(f.read(hlen))
            size = os.path.getsize(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"invalid safetensors file {path}: {e}") from e
        base = 8 + hlen
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = info.get("dtype")
            begin, end = info["data_offsets"]
            if base + end > size:
                raise ValueError(f"invalid safetensors file {path}: tensor {name} runs past the end of the file")
            self._index[name] = (path, dt, tuple(int(s) for s in info["shape"]), base + begin, base + end)

    def names(self):
        return list(self._index)

    def has(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str, shape=None) -> np.ndarray:
        """fp32 array (read-only memmap view for F32 files) of HF tensor ``name``."""
        if name not in self._index:
            raise ValueError(f"weight {name!r} not found in the safetensors files of {self.model_dir}")
        path, dt, shp, begin, end = self._index[name]
        if dt not in _DTYPES:
            raise ValueError(f"weight {name!r} in {path} has unsupported dtype {dt} (need F32/F16/BF16)")
        if shape is not None and tuple(shape) != shp:
            raise ValueError(f"weight {name!r} in {path} has shape {list(shp)}, expected {list(shape)}")
        mm = self._maps.get(path)
        if mm is None:
            mm = self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        a = mm[begin:end].view(_DTYPES[dt]).reshape(shp)
        if dt == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if dt != "F32":
            return a.astype(np.float32)
        return a

    def close(self) -> None:
        self._maps.clear()


class _CheckedWeights:
    """Adds expected shapes (from the config) to lookups so mismatches fail clearly."""

    def __init__(self, src: SafetensorsWeights, cfg: ModelConfig):
        self.src = src
        self.cfg = cfg
        c = cfg
        self._shapes = {
            "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "lm_head.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,),
        }
        qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        per_layer = {
            "input_layernorm.weight": (c.hidden_size,), "post_attention_layernorm.weight": (c.hidden_size,),
            "self_attn.q_proj.weight": (qd, c.hidden_size), "self_attn.q_proj.bias": (qd,),
            "self_attn.k_proj.weight": (kd, c.hidden_size), "self_attn.k_proj.bias": (kd,),
            "self_attn.v_proj.weight": (kd, c.hidden_size), "self_attn.v_proj.bias": (kd,),
            "self_attn.o_proj.weight": (c.hidden_size, qd), "self_attn.o_proj.bias": (c.hidden_size,),
            "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size), "mlp.gate_proj.bias": (c.intermediate_size,),
            "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size), "mlp.up_proj.bias": (c.intermediate_size,),
            "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size), "mlp.down_proj.bias": (c.hidden_size,),
        }
        self._per_layer = per_layer

    def _expected(self, name):
        if name in self._shapes:
            return self._shapes[name]
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers":
            return self._per_layer.get(parts[3])
        return None

    def has(self, name):
        return self.src.has(name)

    def get(self, name):
        return self.src.get(name, self._expected(name))


def load_model(model_dir: str, device: str = "cpu", use_jit: bool = True, threads: int | None = None,
               min_buckets: tuple = (1, 1, 1)):
    """Loads a HF model directory (config.json + safetensors) as a :class:`CausalLM`.

    Raises FileNotFoundError / ValueError (naming the path) for a missing or invalid
    directory, UnsupportedModelError for an architecture/feature ms_models lacks.
    Calls ``runtime.setup(device, threads)`` (no-op if the worker already did).
    ``min_buckets``: smallest (B, Q, M) padding buckets (see CausalLM.bucket_shape).
    """
    from . import runtime

    dev_name = runtime.normalize_device(device)
    cfg = ModelConfig.from_model_dir(model_dir)  # before importing MindSpore: cheap failures first
    src = SafetensorsWeights(model_dir)
    runtime.setup(dev_name, threads)
    build = get_builder(cfg.architecture)
    from .layers import DeviceOps
    from .model import CausalLM

    weights = _CheckedWeights(src, cfg)
    if not cfg.tie_word_embeddings and not src.has("lm_head.weight"):
        raise ValueError(f"{model_dir}: config has tie_word_embeddings=false but no lm_head.weight")
    try:
        net = build(cfg, weights, DeviceOps(dev_name))
    finally:
        src.close()
    return CausalLM(cfg, net, device=dev_name, use_jit=use_jit, model_dir=os.fspath(model_dir),
                    min_buckets=min_buckets)
