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


def _to_f32(raw: np.ndarray) -> np.ndarray:
    """A stored tensor (float32, float16, float64, or bf16 held as uint16) as a new float32 array."""
    if raw.dtype == np.float32:
        return raw
    if raw.dtype == np.uint16:  # bf16 is the high half of an fp32: place the 16 bits, low half zero
        out = np.zeros(raw.shape, np.float32)
        halves = out.reshape(-1).view(np.uint16)
        halves[(1 if sys.byteorder == "little" else 0)::2] = raw.reshape(-1)
        return out
    return raw.astype(np.float32)


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

    def get(self, name: str, shape=None, dim: int | None = None, start: int = 0, stop: int | None = None,
            pad_to: int | None = None) -> np.ndarray:
        """fp32 array (new, writable) of HF tensor ``name``; with ``dim`` only the slice [start, stop) along
        dim 0 or 1 is read from the file (a tensor-parallel shard), zero-padded along ``dim`` to ``pad_to``
        entries. ``shape``: the expected shape of the whole tensor."""
        if name not in self._index:
            raise ValueError(f"weight {name!r} not found in the safetensors files of {self.model_dir}")
        path, dt, shp, begin, end = self._index[name]
        if dt not in _DTYPES:
            raise ValueError(f"weight {name!r} in {path} has unsupported dtype {dt} (need F32/F16/BF16)")
        if shape is not None and tuple(shape) != shp:
            raise ValueError(f"weight {name!r} in {path} has shape {list(shp)}, expected {list(shape)}")
        n = int(np.prod(shp, dtype=np.int64))
        item = np.dtype(_DTYPES[dt]).itemsize
        if (end - begin) != n * item:
            raise ValueError(f"invalid safetensors file {path}: tensor {name} has {end - begin} bytes "
                             f"for shape {list(shp)} {dt}")
        if dim is None:
            raw = np.empty(shp, _DTYPES[dt])
            self._read_into(path, begin, raw)
        else:
            raw = self._read_slice(path, begin, shp, _DTYPES[dt], dim, start, shp[dim] if stop is None else stop)
        nbytes = raw.nbytes
        if pad_to is not None and pad_to > raw.shape[dim]:
            widths = [(0, 0)] * raw.ndim
            widths[dim] = (0, pad_to - raw.shape[dim])
            raw = np.pad(raw, widths)
        out = _to_f32(raw)
        del raw
        self._advance(nbytes)
        return out

    def _read_slice(self, path: str, begin: int, shp: tuple, dtype, dim: int, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) along dim 0 or 1 of a stored (row-major) tensor, in its stored dtype: one read
        for dim 0; for dim 1, whole rows in chunks of about 4 MiB, keeping only the columns asked for."""
        if dim not in (0, 1) or len(shp) <= dim or not 0 <= start <= stop <= shp[dim]:
            raise ValueError(f"cannot slice [{start}:{stop}] along dim {dim} of a tensor of shape {list(shp)}")
        item = np.dtype(dtype).itemsize
        row = int(np.prod(shp[1:], dtype=np.int64))   # entries per dim-0 row
        if dim == 0:
            out = np.empty((stop - start, *shp[1:]), dtype)
            self._read_into(path, begin + start * row * item, out)
            return out
        inner = int(np.prod(shp[2:], dtype=np.int64))
        out = np.empty((shp[0], stop - start, *shp[2:]), dtype)
        rows = max(1, (4 << 20) // max(1, row * item))
        for r0 in range(0, shp[0], rows):
            r1 = min(shp[0], r0 + rows)
            buf = np.empty((r1 - r0, shp[1], inner), dtype)
            self._read_into(path, begin + r0 * row * item, buf)
            out[r0:r1] = buf[:, start:stop].reshape(r1 - r0, stop - start, *shp[2:])
        return out

    def _advance(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        if not self.progress or not self.total_bytes:
            return
        pct = min(100, 100 * self.bytes_read // self.total_bytes)
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
        if c.num_experts:  # per-expert names with the expert index as "*" (_expected)
            E, I, S = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
            for block, gate, up, down in (("mlp", "gate_proj", "up_proj", "down_proj"),
                                          ("block_sparse_moe", "w1", "w3", "w2")):
                per_layer.update({f"{block}.gate.weight": (E, c.hidden_size),
                                  f"{block}.experts.*.{gate}.weight": (I, c.hidden_size),
                                  f"{block}.experts.*.{up}.weight": (I, c.hidden_size),
                                  f"{block}.experts.*.{down}.weight": (c.hidden_size, I)})
            per_layer.update({"mlp.shared_expert.gate_proj.weight": (S, c.hidden_size),
                              "mlp.shared_expert.up_proj.weight": (S, c.hidden_size),
                              "mlp.shared_expert.down_proj.weight": (c.hidden_size, S),
                              "mlp.shared_expert_gate.weight": (1, c.hidden_size)})
        if c.kv_lora_rank:  # multi-head latent attention (ms_models.mla)
            qk, ql, kv = c.qk_nope_head_dim + c.qk_rope_head_dim, c.q_lora_rank, c.kv_lora_rank
            per_layer.update({
                "self_attn.q_proj.weight": (c.num_heads * qk, c.hidden_size),
                "self_attn.q_a_proj.weight": (ql, c.hidden_size), "self_attn.q_a_layernorm.weight": (ql,),
                "self_attn.q_b_proj.weight": (c.num_heads * qk, ql),
                "self_attn.kv_a_proj_with_mqa.weight": (kv + c.qk_rope_head_dim, c.hidden_size),
                "self_attn.kv_a_layernorm.weight": (kv,),
                "self_attn.kv_b_proj.weight": (c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), kv),
                "self_attn.o_proj.weight": (c.hidden_size, c.num_heads * c.v_head_dim),
                "mlp.gate.e_score_correction_bias": (c.num_experts,)})
            shared = c.n_shared_experts * c.moe_intermediate_size
            per_layer.update({"mlp.shared_experts.gate_proj.weight": (shared, c.hidden_size),
                              "mlp.shared_experts.up_proj.weight": (shared, c.hidden_size),
                              "mlp.shared_experts.down_proj.weight": (c.hidden_size, shared)})
        self._per_layer = per_layer

    def _expected(self, name):
        if name in self._shapes:
            return self._shapes[name]
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers":
            key = parts[3].split(".")
            if len(key) > 2 and key[1] == "experts" and key[2].isdigit():
                key[2] = "*"
            return self._per_layer.get(".".join(key))
        return None

    def has(self, name):
        return self.src.has(name)

    def get(self, name, **shard):
        """The whole tensor, or with ``dim=, start=, stop=`` (``pad_to=``) a slice of it (SafetensorsWeights.get)."""
        return self.src.get(name, self._expected(name), **shard)


def load_model(model_dir: str, device: str = "cpu", use_jit: bool = True, threads: int | None = None,
               tp_rank: int = 0, tp_size: int = 1, dtype: str = "auto",
               kernels=None, expert_parallel: bool = False, dp_rank: int = 0, dp_size: int = 1):
    """Loads a HF model directory (config.json + safetensors) as a :class:`CausalLM`.

    Raises FileNotFoundError / ValueError (naming the path) for a missing or invalid
    directory, UnsupportedModelError for an architecture/feature ms_models lacks.
    Calls ``runtime.setup(device, threads)`` (no-op if the worker already did).
    ``tp_rank``/``tp_size``: this process's shard of a tensor-parallel model (ms_models.parallel): only its
    1/tp_size of the weights is read; the process must have joined the MindSpore cluster first
    (``runtime.setup(..., tp_rank=, tp_size=, dist_addr=)``). ValueError if tp_size does not divide the heads.
    ``expert_parallel``: a mixture-of-experts model's experts are partitioned whole across the ranks (vLLM's
    --enable-expert-parallel); ValueError if they do not divide, or if the model has no routed experts.
    ``dp_rank``/``dp_size`` (expert parallel only): the experts are spread over ``dp_size`` data-parallel engines'
    ranks, all in one MindSpore cluster (ms_models.parallel).
    ``dtype``: weights, activations and KV cache; "auto" = float32 on cpu (its only dtype), bfloat16 on ascend
    (float16 also; layers.DeviceOps). ``kernels``: stand-ins for the fused kernels of the ascend path (tests).
    """
    from . import runtime
    from .parallel import TensorParallel, check_tensor_parallel

    dev_name = runtime.normalize_device(device)
    dtype = runtime.resolve_dtype(dev_name, dtype, stand_ins=kernels is not None)
    cfg = ModelConfig.from_model_dir(model_dir, dtype=dtype)  # before importing MindSpore: cheap failures first
    tp = TensorParallel(int(tp_rank), int(tp_size), bool(expert_parallel), int(dp_rank), int(dp_size))
    problem = check_tensor_parallel(cfg, tp.size, tp.expert_parallel, tp.dp_size)
    if problem:
        raise ValueError(f"{problem} (model: {os.fspath(model_dir)})")
    src = SafetensorsWeights(model_dir)
    if tp.cluster[1] > 1 and runtime.current_tp() != tp.cluster:
        raise RuntimeError(f"load_model(tp_rank={tp.rank}, tp_size={tp.size}, dp_rank={tp.dp_rank}, "
                           f"dp_size={tp.dp_size}) needs this process in the MindSpore cluster as rank "
                           f"{tp.cluster[0]} of {tp.cluster[1]} first: runtime.setup(..., tp_rank=, tp_size=, "
                           f"dist_addr=); it is {runtime.current_tp()}")
    if tp.enabled:
        src.total_bytes = -(-src.total_bytes // tp.size)   # roughly what this rank reads (progress log)
    runtime.setup(dev_name if kernels is None else "cpu", threads)  # stand-in kernels run on the CPU
    build = get_builder(cfg.architecture)
    from .layers import DeviceOps
    from .model import CausalLM

    dev = DeviceOps(dev_name, tp, dtype, kernels)
    weights = _CheckedWeights(src, cfg)
    if not cfg.tie_word_embeddings and not src.has("lm_head.weight"):
        raise ValueError(f"{model_dir}: config has tie_word_embeddings=false but no lm_head.weight")
    t0 = time.perf_counter()
    log.info("loading %s (%s, %d layers) from %s: %.1f MiB in %d safetensors file(s)%s", cfg.architecture,
             cfg.dtype, cfg.num_layers, os.fspath(model_dir), src.total_bytes / 2**20,
             len({e[0] for e in src._index.values()}),
             f", tensor-parallel rank {tp.rank} of {tp.size}: about 1/{tp.size} of it" if tp.enabled else "")
    try:
        net = build(cfg, weights, dev)
    finally:
        src.close()
    log.info("weights loaded: %.1f MiB read, %.1f MiB as %s, in %.1f s", src.bytes_read / 2**20,
             net.weight_bytes() / 2**20, cfg.dtype, time.perf_counter() - t0)
    return CausalLM(cfg, net, device=dev_name, use_jit=use_jit, model_dir=os.fspath(model_dir), tp=tp)
