"""Benchmark: native vLLM CPU (fp32) against ms_rpc on the same checkpoint, one after the other.

usage (front environment):
    .venv/bin/python scripts/bench.py [--model DIR] [--concurrency 1,8,32] [--num-prompts N] [--repeat 3]
                                      [--input-len L] [--output-len L] [--backends native,ms_rpc] [--offline]
                                      [--prefill-heavy] [--workload random|repetitive]

Online (default): each backend runs as its own `vllm serve` subprocess on a free loopback port (never both at
once), and is driven through the OpenAI completions API with the same workload: fixed random token-id prompts of
`--input-len` tokens, `max_tokens=--output-len`, `ignore_eos`, greedy, streamed (for TTFT and inter-token
latency). For each concurrency level, one warm-up round (`concurrency` requests, other prompts) runs first, then
`--repeat` (3) timed runs of `--num-prompts` requests each (default 2 x concurrency, at most 64; new prompts each
run) with at most `concurrency` in flight; the table shows each figure's median over the runs, and the spread of
tok/s.

Printed per backend and concurrency: output tok/s, TTFT p50/p99, ITL p50/p99 (gap between streamed tokens),
peak RSS (polled) of the model process(es) -- native: the engine-core process tree; ms_rpc: the `ms_worker serve`
process(es) -- and of all the server's children, and the ratio ms_rpc/native. Start-up: process start -> /health
200 -> first request served. For ms_rpc, the embedded worker gets `--metrics-port` (via MS_RPC_WORKER_ARGS) and
the worker's step metrics (mean Execute/Sample wall time per step, mean batch size) are printed per level, with
the executor's step breakdown (encode, transfer, the worker's prepare/forward/sample, decode: the
`ms_rpc step breakdown` lines it logs every MS_RPC_STATS_INTERVAL_S, 5 s here, summed over the level).

A +lora suffix (native+lora, ms_rpc+lora) serves `--lora-adapters` random PEFT adapters of rank `--lora-rank` on all
seven target modules (written into the log directory) with `--enable-lora --max-loras N`, and the requests cycle
through the adapters' names: every batch mixes the adapters.

Backends: native, ms_rpc, and ms_rpc_tpN (ms_rpc with --tensor-parallel-size N: N embedded worker ranks joined
by MindSpore's collectives; the collectives' time is inside "forward").

reference-sim (alone; `--sim-step-ms MS`, `--sync-front`): the front at accelerator speed. `vllm serve
--async-scheduling` with the numpy reference worker (`python -m ms_rpc.reference serve --simulate-step-ms MS`)
as its external worker: each step takes MS on the simulated device, whatever its size. After a warm-up round, one
timed run of `--num-prompts` (default 2 x concurrency) requests at the highest `--concurrency`; the last line is
`front: busy=<fraction of wall time the device was busy> step_ms=MS concurrency=C steps/s=N` (busy: the
worker's HeartbeatReply.busy_s over the run), after the executor's step breakdown (encode, transfer, decode:
the wire's cost; the worker's wait behind the step ahead, with two steps in flight, is reported apart).

--offline: each backend in its own Python subprocess with `LLM.generate` on `--num-prompts` prompts (default 64),
after a warm-up generate of as many other prompts; prints total output tok/s and engine start-up time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
MAX_MODEL_LEN = 1024

sys.path.insert(0, str(ROOT / "tests"))
from conftest import cmdline, descendants, free_port  # noqa: E402  (the tests' /proc and port helpers)
from lora_adapters import TARGETS, make_adapter  # noqa: E402


# -- helpers ----------------------------------------------------------------------------------------------------
def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_prompts(n: int, length: int, vocab: int, seed: int, workload: str = "random") -> list[list[int]]:
    """Random token ids; "repetitive": a random passage of 24 tokens quoted over and over (text that quotes
    itself, where n-gram drafts find their match)."""
    rng = random.Random(seed)
    # stay clear of the special tokens at the start of the vocabulary
    out = [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(n)]
    if workload == "repetitive":
        out = [(p[:24] * (length // 24 + 1))[:length] for p in out]
    return out


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def vocab_size(model: str) -> int:
    with open(Path(model) / "config.json") as f:
        return int(json.load(f)["vocab_size"])


# -- memory sampling --------------------------------------------------------------------------------------------
class RssSampler:
    """Polls RSS (sum over processes) of the model processes and of all the server's descendants."""

    def __init__(self, root_pid: int, backend: str, interval: float = 0.1):
        self.root, self.backend, self.interval = root_pid, backend, interval
        self.peak_model = self.peak_tree = 0           # KiB, since the last reset()
        self.model_pids: set[int] = set()
        self.hwm: dict[int, int] = {}                  # pid -> last VmHWM seen (KiB)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _is_model(self, pid: int) -> bool:
        cl = cmdline(pid)
        if self.backend.startswith("ms_rpc"):
            return "ms_worker serve" in cl
        return cl.startswith("VLLM::")                  # native: EngineCore and its Worker (not compile helpers)

    def _run(self):
        while not self._stop.is_set():
            pids = descendants(self.root)
            model = [p for p in pids if self._is_model(p)]
            tree = sum(status_kib(p, "VmRSS") for p in pids)
            mod = sum(status_kib(p, "VmRSS") for p in model)
            with self._lock:
                self.model_pids.update(model)
                self.peak_model = max(self.peak_model, mod)
                self.peak_tree = max(self.peak_tree, tree)
                for p in model:
                    h = status_kib(p, "VmHWM")
                    if h:
                        self.hwm[p] = h
            self._stop.wait(self.interval)

    def reset(self):
        with self._lock:
            self.peak_model = self.peak_tree = 0

    def peaks_mib(self) -> tuple[float, float]:
        with self._lock:
            return self.peak_model / 1024, self.peak_tree / 1024

    def hwm_mib(self) -> float:
        with self._lock:
            return sum(self.hwm.values()) / 1024

    def stop(self):
        self._stop.set()
        self.thread.join(2)


# -- the server -------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, backend: str, model: str, kv_bytes: int, logdir: Path, extra: list[str], workers: str = ""):
        """`workers`: external ms_rpc workers (MS_RPC_WORKERS) instead of an embedded one."""
        self.backend, self.model = backend, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(VENV_BIN / "vllm"), "serve", model, "--dtype", "float32", "--host", "127.0.0.1",
               "--port", str(self.port), "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0", *extra]
        if backend.endswith("+ngram"):
            cmd += ["--speculative-config", json.dumps(NGRAM)]
        env = dict(os.environ)
        self.metrics_port = None
        if workers:
            cmd += ["--distributed-executor-backend", "ms_rpc"]
            env["MS_RPC_WORKERS"] = workers
            env.setdefault("MS_RPC_STATS_INTERVAL_S", "5")
        elif backend.startswith("ms_rpc"):
            cmd += ["--distributed-executor-backend", "ms_rpc"]
            tp = re.fullmatch(r"ms_rpc_tp(\d+)(\+ngram)?", backend)
            if tp:
                cmd += ["--tensor-parallel-size", tp.group(1)]
            self.metrics_port = free_port()      # rank 0's (with TP, the other ranks get no metrics port)
            env["MS_RPC_WORKER_ARGS"] = (env.get("MS_RPC_WORKER_ARGS", "") + f" --metrics-port {self.metrics_port}").strip()
            env.setdefault("MS_RPC_STATS_INTERVAL_S", "5")
        self.log_path = logdir / f"{backend}_serve.log"
        self.log = open(self.log_path, "w")
        print(f"[{backend}] {' '.join(cmd)}  (log: {self.log_path})", flush=True)
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)
        self.rss = RssSampler(self.proc.pid, backend)

    def wait_healthy(self, timeout: float = 900) -> float:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.backend}: vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.t_start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.backend}: not healthy in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        try:
            return "".join(open(self.log_path).readlines()[-n:])
        except OSError:
            return ""

    def worker_metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples (name{labels} -> value); {} when there is no metrics port."""
        if not self.metrics_port:
            return {}
        import httpx

        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith("ms_worker_") and " " in line:
                k, v = line.rsplit(" ", 1)
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def stop(self):
        self.rss.stop()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


# -- the load generator -----------------------------------------------------------------------------------------
async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    t0 = time.perf_counter()
    stamps: list[tuple[float, int]] = []              # (time, tokens in this chunk)
    usage_tokens = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            now = time.perf_counter()
            if msg.get("usage"):
                usage_tokens = msg["usage"].get("completion_tokens")
            for ch in msg.get("choices") or []:
                ids = ch.get("token_ids")
                n = len(ids) if ids is not None else (1 if ch.get("text") else 0)
                if n:
                    stamps.append((now, n))
    t_end = time.perf_counter()
    if not stamps:
        raise RuntimeError("no tokens streamed")
    ntok = sum(n for _, n in stamps)
    itl = []
    for (ta, _), (tb, nb) in zip(stamps, stamps[1:]):
        itl.extend([(tb - ta) / nb] * nb)
    return dict(ttft=stamps[0][0] - t0, itl=itl, tokens=usage_tokens if usage_tokens is not None else ntok,
                streamed=ntok, latency=t_end - t0)


async def run_level(url: str, model, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    """``model``: the served name, or a list of names the requests cycle through (LoRA adapters)."""
    import httpx

    names = model if isinstance(model, list) else [model]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def go(i, p):
            async with sem:
                return await one_request(client, url, names[i % len(names)], p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(i, p) for i, p in enumerate(prompts)), return_exceptions=True)
        wall = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    tokens = sum(r["tokens"] for r in ok)
    return dict(wall=wall, tokens=tokens, ok=len(ok), errors=[repr(e)[:300] for e in errors],
                short=sum(1 for r in ok if r["tokens"] != max_tokens),
                ttft=[r["ttft"] for r in ok], itl=[x for r in ok for x in r["itl"]])


def step_delta(before: dict, after: dict) -> str:
    """Mean wall time per worker step call and mean batch size between two metric scrapes."""
    parts = []
    for key in sorted(after):
        m = re.match(r'ms_worker_step_seconds_count\{call="(\w+)"\}', key)
        if not m:
            continue
        call = m.group(1)
        n = after[key] - before.get(key, 0)
        s_key = f'ms_worker_step_seconds_sum{{call="{call}"}}'
        s = after.get(s_key, 0) - before.get(s_key, 0)
        if n > 0:
            parts.append(f"{call}: {n:.0f} steps, {1000 * s / n:.1f} ms/step, {s:.1f} s total")
    n = after.get("ms_worker_batch_size_count", 0) - before.get("ms_worker_batch_size_count", 0)
    s = after.get("ms_worker_batch_size_sum", 0) - before.get("ms_worker_batch_size_sum", 0)
    if n > 0:
        parts.append(f"mean batch {s / n:.1f}")
    t = after.get("ms_worker_scheduled_tokens_total", 0) - before.get("ms_worker_scheduled_tokens_total", 0)
    if t:
        parts.append(f"{t:.0f} tokens computed")
    return "; ".join(parts)


BREAKDOWN = re.compile(r"ms_rpc step breakdown over (\d+) steps: (.*) outside_forward_sample=.*"
                       r"engine between steps: ([\d.]+)ms(?:.*waiting behind it ([\d.]+)ms)?")


def step_breakdown(log_text: str) -> str:
    """The executor's `ms_rpc step breakdown` lines in `log_text`, summed: mean ms per step of each part, its
    share, and the share outside forward + sample."""
    steps, sums, engine, waited = 0, {}, 0.0, 0.0
    for m in BREAKDOWN.finditer(log_text):
        n = int(m.group(1))
        steps += n
        engine += n * float(m.group(3))
        waited += n * float(m.group(4) or 0)
        for part, ms in re.findall(r"(\w+)=([\d.]+)ms", m.group(2)):
            sums[part] = sums.get(part, 0.0) + n * float(ms)
    if not steps:
        return ""
    total = sum(sums.values()) or 1e-12
    outside = sum(v for k, v in sums.items() if k not in ("forward", "sample"))
    return (f"{steps} steps: " + ", ".join(f"{k} {v / steps:.2f} ms ({100 * v / total:.1f}%)" for k, v in sums.items())
            + f"; outside forward+sample {100 * outside / total:.2f}%; vLLM engine between steps "
            f"{engine / steps:.2f} ms; the worker waited behind the step ahead {waited / steps:.2f} ms")


def bench_online(backend: str, a, logdir: Path, out: dict) -> dict:
    """Fills `out` as it goes, so that the levels done are kept when a later one fails."""
    vocab = vocab_size(a.model)
    out.update(backend=backend, levels={}, steps={}, breakdown={}, t_health=float("nan"), t_first=float("nan"))
    extra, model = list(a.serve_arg), a.model
    if backend.endswith("+lora"):
        names = [f"lora{i}" for i in range(a.lora_adapters)]
        for i, n in enumerate(names):
            if not (logdir / n / "adapter_model.safetensors").exists():
                make_adapter(logdir / n, Path(a.model), r=a.lora_rank, alpha=2 * a.lora_rank, targets=TARGETS,
                             seed=i)
        extra += ["--enable-lora", "--max-loras", str(a.lora_adapters), "--max-lora-rank", str(a.lora_rank),
                  "--lora-modules", *(f"{n}={logdir / n}" for n in names)]
        model = names
    srv = Server(backend, a.model, a.kv_cache_bytes, logdir, extra)
    try:
        out["t_health"] = srv.wait_healthy()
        warm = make_prompts(1, a.input_len, vocab, seed=999, workload=a.workload)
        asyncio.run(run_level(srv.url, model, warm, a.output_len, 1))
        out["t_first"] = time.monotonic() - srv.t_start
        out["rss_idle"] = srv.rss.peaks_mib()
        wm = srv.worker_metrics()
        if wm:       # the worker's weights and KV cache (rank 0's; with TP, every rank holds as much)
            out["weights_kv_mib"] = (wm.get("ms_worker_weight_bytes", 0) + wm.get("ms_worker_kv_cache_bytes", 0)) / 2**20
        print(f"[{backend}] healthy after {out['t_health']:.1f} s, first request served after "
              f"{out['t_first']:.1f} s", flush=True)
        for c in a.concurrency:
            n = a.num_prompts or min(2 * c, 64)
            if a.warmup:
                asyncio.run(run_level(srv.url, model, make_prompts(c, a.input_len, vocab, seed=10_000 + c,
                                                                     workload=a.workload), a.output_len, c))
            m0 = srv.worker_metrics()
            log_at = srv.log_path.stat().st_size
            runs = out["levels"][c] = []
            for r in range(a.repeat):
                srv.rss.reset()
                prompts = make_prompts(n, a.input_len, vocab, seed=c + 1000 * r, workload=a.workload)
                res = asyncio.run(run_level(srv.url, model, prompts, a.output_len, c))
                res["rss_model"], res["rss_tree"] = srv.rss.peaks_mib()
                res["n"] = n
                runs.append(res)
                print(f"[{backend}] c={c} run {r + 1}/{a.repeat}: {res['tokens'] / res['wall']:.1f} tok/s, "
                      f"{res['ok']}/{n} ok" + (f", errors: {res['errors'][:2]}" if res["errors"] else ""), flush=True)
            m1 = srv.worker_metrics()
            time.sleep(5.5)              # the executor logs its breakdown every 5 s (at a step)
            with open(srv.log_path, errors="replace") as f:
                f.seek(log_at)
                out["breakdown"][c] = step_breakdown(f.read())
            if m1:
                out["steps"][c] = step_delta(m0, m1)
        out["hwm_model"] = srv.rss.hwm_mib()
        out["model_pids"] = sorted({cmdline(p).split(" --")[0].strip()[:60] for p in srv.rss.model_pids} - {""})
    finally:
        srv.stop()
    return out


# -- the front at accelerator speed -------------------------------------------------------------------------------
def heartbeat(address: str):
    import grpc

    from ms_rpc.v1 import PROTOCOL_VERSION
    from ms_rpc.v1 import worker_pb2 as pb
    from ms_rpc.v1 import worker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ModelWorkerStub(ch).Heartbeat(pb.HeartbeatRequest(protocol_version=PROTOCOL_VERSION), timeout=5)


def bench_front(a, logdir: Path) -> None:
    """--backends reference-sim: vLLM's OpenAI server (with --async-scheduling unless --sync-front) in front of the
    numpy reference worker simulating a device that takes --sim-step-ms per step. The device's busy fraction is
    the worker's HeartbeatReply.busy_s gained over the timed run, divided by the run's wall time."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    wlog = open(logdir / "reference-sim_worker.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "proto"), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen([sys.executable, "-m", "ms_rpc.reference", "serve", "--model", a.model, "--port",
                               str(port), "--simulate-step-ms", str(a.sim_step_ms), "--log-level", "WARNING"],
                              stdout=wlog, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    c = max(a.concurrency)
    extra = [*a.serve_arg, "--max-num-seqs", str(max(c, 64))] + ([] if a.sync_front else ["--async-scheduling"])
    srv = Server("reference-sim", a.model, a.kv_cache_bytes, logdir, extra, workers=address)
    try:
        srv.wait_healthy()
        vocab = vocab_size(a.model)
        asyncio.run(run_level(srv.url, a.model, make_prompts(c, a.input_len, vocab, seed=10_000 + c), a.output_len, c))
        log_at = srv.log_path.stat().st_size
        seen, stop = [], threading.Event()

        def watch():        # the step ids the worker runs (HeartbeatReply.step_id), to count the steps
            while not stop.is_set():
                seen.append(heartbeat(address).step_id)
                time.sleep(0.02)

        before, t0 = heartbeat(address).busy_s, time.monotonic()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        n = a.num_prompts or 2 * c
        res = asyncio.run(run_level(srv.url, a.model, make_prompts(n, a.input_len, vocab, seed=c), a.output_len, c))
        wall, busy = time.monotonic() - t0, heartbeat(address).busy_s - before
        stop.set()
        watcher.join()
        steps = max(seen) - min(x for x in seen if x) if any(seen) else 0
        time.sleep(5.5)              # the executor logs its breakdown every 5 s (at a step)
        with open(srv.log_path, errors="replace") as f:
            f.seek(log_at)
            breakdown = step_breakdown(f.read())
        print(f"[reference-sim] {res['ok']}/{n} requests ok, {res['tokens'] / wall:.1f} tok/s; executor: {breakdown}")
        print(f"front: busy={busy / wall:.3f} step_ms={a.sim_step_ms:.1f} concurrency={c} steps/s={steps / wall:.1f}"
              + (" (sync front)" if a.sync_front else ""), flush=True)
    finally:
        srv.stop()
        worker.terminate()
        worker.wait(30)
        wlog.close()


# -- offline ----------------------------------------------------------------------------------------------------
OFFLINE_CHILD = r"""
import json, sys, time
a = json.loads(sys.stdin.readline())
t0 = time.monotonic()
from vllm import LLM, SamplingParams, TokensPrompt
kw = dict(model=a["model"], dtype="float32", max_model_len=a["max_model_len"], seed=0,
          kv_cache_memory_bytes=a["kv_bytes"])
if a["backend"] == "ms_rpc":
    kw["distributed_executor_backend"] = "ms_rpc"
llm = LLM(**kw)
t_init = time.monotonic() - t0
sp = SamplingParams(temperature=0, max_tokens=a["output_len"], ignore_eos=True)
llm.generate([TokensPrompt(prompt_token_ids=p) for p in a["warm"]], sp, use_tqdm=False)
t1 = time.perf_counter()
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in a["prompts"]], sp, use_tqdm=False)
wall = time.perf_counter() - t1
toks = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps(dict(t_init=t_init, wall=wall, tokens=toks, n=len(outs))), flush=True)
"""


def bench_offline(backend: str, a, logdir: Path) -> dict:
    vocab = vocab_size(a.model)
    n = a.num_prompts or 64
    arg = dict(model=a.model, backend=backend, max_model_len=MAX_MODEL_LEN, kv_bytes=a.kv_cache_bytes,
               output_len=a.output_len, prompts=make_prompts(n, a.input_len, vocab, seed=1),
               warm=make_prompts(n, a.input_len, vocab, seed=999))   # same batch shapes as the timed run
    log_path = logdir / f"{backend}_offline.log"
    print(f"[{backend}] offline LLM.generate, {n} prompts (log: {log_path})", flush=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        p = subprocess.Popen([str(VENV_BIN / "python"), "-c", OFFLINE_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, start_new_session=True)
        rss = RssSampler(p.pid, backend)
        p.stdin.write(json.dumps(arg) + "\n")   # the prompts (too long for an argument)
        p.stdin.close()
        lines = list(p.stdout)
        p.wait()
    rss.stop()
    res = next((json.loads(l[7:]) for l in lines if l.startswith("RESULT ")), None)
    if res is None:
        raise RuntimeError(f"{backend} offline failed (rc {p.returncode}); see {log_path}")
    res["t_total"] = time.monotonic() - t0
    res["hwm_model"] = rss.hwm_mib()
    return res


# -- main -------------------------------------------------------------------------------------------------------
def fmt_ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y and y == y and x == x else "-"


def print_online(results: dict, a):
    hdr = (f"{'backend':12} {'conc':>4} {'n':>3} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
           f"{'ITL p99':>8} {'model RSS':>9} {'tree RSS':>9} {'err':>3}")
    print(f"\nOnline: input {a.input_len} tokens, output {a.output_len} tokens (ignore_eos, greedy, streamed); "
          f"times in ms, RSS = peak polled RSS in MiB during the level; each figure the median of "
          f"{a.repeat} run(s) of the level")
    print("model RSS: native = engine-core process tree; ms_rpc = `ms_worker serve` process. "
          "tree RSS: all children of `vllm serve` (excl. the API server itself)")
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for b, r in results.items():
        for c, runs in r["levels"].items():
            per_run = [dict(tps=lv["tokens"] / lv["wall"], t50=1000 * pct(lv["ttft"], 50),
                            t99=1000 * pct(lv["ttft"], 99), i50=1000 * pct(lv["itl"], 50),
                            i99=1000 * pct(lv["itl"], 99), rm=lv["rss_model"], rt=lv["rss_tree"]) for lv in runs]
            if not per_run:
                continue
            row = {k: pct([x[k] for x in per_run], 50) for k in per_run[0]}
            rows[(b, c)] = row
            tps = sorted(x["tps"] for x in per_run)
            spread = f"   (tok/s of {len(tps)} runs: {tps[0]:.1f}..{tps[-1]:.1f})" if len(tps) > 1 else ""
            print(f"{b:12} {c:>4} {runs[0]['n']:>3} {row['tps']:>9.1f} {row['t50']:>9.1f} {row['t99']:>9.1f} "
                  f"{row['i50']:>8.1f} {row['i99']:>8.1f} {row['rm']:>9.0f} {row['rt']:>9.0f} "
                  f"{sum(len(lv['errors']) + lv['short'] for lv in runs):>3}{spread}")
    pairs = []
    for b in results:
        base, plus, suffix = b.partition("+")
        if b.startswith("ms_rpc"):
            pairs.append((b, "native" + plus + suffix))    # the same speculative config or adapters
        if suffix == "lora":
            pairs.append((b, base))                       # adapters against the base model alone
    for b, nb in pairs:
        for c in a.concurrency:
            n, m = rows.get((nb, c)), rows.get((b, c))
            if n and m:
                print(f"{'ratio':10} {c:>4} {'':>3} " + " ".join(
                    f"{fmt_ratio(m[k], n[k]):>{w}}" for k, w in
                    [("tps", 9), ("t50", 9), ("t99", 9), ("i50", 8), ("i99", 8), ("rm", 9), ("rt", 9)])
                    + f"   ({b} / {nb})")
    print("(ratio = first / second backend: >1 is better for tok/s, worse for latency and RSS)")
    print("\nStart-up (s): process start -> /health 200 -> first request served; VmHWM: sum over the model "
          "processes of their peak RSS over the whole run")
    for b, r in results.items():
        print(f"  {b:10} health {r['t_health']:6.1f}   first request {r['t_first']:6.1f}   "
              f"VmHWM {r.get('hwm_model', float('nan')):7.0f} MiB   model procs: {r.get('model_pids', [])}")
    for b, r in results.items():
        if r.get("weights_kv_mib"):
            peak = max((rows[(b, c)]["rm"] for c in r["levels"] if (b, c) in rows), default=float("nan"))
            print(f"  {b:10} worker weights + KV cache {r['weights_kv_mib']:.0f} MiB; RSS target (+500 MiB) "
                  f"{r['weights_kv_mib'] + 500:.0f} MiB per rank; highest median peak model RSS {peak:.0f} MiB "
                  f"(all ranks)")
    for b, r in results.items():
        if r.get("steps"):
            print(f"\n{b} worker step metrics (rank 0's ms_worker_step_seconds / batch_size, per level):")
            for c, s in r["steps"].items():
                print(f"  c={c}: {s}")
        if any((r.get("breakdown") or {}).values()):
            print(f"\n{b} step breakdown (executor: encode, transfer = RPC round trip less the worker's time, "
                  f"decode; worker: prepare, forward, sample), per level:")
            for c, s in r["breakdown"].items():
                print(f"  c={c}: {s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="requests per level (default: 2 x concurrency, at most 64; offline: 64)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--backends", default="native,ms_rpc",
                    help="native, ms_rpc, ms_rpc_tpN; a +ngram suffix adds --speculative-config " + json.dumps(NGRAM)
                    + "; or reference-sim alone: the front in front of a simulated device (--sim-step-ms)")
    ap.add_argument("--workload", choices=("random", "repetitive"), default="random",
                    help="prompts of random tokens, or a 24-token passage repeated (where ngram drafts match)")
    ap.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache size, both backends (MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per level (figures: their median)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the warm-up round before each concurrency level")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for both `vllm serve` commands (repeat; e.g. --serve-arg=--enforce-eager)")
    ap.add_argument("--offline", action="store_true", help="LLM.generate in a subprocess per backend instead")
    ap.add_argument("--prefill-heavy", action="store_true",
                    help="the prefill-heavy load: 16 concurrent streams, 500-token prompts, 8 output tokens")
    ap.add_argument("--logdir", default="", help="where the server logs go (default: a new temp dir)")
    ap.add_argument("--sim-step-ms", type=float, default=15.0,
                    help="reference-sim: the simulated device's time per step (ms)")
    ap.add_argument("--sync-front", action="store_true", help="reference-sim: without --async-scheduling")
    ap.add_argument("--lora-adapters", type=int, default=2, help="+lora backends: adapters served (and --max-loras)")
    ap.add_argument("--lora-rank", type=int, default=16, help="+lora backends: the adapters' rank (all 7 targets)")
    a = ap.parse_args()
    if a.prefill_heavy:
        a.concurrency, a.input_len, a.output_len = [16], 500, 8
    a.kv_cache_bytes = a.kv_cache_mib * 2**20
    a.model = str(Path(a.model).resolve())
    if a.input_len + a.output_len > MAX_MODEL_LEN:
        ap.error(f"input + output must fit max-model-len {MAX_MODEL_LEN}")
    logdir = Path(a.logdir or tempfile.mkdtemp(prefix="vllm_bench_"))
    logdir.mkdir(parents=True, exist_ok=True)
    backends = [b for b in a.backends.split(",") if b]
    t0 = time.monotonic()
    print(f"command: {' '.join(sys.argv)}", flush=True)

    if backends == ["reference-sim"]:
        bench_front(a, logdir)
        return
    if a.offline:
        res = {}
        for b in backends:
            try:
                res[b] = bench_offline(b, a, logdir)
            except Exception as e:  # report, go on with the other backend
                print(f"[{b}] FAILED: {e}", flush=True)
        print(f"\nOffline LLM.generate: {a.num_prompts or 64} prompts, input {a.input_len}, output {a.output_len}")
        for b, r in res.items():
            print(f"  {b:10} {r['tokens'] / r['wall']:8.1f} tok/s   ({r['tokens']} tokens in {r['wall']:.1f} s; "
                  f"engine start {r['t_init']:.1f} s; model-process VmHWM {r['hwm_model']:.0f} MiB)")
        if "native" in res and "ms_rpc" in res:
            print(f"  ratio ms_rpc/native tok/s: "
                  f"{(res['ms_rpc']['tokens'] / res['ms_rpc']['wall']) / (res['native']['tokens'] / res['native']['wall']):.2f}")
    else:
        results = {}
        for b in backends:
            results[b] = {}
            try:
                bench_online(b, a, logdir, results[b])
            except Exception as e:
                print(f"[{b}] FAILED: {e}", flush=True)
        print_online(results, a)
    print(f"\ntotal bench time {time.monotonic() - t0:.0f} s; logs in {logdir}")


if __name__ == "__main__":
    main()
