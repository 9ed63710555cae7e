"""The front's ms_rpc settings: each from `--additional-config '{"ms_rpc": {name: ...}}'`, else the environment
variable MS_RPC_<NAME>, else its default below."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from vllm_ext.client import ChannelSecurity
from vllm_ext.launcher import default_worker_python


class ConfigError(RuntimeError):
    pass


# For external workers, ChannelSecurity.load's arguments: tls (bool; MS_RPC_TLS=1), tls_ca, tls_cert + tls_key
# (mutual TLS), tls_server_name, token or token_file.
SECURITY_KEYS = ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token", "token_file")


@dataclass(frozen=True)
class RpcSettings:
    workers: tuple[str, ...] = ()         # external worker addresses (MS_RPC_WORKERS: comma separated); () = local
    worker_python: str = field(default_factory=default_worker_python)   # the local workers' Python
    worker_args: tuple[str, ...] = ()     # extra `ms-worker serve` arguments for local workers
    # experts over data-parallel engines, local workers: where the engines' one MindSpore cluster meets (the plugin
    # picks a free loopback port in the process that starts the engines)
    expert_cluster_addr: str = ""
    security: dict = field(default_factory=dict, repr=False)   # SECURITY_KEYS -> value (a token among them)
    # numbers: the type of the default is the setting's
    connect_timeout_s: float = 30.0       # wait for a worker's health SERVING at start-up
    step_timeout_s: float = 600.0         # the longest any step may take (the cap of the step deadline)
    step_deadline_floor_s: float = 120.0  # the step deadline: max(floor, factor x p90 of the last 64 steps)
    step_deadline_factor: float = 10.0
    reconnect_timeout_s: float = 300.0    # external workers: how long to wait for a lost worker to come back
    max_restarts: int = 5                 # local workers: restarts within restart_window_s before giving up
    restart_window_s: float = 600.0
    watch_interval_s: float = 2.0         # how often a rank's health is asked while its Health.Watch stream is closed
    heartbeat_interval_s: float = 1.0     # how often each rank's heartbeat is polled, during steps and between them
    hang_timeout_s: float = 5.0           # a rank that answers no heartbeat this long is hung (step_deadline_floor_s
                                          # while it said it was compiling)
    stats_interval_s: float = 30.0        # how often the step breakdown is logged (0 = never)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> RpcSettings:
        extra = (vllm_config.additional_config or {}).get("ms_rpc", {}) or {}
        env = {name: os.environ.get(f"MS_RPC_{name.upper()}") for name in
               (*SECURITY_KEYS, *(f.name for f in fields(cls)))}
        security = {k: extra.get(k, env[k]) for k in SECURITY_KEYS}
        tls = security["tls"]
        security["tls"] = tls if isinstance(tls, bool) else str(tls or "").strip().lower() in ("1", "true", "yes", "on")
        workers = extra.get("workers")
        if workers is None and env["workers"]:
            workers = [w.strip() for w in env["workers"].split(",") if w.strip()]
        values = dict(workers=tuple(workers or ()),
                      worker_python=extra.get("worker_python") or env["worker_python"] or default_worker_python(),
                      worker_args=tuple(extra.get("worker_args") or (env["worker_args"] or "").split()),
                      expert_cluster_addr=str(extra.get("expert_cluster_addr") or env["expert_cluster_addr"] or ""),
                      security=security)
        for f in fields(cls):
            if isinstance(f.default, (int, float)):
                raw = extra.get(f.name, f.default if env[f.name] is None else env[f.name])
                try:
                    values[f.name] = type(f.default)(raw)
                except (TypeError, ValueError):
                    raise ConfigError(f"ms_rpc setting {f.name} must be a number, got {raw!r}") from None
        return cls(**values)

    def channel_security(self) -> ChannelSecurity:
        """The TLS credentials and token the security settings name, read from their files."""
        try:
            return ChannelSecurity.load(**self.security)
        except ValueError as e:
            raise ConfigError(str(e)) from None
