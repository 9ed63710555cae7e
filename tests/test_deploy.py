"""The deploy files in scripts/deploy, checked with the real validators (systemd-analyze verify, kubernetes-validate
with its bundled schemas) and against the real CLI flags and executor settings they name."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DEPLOY = ROOT / "scripts" / "deploy"
UNITS = ["ms-worker@.service", "vllm-ms-rpc.service"]
INSTALL_PREFIX = "/opt/vllm-ms-rpc"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: `make deploy-tools` installs it (Debian package systemd)")
    return tool


def _render_units(d: Path) -> list[Path]:
    """The units as installed from this checkout: the install prefix is this repository (so ExecStart exists)."""
    out = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text().replace(INSTALL_PREFIX, str(ROOT))
        target = d / name.replace("@.", "@0.")          # verify an instance of the template
        target.write_text(text)
        out.append(target)
    return out


def test_systemd_units_verify(tmp_path):
    tool = _systemd_analyze()
    units = _render_units(tmp_path)
    out = subprocess.run([tool, "verify", *map(str, units)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values, with a message: any message fails the test.
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr
    # The validator does catch mistakes (a typo'd key, a missing binary).
    bad = tmp_path / "bad@0.service"
    bad.write_text(units[0].read_text().replace("Restart=on-failure", "Restart=on-failure\nRestartt=always")
                   .replace("/bin/ms-worker serve", "/bin/ms-worker-nope serve"))
    out = subprocess.run([tool, "verify", str(bad)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Unknown key 'Restartt'" in out.stderr and "ms-worker-nope" in out.stderr, out.stderr


def test_worker_unit_shape():
    unit = (DEPLOY / "systemd" / "ms-worker@.service").read_text()
    for line in ["Type=notify", "Restart=on-failure", "EnvironmentFile=/etc/ms-worker/%i.env",
                 "Environment=MS_WORKER_DEVICE=ascend:%i", f"ExecStart={INSTALL_PREFIX}/.venv-worker/bin/ms-worker serve"]:
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line


def _help_text() -> str:
    out = subprocess.run([str(ROOT / ".venv-worker/bin/ms-worker"), "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _front_variables() -> set[str]:
    from vllm_ext.settings import SECURITY_KEYS

    return {"MS_RPC_WORKERS", "MS_RPC_WORKER_PYTHON", "MS_RPC_WORKER_ARGS", "MS_RPC_CONNECT_TIMEOUT_S",
            "MS_RPC_STEP_TIMEOUT_S"} | {f"MS_RPC_{k.upper()}" for k in SECURITY_KEYS}


def _k8s_docs() -> list[dict]:
    docs = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_every_variable_the_deploy_files_set_is_real():
    help_text = _help_text()
    front = _front_variables()
    texts = [p.read_text() for p in [*(DEPLOY / "systemd").iterdir(), *(DEPLOY / "kubernetes").glob("*.yaml")]]
    names = set()
    for t in texts:
        names |= set(re.findall(r"\b(MS_WORKER_[A-Z_]+|MS_RPC_[A-Z_]+)\b", t))
    assert {"MS_WORKER_MODEL", "MS_WORKER_TOKEN_FILE", "MS_RPC_TLS_CA", "MS_RPC_WORKERS"} <= names
    for name in names:
        if name.startswith("MS_WORKER_"):
            assert f"[{name}" in help_text, f"{name} is not an `ms-worker serve` variable"
        else:
            assert name in front, f"{name} is not a setting the front reads"


def test_kubernetes_manifests_validate(tmp_path):
    tool = Path(sys.executable).parent / "kubernetes-validate"
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    assert len(files) >= 2
    # 1.28: the oldest release with everything used here (gRPC probes, the pod-index label); and the newest bundled.
    for version in ("1.28.0", None):
        args = [str(tool), "--strict", *(["-k", version] if version else []), *files]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count("passed") == sum(1 for _ in _k8s_docs()), out.stdout
    # The validator does reject a misspelt field.
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(files[0]).read_text().replace("readinessProbe:", "readinessProbes:"))
    out = subprocess.run([str(tool), "--strict", str(bad)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "readinessProbes" in out.stdout + out.stderr, out.stdout + out.stderr


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_kubernetes_pieces_fit_together():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_docs()}
    sts = docs[("StatefulSet", "ms-worker")]
    headless = docs[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    worker = sts["spec"]["template"]["spec"]["containers"][0]
    wenv = _env(worker)
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert str(ports["grpc"]) == wenv["MS_WORKER_PORT"] and str(ports["health"]) == wenv["MS_WORKER_HEALTH_PORT"]
    assert str(ports["metrics"]) == wenv["MS_WORKER_METRICS_PORT"]
    assert wenv["MS_WORKER_HOST"] == "0.0.0.0" and wenv["MS_WORKER_TOKEN_FILE"] and wenv["MS_WORKER_TLS_CLIENT_CA"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == ports["health"], probe
    # The front names every worker pod by its stable DNS name, on the gRPC port, with matching credentials.
    front = docs[("Deployment", "vllm-front")]["spec"]["template"]["spec"]["containers"][0]
    cmd = front["command"]
    ms_rpc = json.loads(cmd[cmd.index("--additional-config") + 1])["ms_rpc"]
    expected = [f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}:{ports['grpc']}"
                for i in range(sts["spec"]["replicas"])]
    assert ms_rpc["workers"] == expected
    fenv = _env(front)
    assert {"MS_RPC_TLS_CA", "MS_RPC_TLS_CERT", "MS_RPC_TLS_KEY", "MS_RPC_TOKEN_FILE"} <= fenv.keys()
    assert cmd[cmd.index("serve") + 1] == wenv["MS_WORKER_MODEL"], "front and worker serve the same model"
    secrets = lambda spec: {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}  # noqa: E731
    assert "ms-rpc-token" in secrets(sts["spec"]["template"]["spec"])
    assert "ms-rpc-token" in secrets(docs[("Deployment", "vllm-front")]["spec"]["template"]["spec"])
