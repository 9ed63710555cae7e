"""HF safetensors weight loading and :func:`load_model`.

Reads the safetensors header itself (no torch) and each tensor, on request, straight from
the file into a fresh numpy array: no memory map whose pages would count twice, and no copy
of a whole file kept alive. fp32 tensors are read as they are; bf16/fp16/fp64 ones are
converted to fp32 (the compute dtype) as they are read. Single ``model.safetensors``,
sharded ``model.safetensors.index.json``, or any set of ``*.safetensors`` files in the
directory. Progress is logged (logger ``ms_models``) every 10% of the bytes read.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import struct
import sys
import time

import numpy as np

from .config import ModelConfig
from .registry import UnsupportedModelError, get_builder

__all__ = ["SafetensorsWeights", "load_model", "UnsupportedModelError"]

log = logging.getLogger("ms_models")

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsWeights:
    """Name -> fp32 numpy array over the safetensors files of one model directory.

    ``get`` returns a new, writable array owned by the caller (read with ``readinto``; the
    only transient extra memory is the raw bytes of a converted bf16/fp16 tensor).
    """

    def __init__(self, model_dir: str, progress: bool = True):
        self.model_dir = os.fspath(model_dir)
        files = self._find_files(self.model_dir)
        self._files: dict = {}
        self._index: dict[str, tuple] = {}  # name -> (file, dtype, shape, begin, end)
        for path in files:
            self._read_header(path)
        self.total_bytes = sum(e - b for _, _, _, b, e in self._index.values())
        self.bytes_read = 0
        self.progress = progress
        self._next_pct = 10
        self._t0 = time.perf_counter()

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

    def _read_into(self, path: str, begin: int, out: np.ndarray) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb", buffering=0)
        f.seek(begin)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"invalid safetensors file {path}: unexpected end of file")
            got += n

    def get(self, name: str, shape=None) -> np.ndarray:
        """fp32 array (new, writable) of HF tensor ``name``."""
        if name not in self._index:
            raise ValueError(f"weight {name!r} not found in the safetensors files of {self.model_dir}")
        path, dt, shp, begin, end = self._index[name]
        if dt not in _DTYPES:
            raise ValueError(f"weight {name!r} in {path} has unsupported dtype {dt} (need F32/F16/BF16)")
        if shape is not None and tuple(shape) != shp:
            raise ValueError(f"weight {name!r} in {path} has shape {list(shp)}, expected {list(shape)}")
        n = int(np.prod(shp, dtype=np.int64))
        if (end - begin) != n * np.dtype(_DTYPES[dt]).itemsize:
            raise ValueError(f"invalid safetensors file {path}: tensor {name} has {end - begin} bytes "
                             f"for shape {list(shp)} {dt}")
        if dt == "F32":
            out = np.empty(shp, np.float32)
            self._read_into(path, begin, out)
        else:
            raw = np.empty(n, _DTYPES[dt])
            self._read_into(path, begin, raw)
            if dt == "BF16":  # bf16 is the high half of an fp32: place the 16 bits, low half zero
                out = np.zeros(shp, np.float32)
                halves = out.reshape(-1).view(np.uint16)
                halves[(1 if sys.byteorder == "little" else 0)::2] = raw
            else:
                out = raw.astype(np.float32).reshape(shp)
            del raw
        self._advance(end - begin)
        return out

    def _advance(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        if not self.progress or not self.total_bytes:
            return
        pct = 100 * self.bytes_read // self.total_bytes
        if pct >= self._next_pct:
            log.info("loading weights: %d%% (%.1f / %.1f MiB, %.1f s)", pct, self.bytes_read / 2**20,
                     self.total_bytes / 2**20, time.perf_counter() - self._t0)
            self._next_pct = (pct // 10 + 1) * 10

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


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
            "self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,),
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
    t0 = time.perf_counter()
    log.info("loading %s (%s, %d layers) from %s: %.1f MiB in %d safetensors file(s)", cfg.architecture,
             cfg.dtype, cfg.num_layers, os.fspath(model_dir), src.total_bytes / 2**20,
             len({e[0] for e in src._index.values()}))
    try:
        net = build(cfg, weights, DeviceOps(dev_name))
    finally:
        src.close()
    log.info("weights loaded: %.1f MiB read, %.1f MiB as %s, in %.1f s", src.bytes_read / 2**20,
             net.weight_bytes() / 2**20, cfg.dtype, time.perf_counter() - t0)
    return CausalLM(cfg, net, device=dev_name, use_jit=use_jit, model_dir=os.fspath(model_dir),
                    min_buckets=min_buckets)
