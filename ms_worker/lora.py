"""LoRA adapters on the worker: PEFT adapters read and checked, kept in host memory, and put into the model's
slots (ms_models.lora.LoraSlots) when a step needs them, least recently used evicted as vLLM's LoRA manager does
(pinned adapters keep their slot).

A PEFT adapter is a directory with adapter_config.json (r, lora_alpha, use_rslora, target_modules) and
adapter_model.safetensors (``base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_A.weight`` [r, in]
and ``.lora_B.weight`` [out, r]). The scale is lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ms_rpc.v1 import LORA_FILES

CONFIG_FILE, WEIGHTS_FILE = LORA_FILES
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be loaded; ``missing``: its files cannot be read; ``full``: the worker holds
    max_cpu_loras adapters already."""

    def __init__(self, message: str, missing: bool = False, full: bool = False):
        super().__init__(message)
        self.missing = missing
        self.full = full


@dataclass
class Adapter:
    lora_id: int
    name: str
    rank: int
    weights: dict          # (layer, target) -> this rank's folded (A' [in, r], B' [r, out]) (LoraSlots.fold)


def read_peft(directory: str, name: str, slots, max_rank: int, num_layers: int) -> tuple[int, dict]:
    """(rank, weights) of the PEFT adapter in ``directory`` for ``slots`` (ms_models.lora.LoraSlots); LoraError
    naming the adapter and what is wrong: missing files, a rank above ``max_rank``, a target module ms_models
    does not adapt, shapes that do not match the model, PEFT options it does not serve."""
    from ms_models.loader import SafetensorsWeights
    from ms_models.lora import TARGETS

    what = f"LoRA adapter {name!r} ({directory})"
    for f in LORA_FILES:
        if not os.path.isfile(os.path.join(directory, f)):
            raise LoraError(f"{what}: no {f} (a PEFT adapter directory has {' and '.join(LORA_FILES)})", missing=True)
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as fh:
            cfg = json.load(fh)
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoraError(f"{what}: invalid {CONFIG_FILE}: {type(e).__name__}: {e}") from None
    if not 0 < r <= max_rank:
        raise LoraError(f"{what}: rank {r} is above --max-lora-rank {max_rank}" if r > 0 else f"{what}: rank {r}")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoraError(f"{what}: {key} is not supported (plain LoRA on {', '.join(TARGETS)})")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{what}: bias {cfg['bias']!r} is not supported (bias 'none' only)")
    declared = cfg.get("target_modules")
    if isinstance(declared, list):
        unknown = sorted(set(declared) - set(TARGETS))
        if unknown:
            raise LoraError(f"{what}: target modules {unknown} are not supported; supported: {', '.join(TARGETS)}")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    try:
        src = SafetensorsWeights(directory, progress=False)
    except (OSError, ValueError) as e:
        raise LoraError(f"{what}: {e}") from None
    try:
        pairs: dict = {}
        for key in src.names():
            m = _KEY.match(key)
            if m is None:
                raise LoraError(f"{what}: tensor {key!r} is not a LoRA weight of a supported target module "
                                f"({', '.join(TARGETS)})")
            layer, module, target, ab = int(m[1]), m[2], m[3], m[4]
            if target not in TARGETS or TARGETS[target][0] != module:
                raise LoraError(f"{what}: unknown target module {module}.{target} in {key!r}; supported: "
                                f"{', '.join(TARGETS)}")
            if layer >= num_layers:
                raise LoraError(f"{what}: {key!r} is for layer {layer}; the model has {num_layers} layers")
            pairs.setdefault((layer, target), {})[ab] = key
        if not pairs:
            raise LoraError(f"{what}: {WEIGHTS_FILE} holds no LoRA weights")
        weights = {}
        for (layer, target), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise LoraError(f"{what}: layer {layer} {target} has lora_{''.join(ab)} without its pair")
            n_in, n_out = slots.shapes[target]
            a, b = src.get(ab["A"]), src.get(ab["B"])
            if a.shape != (r, n_in) or b.shape != (n_out, r):
                raise LoraError(f"{what}: layer {layer} {target}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                f"do not match the model (expected [{r}, {n_in}] and [{n_out}, {r}] for rank {r})")
            weights[(layer, target)] = slots.fold(layer, target, a, b, scale)
    finally:
        src.close()
    return r, weights


class LoraManager:
    """The adapters this worker holds (at most ``max_cpu_loras``, in host memory) and which of them sit in the
    model's ``max_loras`` slots. load/remove/pin come from gRPC threads; activate runs on the model thread, under
    the service's step lock, as load's final insert and remove do."""

    def __init__(self, slots, max_cpu_loras: int = 0):
        self.slots = slots
        self.max_cpu_loras = max(max_cpu_loras, slots.max_loras)
        self.adapters: dict[int, Adapter] = {}
        self.pinned: set[int] = set()
        self.resident: OrderedDict[int, int] = OrderedDict()   # lora_id -> slot, least recently used first
        self.lock = threading.RLock()   # add checks room and inserts under one hold

    def read(self, lora_id: int, name: str, path: str, files: dict[str, bytes]) -> Adapter:
        """The adapter from ``path``, or from ``files`` (name -> content) when the front sent them."""
        if lora_id <= 0:
            raise LoraError(f"LoRA adapter {name!r}: id {lora_id} must be positive")
        s = self.slots
        if not files:
            rank, weights = read_peft(path, name, s, s.max_rank, s.num_layers)
            return Adapter(lora_id, name, rank, weights)
        unknown = sorted(set(files) - set(LORA_FILES))
        if unknown:
            raise LoraError(f"LoRA adapter {name!r}: unexpected files {unknown}; an adapter is {', '.join(LORA_FILES)}")
        tmp = tempfile.mkdtemp(prefix="ms_lora_")
        try:
            for f, data in files.items():
                with open(os.path.join(tmp, f), "wb") as fh:
                    fh.write(data)
            rank, weights = read_peft(tmp, f"{name}", s, s.max_rank, s.num_layers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Adapter(lora_id, name, rank, weights)

    def check_room(self, lora_id: int, name: str) -> None:
        """LoraError (full) if a new adapter would pass max_cpu_loras: the front removes one first."""
        with self.lock:
            if lora_id not in self.adapters and len(self.adapters) >= self.max_cpu_loras:
                raise LoraError(f"LoRA adapter {name!r}: this worker holds {len(self.adapters)} adapters "
                                f"(--max-cpu-loras {self.max_cpu_loras}); remove one first", full=True)

    def add(self, adapter: Adapter, replace: bool) -> bool:
        """False if the id is loaded already and ``replace`` is not set (vLLM's add_lora)."""
        with self.lock:
            self.check_room(adapter.lora_id, adapter.name)   # under the same lock as the insert
            if adapter.lora_id in self.adapters and not replace:
                return False
            self.adapters[adapter.lora_id] = adapter
            self.resident.pop(adapter.lora_id, None)   # a replaced adapter is written again when next needed
            return True

    def remove(self, lora_id: int) -> bool:
        with self.lock:
            self.pinned.discard(lora_id)
            self.resident.pop(lora_id, None)
            return self.adapters.pop(lora_id, None) is not None

    def pin(self, lora_id: int) -> bool:
        with self.lock:
            if lora_id not in self.adapters:
                return False
            self.pinned.add(lora_id)
            return True

    def ids(self) -> list[int]:
        with self.lock:
            return sorted(self.adapters)

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self.adapters

    def activate(self, lora_ids) -> dict[int, int]:
        """Slots for the adapters of a step ({lora_id: slot}); loads the missing ones into free slots or those of
        the least recently used adapters not in the step and not pinned. ValueError if they do not fit."""
        need = sorted(set(lora_ids))
        with self.lock:
            if len(need) > self.slots.max_loras:
                raise ValueError(f"{len(need)} LoRA adapters in one step, more than --max-loras "
                                 f"{self.slots.max_loras}")
            for i in need:
                if i in self.resident:
                    self.resident.move_to_end(i)
            for i in need:
                if i in self.resident:
                    continue
                used = set(self.resident.values())
                free = [s for s in range(self.slots.max_loras) if s not in used]
                if not free:
                    victim = next((v for v in self.resident if v not in need and v not in self.pinned), None)
                    if victim is None:
                        raise ValueError(f"no LoRA slot free for adapter {i}: all {self.slots.max_loras} hold "
                                         f"pinned adapters or adapters of this step")
                    free = [self.resident.pop(victim)]
                self.slots.write(free[0], self.adapters[i].weights)
                self.resident[i] = free[0]
            return {i: self.resident[i] for i in need}
