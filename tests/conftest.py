"""Shared test helpers. Tests run in the front environment (.venv); workers run in .venv-worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT_PY = ROOT / ".venv" / "bin" / "python"
WORKER_PY = ROOT / ".venv-worker" / "bin" / "python"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

# Prompts of varied length; the last is longer than the chunked-prefill budget the server tests use.
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three prime numbers:",
    "Once upon a time, in a small village by the mountains, there lived",
    "Translate to French: Good morning, how are you today?",
    "1, 2, 3, 4,",
    "Explain gravity to a child in one paragraph. " * 8,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_default_model() -> Path:
    if not (DEFAULT_MODEL / ".complete").exists():
        pytest.fail(f"default model missing: run `make model` ({DEFAULT_MODEL})")
    return DEFAULT_MODEL


def hf_greedy(model_dir, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuation with HF transformers (torch, fp32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            res = model(x, use_cache=True)
            past, toks = res.past_key_values, []
            for _ in range(max_new):
                t = int(res.logits[0, -1].argmax())
                toks.append(t)
                res = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
                past = res.past_key_values
            out.append(toks)
    return out


def descendants(pid: int) -> list[int]:
    """All descendant pids of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Server:
    """`vllm serve ... --distributed-executor-backend ms_rpc` as a subprocess, on a loopback port."""

    def __init__(self, model, extra: list[str], env: dict | None = None, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(ROOT / ".venv" / "bin" / "vllm"), "serve", str(model), "--distributed-executor-backend",
               "ms_rpc", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", *extra]
        self.log_path = log_path
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 600) -> None:
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not healthy in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        if not self.log_path:
            return ""
        self.log.flush()
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def start_worker(model_dir, extra: list[str] | None = None, log_path: Path | None = None):
    """A real worker process in the worker env on a free loopback port. Returns (proc, address)."""
    import tempfile

    ready = Path(tempfile.mkdtemp()) / "port"
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(model_dir), "--port", "0",
                             "--ready-file", str(ready), *(extra or [])], stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"worker did not start (exit {proc.returncode}); log: {log_path}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


@pytest.fixture(scope="session")
def default_model() -> Path:
    return require_default_model()
