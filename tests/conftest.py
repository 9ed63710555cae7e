"""Shared test helpers. Tests run in the front environment (.venv); workers run in .venv-worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT_PY = ROOT / ".venv" / "bin" / "python"
WORKER_PY = ROOT / ".venv-worker" / "bin" / "python"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

# This checkout's packages come first, in this process and in every subprocess (vllm serve, its engine core,
# workers, scripts): the environments' editable installs point to the checkout that created them, which is another
# one when this is a git worktree sharing them.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "proto"),
                                            *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

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


def perturb_norms_and_biases(model, bias_std: float = 0.1):
    """HF initialises RMSNorm gammas to 1 and biases to 0, which would hide a wrong gamma or bias: randomise them
    (gammas 1 + N(0, 0.2), biases N(0, ``bias_std``); in place; returns the model)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, bias_std)
    return model


def toy_logits(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed random logits [size] for the sampler's distribution tests, their softmax p, and token ids by falling p."""
    logits = np.random.default_rng(0).normal(0, 1.5, size=size).astype(np.float32)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return logits, p, np.argsort(-p)


def one_row_request(sampling, req_id: str = "r"):
    """The per-request view ms_worker's Sampler reads, for a one-token request with these Sampling settings."""
    from types import SimpleNamespace

    return SimpleNamespace(req_id=req_id, token_ids=np.array([1], np.int32), num_prompt_tokens=1, sampling=sampling,
                           generator=None)


def assert_draws_follow(draws, expected: np.ndarray, what) -> None:
    """Chi-square goodness of fit of integer draws to the probabilities `expected` (renormalised); fails by chance
    once in 10^6 runs. A token of probability 0 must never be drawn."""
    from scipy.stats import chi2

    expected = expected / expected.sum()
    n = len(draws)
    counts = np.bincount(np.asarray(draws), minlength=len(expected))
    assert counts[expected == 0].sum() == 0, f"{what}: drew a token of probability 0"
    big = expected * n >= 5                                   # chi-square needs expected counts >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big] * n, expected[~big].sum() * n)
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    assert stat < chi2.ppf(1 - 1e-6, len(obs) - 1), (what, stat)


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
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_mib(pid: int) -> float:
    """A process's resident set size in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets) at `url` (a /metrics address)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def concurrent_greedy(url: str, model, prompt_ids: list[list[int]], max_new: int, stagger_s: float = 0.0,
                      timeout: float = 900) -> list[list[int]]:
    """One greedy /v1/completions request per prompt, all in flight together (request i starts after
    i * stagger_s seconds); returns each request's token ids. Any request's failure fails the caller. ``model``:
    the served model name, or a list of one per prompt (e.g. LoRA adapters' names)."""
    import json
    import threading
    import urllib.request

    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            time.sleep(stagger_s * i)
            body = {"model": str(model[i] if isinstance(model, list) else model), "prompt": prompt_ids[i], "max_tokens": max_new, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                got[i] = json.loads(r.read())["choices"][0]["token_ids"]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompt_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    return [got[i] for i in range(len(prompt_ids))]


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


def start_worker(model_dir, extra: list[str] | None = None, log_path: Path | None = None, env: dict | None = None,
                 entry: list[str] | None = None, python: Path = WORKER_PY):
    """A real worker process (`python`: the worker env's by default) on a free loopback port (`entry`: how Python
    starts it, `-m ms_worker` by default). Returns (proc, address)."""
    import tempfile

    ready = Path(tempfile.mkdtemp()) / "port"
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([str(python), *(entry or ["-m", "ms_worker"]), "serve", "--model", str(model_dir),
                             "--port", "0", "--ready-file", str(ready), *(extra or [])], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
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


def make_tiny_llama(path: Path) -> Path:
    """A tiny random Llama checkpoint made with HF transformers (loads in well under a second)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


def make_pki(d: Path) -> dict[str, Path]:
    """A throw-away PKI made with `cryptography`: a CA, a server certificate for 127.0.0.1/localhost, a client
    certificate from the same CA, and a second ("rogue") CA with its own client certificate. PEM paths by name."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Path] = {}

    def write(name: str, cert, key) -> None:
        out[name + "_cert"] = d / f"{name}.crt"
        out[name + "_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[name + "_key"] = d / f"{name}.key"
        out[name + "_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    def issue(cn: str, issuer=None, ca: bool = False, san=None, usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name)
             .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
        cert = b.sign(issuer[1] if issuer else key, hashes.SHA256())
        return cert, key

    ca = issue("ms-rpc test CA", ca=True)
    write("ca", *ca)
    write("server", *issue("ms-worker", ca, san=[x509.DNSName("localhost"),
                                                  x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                           usage=[ExtendedKeyUsageOID.SERVER_AUTH]))
    write("client", *issue("vllm-front", ca, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]))
    rogue = issue("rogue CA", ca=True)
    write("rogue_ca", *rogue)
    write("rogue_client", *issue("vllm-front", rogue, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))
