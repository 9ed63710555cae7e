"""The embedded default: start local MindSpore worker processes in the worker environment, and stop them.

The worker environment is a separate Python (MindSpore needs numpy<2, vLLM numpy 2). It is found from
`--additional-config '{"ms_rpc": {"worker_python": ...}}'`, the MS_RPC_WORKER_PYTHON variable, or the
repository's `.venv-worker`. Workers are started with fork+exec (never a fork of a process that ran MindSpore),
bind port 0 on loopback in plaintext (with the front's token, when one is configured), and report their port
through a ready file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_worker_python() -> str:
    return str(REPO_ROOT / ".venv-worker" / "bin" / "python")


class LaunchError(RuntimeError):
    pass


class LocalWorker:
    """One local worker process. Started at construction; `wait_ready()` returns once it serves."""

    def __init__(self, python: str, model: str, extra_args: list[str] | None = None, start_timeout: float = 300.0,
                 token: str | None = None, rank: int = 0):
        if not os.path.exists(python):
            raise LaunchError(
                f"ms_rpc: the worker Python {python} does not exist. Create the worker environment "
                f"(`make worker-env`), or point to one with MS_RPC_WORKER_PYTHON or "
                f'--additional-config \'{{"ms_rpc": {{"worker_python": "..."}}}}\', or give worker addresses.'
            )
        self.rank, self.start_timeout, self.address = rank, start_timeout, None
        self.tmpdir = tempfile.mkdtemp(prefix="ms_rpc_worker_")
        self.ready_file = os.path.join(self.tmpdir, "port")
        cmd = [python, "-m", "ms_worker", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
               "--ready-file", self.ready_file, "--parent-pid", str(os.getpid()), *(extra_args or [])]
        env = dict(os.environ)
        # vLLM's CPU platform preloads torch's libgomp (and tcmalloc) into its own processes through LD_PRELOAD;
        # the worker is another framework's process and must not inherit them.
        env.pop("LD_PRELOAD", None)
        env.setdefault("GLOG_v", "3")
        # Settings meant for external workers (and systemd's notify socket, which belongs to the front) stay out;
        # the token travels in the environment, never on the command line.
        for name in [k for k in env if k.startswith(("MS_WORKER_TLS_", "MS_WORKER_TOKEN"))] + ["NOTIFY_SOCKET"]:
            env.pop(name, None)
        if token:
            env["MS_WORKER_TOKEN"] = token
        log.info("ms_rpc: starting a local worker: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)

    def wait_ready(self) -> str:
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    text = f.read().strip()
                if text:
                    self.address = f"127.0.0.1:{int(text)}"
                    return self.address
            if self.proc.poll() is not None:
                raise LaunchError(f"ms_rpc: local worker rank {self.rank} exited with code {self.proc.returncode} "
                                  f"before it was ready (its log is above)")
            time.sleep(0.2)
        self.stop()
        raise LaunchError(f"ms_rpc: local worker rank {self.rank} was not ready within {self.start_timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0, kill: bool = False) -> None:
        """SIGTERM (the worker drains), SIGKILL after `timeout`; at once with `kill` (a hung worker)."""
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            for name in os.listdir(self.tmpdir):
                os.unlink(os.path.join(self.tmpdir, name))
            os.rmdir(self.tmpdir)
        except OSError:
            pass
