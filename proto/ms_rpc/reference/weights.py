"""Reading an HF checkpoint's safetensors files into float32 numpy arrays, by tensor name.

The files are memory-mapped and parsed by their documented layout (an 8-byte header length, a JSON header of
name -> dtype, shape, byte offsets, then the data): numpy has no bfloat16, which is read as the high half of a
float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class Weights:
    def __init__(self, model_dir):
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        self.index: dict[str, tuple[np.memmap, dict]] = {}
        for f in files:
            raw = np.memmap(f, dtype=np.uint8, mode="r")
            n = int(raw[:8].view("<u8")[0])
            header = json.loads(bytes(raw[8:8 + n]))
            header.pop("__metadata__", None)
            for name, meta in header.items():
                self.index[name] = (raw[8 + n:], meta)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> np.ndarray:
        if name not in self.index:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        data, meta = self.index[name]
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {meta['dtype']}, not one of {sorted(DTYPES)}")
        start, stop = meta["data_offsets"]
        a = data[start:stop].view(DTYPES[meta["dtype"]]).reshape(meta["shape"])
        if meta["dtype"] == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(a, dtype=np.float32)
