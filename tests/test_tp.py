"""Tensor parallelism across separately started worker processes (MindSpore collectives, no front).

N `ms-worker serve --tp-rank I --tp-size N --dist-addr HOST:PORT` processes form a MindSpore cluster (rank 0 runs
its scheduler as a child process); each holds 1/N of the weights and of the KV heads. Driven here over real gRPC
with the ms_rpc.v1 messages, every step sent to all ranks at once, as the front does:
  * TP=2 on tiny random Llama (untied, q/k/v/o and MLP biases, odd vocabulary: padded, uneven MLP split) and
    Qwen2 (tied, q/k/v biases) checkpoints, TP=3 on SmolLM2-135M (9 heads, 3 KV heads): greedy tokens of several
    concurrent prompts equal TP=1's and HF transformers'; ranks answer identically, random sampling included
    (same CacheConfig.sampling_seed); weights and KV bytes per block per rank are 1/N;
  * a rank that does not show up: a bounded wait, then an error naming it; N not dividing the heads: refused
    before anything loads; the scheduler goes away with rank 0, even on SIGKILL;
  * the loader reads a rank's slice of a tensor (rows or columns, F32/BF16/F16) and nothing more.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from conftest import WORKER_PY, free_port, hf_greedy, perturb_norms_and_biases, rss_mib, start_worker
from ms_rpc.v1 import worker_pb2 as pb
from ms_rpc.v1 import worker_pb2_grpc as pb_grpc

V = pb.PROTOCOL_VERSION_CURRENT
BLOCK = 4


# -- helpers --------------------------------------------------------------------------------------------------
def start_group(model_dir, n: int, logdir: Path, extra: list[str] | None = None, ranks=None,
                timeout_s: float = 120, wait: bool = True):
    """`ms-worker serve` for ranks 0..n-1 of a TP=n group (all started before any is waited for: rank 0 is ready
    only once every rank joined). Returns ([proc], [address] or None, dist_addr, [log path])."""
    dist = f"127.0.0.1:{free_port()}"
    procs, readies, logs = [], [], []
    for r in (range(n) if ranks is None else ranks):
        ready = Path(tempfile.mkdtemp()) / "port"
        log = logdir / f"rank{r}.log"
        procs.append(subprocess.Popen(
            [str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(model_dir), "--port", "0", "--ready-file",
             str(ready), "--tp-rank", str(r), "--tp-size", str(n), "--dist-addr", dist, "--dist-timeout-s",
             f"{timeout_s:g}", *(extra or [])], stdout=open(log, "w"), stderr=subprocess.STDOUT))
        readies.append(ready)
        logs.append(log)
    if not wait:
        return procs, None, dist, logs
    end = time.monotonic() + timeout_s + 240
    while not all(r.exists() for r in readies):
        if any(p.poll() is not None for p in procs) or time.monotonic() > end:
            stop_all(procs)
            tails = "\n".join(f"--- {lg.name}\n" + "\n".join(lg.read_text(errors="replace").splitlines()[-15:])
                              for lg in logs)
            raise RuntimeError(f"TP={n} group did not start:\n{tails}")
        time.sleep(0.2)
    return procs, [f"127.0.0.1:{r.read_text().strip()}" for r in readies], dist, logs


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Group:
    """Stubs for the ranks of one group; `call` sends the same request to every rank at once."""

    def __init__(self, addresses: list[str], block_size: int = BLOCK):
        self.block = block_size
        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.stubs = [pb_grpc.ModelWorkerStub(c) for c in self.channels]
        self.pool = ThreadPoolExecutor(max(1, len(addresses)))
        self.step = 1

    def call(self, method: str, request, timeout: float = 300) -> list:
        futs = [self.pool.submit(getattr(s, method), request, timeout=timeout) for s in self.stubs]
        return [f.result() for f in futs]

    def handshake(self, num_blocks: int, max_num_seqs: int = 4, max_tokens: int = 64, seed: int = 1234,
                  warmup: bool = True):
        infos = self.call("Describe", pb.DescribeRequest(protocol_version=V))
        mems = self.call("DetermineAvailableMemory", pb.MemoryRequest(protocol_version=V, block_size=self.block,
                                                                      requested_bytes=64 << 20))
        self.call("InitializeCache", pb.CacheConfig(protocol_version=V, num_blocks=num_blocks,
                                                    block_size=self.block, max_num_seqs=max_num_seqs,
                                                    max_num_batched_tokens=max_tokens, max_model_len=256,
                                                    sampling_seed=seed))
        if warmup:
            self.call("Warmup", pb.WarmupRequest(protocol_version=V))
        return infos, mems

    def generate(self, prompts: list[list[int]], max_new: int, sampling: list | None = None) -> list[list[int]]:
        """Every prompt scheduled at once (one prefill step), then one decode step per token; each step's reply
        must be the same on every rank. Returns the tokens of each request."""
        blocks, nxt = [], 0
        for p in prompts:
            need = -(-(len(p) + max_new) // self.block)
            blocks.append(list(range(nxt, nxt + need)))
            nxt += need
        sampling = sampling or [pb.SamplingParams(temperature=0.0)] * len(prompts)
        step = pb.StepRequest(protocol_version=V, step_id=self.step,
                              total_num_scheduled_tokens=sum(map(len, prompts)))
        for i, p in enumerate(prompts):
            step.new_requests.add(req_id=f"r{i}", prompt_token_ids=p, block_ids=blocks[i],
                                  num_scheduled_tokens=len(p), sampling=sampling[i])
        out: list[list[int]] = [[] for _ in prompts]
        for k in range(max_new):
            replies = self.call("Execute", step)
            got = [[list(r.sampled_token_ids) for r in rep.results] for rep in replies]
            assert all(g == got[0] for g in got), f"step {step.step_id}: ranks disagree: {got}"
            for i, toks in enumerate(got[0]):
                out[i] += toks
            step = pb.StepRequest(protocol_version=V, step_id=step.step_id + 1,
                                  total_num_scheduled_tokens=len(prompts))
            for i, p in enumerate(prompts):
                step.cached_requests.add(req_id=f"r{i}", num_computed_tokens=len(p) + k, num_scheduled_tokens=1)
        self.call("Execute", pb.StepRequest(protocol_version=V, step_id=step.step_id,
                                            finished_req_ids=[f"r{i}" for i in range(len(prompts))]))
        self.step = step.step_id + 1
        return out

    def close(self) -> None:
        for c in self.channels:
            c.close()
        self.pool.shutdown()


def run_single(model_dir, prompts, max_new, logdir: Path, num_blocks: int, block_size: int = BLOCK,
               warmup: bool = True):
    """The same prompts on one worker (TP=1): (tokens, weight_bytes, bytes_per_block, rss MiB)."""
    proc, address = start_worker(model_dir, [], logdir / "tp1.log")
    g = Group([address], block_size)
    try:
        _, mems = g.handshake(num_blocks, warmup=warmup)
        tokens = g.generate(prompts, max_new)
        return tokens, mems[0].weight_bytes, mems[0].bytes_per_block, rss_mib(proc.pid)
    finally:
        g.close()
        stop_all([proc])


def make_tiny(arch: str, path: Path) -> Path:
    """Tiny random checkpoints whose 4 heads / 2 KV heads split over 2 ranks. llama: untied, q/k/v/o and MLP
    biases, odd vocabulary 131 (the vocab-parallel shards are padded), intermediate 97 (split 49 + 48);
    qwen2: tied embeddings, q/k/v biases."""
    import torch
    import transformers as T

    torch.manual_seed(7)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=0.1)
    if arch == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=131, intermediate_size=97, attention_bias=True,
                                                 mlp_bias=True, tie_word_embeddings=False, **common))
    else:
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=150, intermediate_size=96, tie_word_embeddings=True,
                                                 **common))
    perturb_norms_and_biases(model).to(torch.float32).save_pretrained(path)
    return path


def prompts_for(vocab: int, lens=(3, 9, 5, 14), seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lens]


# -- TP=2 on tiny checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_tiny_matches_tp1_and_hf(arch, tmp_path):
    model = make_tiny(arch, tmp_path / arch)
    vocab = 131 if arch == "llama" else 150
    prompts, max_new = prompts_for(vocab), 10
    want = hf_greedy(model, prompts, max_new)
    single, w1, kv1, _ = run_single(model, prompts, max_new, tmp_path, num_blocks=64)
    assert single == want

    procs, addresses, _, logs = start_group(model, 2, tmp_path)
    g = Group(addresses)
    try:
        infos, mems = g.handshake(num_blocks=64)
        for r, info in enumerate(infos):
            assert (info.rank, info.world_size) == (r, 2)
            assert (info.model.num_heads, info.model.num_kv_heads, info.model.vocab_size) == (4, 2, vocab)
        assert len({i.model.config_hash for i in infos}) == 1
        for m in mems:
            assert m.bytes_per_block * 2 == kv1                       # each rank caches its own KV head
            assert abs(m.weight_bytes - w1 / 2) < 0.03 * w1, (m.weight_bytes, w1)
        assert g.generate(prompts, max_new) == want
        # Random sampling without a request seed: the shared sampling_seed keeps the ranks' draws (and thus their
        # request state, which feeds the next step) identical; generate() checks every step's replies.
        hot = [pb.SamplingParams(temperature=1.0), pb.SamplingParams(temperature=0.0),
               pb.SamplingParams(temperature=0.9, top_p=0.9), pb.SamplingParams(temperature=1.0, seed=5)]
        sampled = g.generate(prompts, max_new, hot)
        assert sampled[1] == want[1]

        # The scheduler is rank 0's child and dies with it, even on SIGKILL.
        sched_pid = int(re.search(r"cluster scheduler \(pid (\d+)\)", logs[0].read_text()).group(1))
        assert alive(sched_pid)
        procs[0].kill()
        procs[0].wait()
        end = time.monotonic() + 15
        while alive(sched_pid) and time.monotonic() < end:
            time.sleep(0.2)
        assert not alive(sched_pid), "the scheduler outlived rank 0"
    finally:
        g.close()
        stop_all(procs)


# -- TP=3 on SmolLM2 --------------------------------------------------------------------------------------------
def test_tp3_smollm2_matches_tp1_and_hf(default_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    texts = ["The capital of France is", "def fibonacci(n):", "List three prime numbers:",
             "Once upon a time, in a small village by the mountains, there lived"]
    prompts, max_new = [tok(t)["input_ids"] for t in texts], 12
    want = hf_greedy(default_model, prompts, max_new)

    # Block size 16: every request fits in 2 blocks, so few bucket shapes compile (Warmup is left out here: the
    # tiny models' test runs it; on 30 layers each shape compiles for seconds on every rank).
    procs, addresses, _, logs = start_group(default_model, 3, tmp_path)
    g = Group(addresses, block_size=16)
    try:
        infos, mems = g.handshake(num_blocks=32, warmup=False)
        assert [(i.rank, i.world_size) for i in infos] == [(0, 3), (1, 3), (2, 3)]
        assert {(i.model.num_heads, i.model.num_kv_heads) for i in infos} == {(9, 3)}   # totals, as vLLM's config
        got = g.generate(prompts, max_new)
        rss3 = [rss_mib(p.pid) for p in procs]
        shards = [m.weight_bytes for m in mems]
        kv3 = mems[0].bytes_per_block
    finally:
        g.close()
        stop_all(procs)
    single, w1, kv1, rss1 = run_single(default_model, prompts, max_new, tmp_path, num_blocks=32, block_size=16,
                                       warmup=False)
    print(f"SmolLM2 weight bytes: TP=1 {w1}, TP=3 per rank {shards}; RSS MiB: TP=1 {rss1:.0f}, TP=3 "
          f"{[round(r) for r in rss3]}")
    assert single == want
    assert got == want
    assert kv3 * 3 == kv1
    for s in shards:
        assert abs(s - w1 / 3) < 0.01 * w1, (s, w1)
    # Each rank's resident memory holds its third of the weights (plus MindSpore's ~0.5 GiB per process).
    assert max(rss3) < rss1 - 0.5 * (w1 - max(shards)) / 2**20, (rss3, rss1)


# -- failures ---------------------------------------------------------------------------------------------------
def test_missing_rank_is_named_after_a_bounded_wait(tmp_path):
    """Rank 0 of 2 alone: it waits --dist-timeout-s, names rank 1, exits 2, and its scheduler goes too. Rank 1 of
    2 alone (no scheduler anywhere): the same bounded wait, and an error pointing at rank 0 and the address."""
    model = make_tiny("qwen2", tmp_path / "qwen2")
    (tmp_path / "r0").mkdir()
    (tmp_path / "r1").mkdir()
    t0 = time.monotonic()
    p0, _, dist0, log0 = start_group(model, 2, tmp_path / "r0", ranks=[0], timeout_s=20, wait=False)
    p1, _, dist1, log1 = start_group(model, 2, tmp_path / "r1", ranks=[1], timeout_s=20, wait=False)
    try:
        codes = [p0[0].wait(120), p1[0].wait(120)]
    finally:
        stop_all(p0 + p1)
    took = time.monotonic() - t0
    text0, text1 = log0[0].read_text(), log1[0].read_text()
    assert codes == [2, 2], (text0[-3000:], text1[-3000:])
    assert took < 110, took
    assert re.search(rf"tensor-parallel rank 1 of 2 did not join the MindSpore cluster at {dist0} within 20 s "
                     r"\(joined: 0\)", text0), text0[-3000:]
    sched_pid = int(re.search(r"cluster scheduler \(pid (\d+)\)", text0).group(1))
    assert not alive(sched_pid)
    assert f"rank 1 of 2 could not join the MindSpore cluster at {dist1} within 20 s" in text1, text1[-3000:]
    assert "Rank 0 runs the cluster's scheduler" in text1


def test_loader_reads_only_the_shard(tmp_path):
    """SafetensorsWeights.get(name, dim=, start=, stop=, pad_to=): a row or column slice of an F32 / BF16 / F16
    tensor, read without the rest (columns in row chunks of ~4 MiB), zero-padded; the bytes read are the slice's."""
    code = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from ms_models.loader import SafetensorsWeights
d = sys.argv[2]
a = np.random.default_rng(0).standard_normal((3001, 700)).astype(np.float32)
bf = (a.view(np.uint32) >> 16).astype(np.uint16)
f16 = a.astype(np.float16)
blobs = [("x", "F32", a.tobytes(), a), ("y", "BF16", bf.tobytes(), (bf.astype(np.uint32) << 16).view(np.float32)),
         ("z", "F16", f16.tobytes(), f16.astype(np.float32))]
header, off = {}, 0
for name, dt, raw, _ in blobs:
    header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
    off += len(raw)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(len(h).to_bytes(8, "little") + h + b"".join(raw for _, _, raw, _ in blobs))
w = SafetensorsWeights(d, progress=False)
for name, _, raw, ref in blobs:
    item = len(raw) // a.size
    before = w.bytes_read
    assert np.array_equal(w.get(name, dim=0, start=5, stop=1700), ref[5:1700])
    assert w.bytes_read - before == 1695 * 700 * item
    assert np.array_equal(w.get(name, dim=1, start=233, stop=467), ref[:, 233:467])
    p = w.get(name, dim=0, start=3000, stop=3001, pad_to=4)
    assert p.shape == (4, 700) and np.array_equal(p[0], ref[3000]) and not p[1:].any()
    assert np.array_equal(w.get(name), ref)
print("ok")
"""
    out = subprocess.run([str(WORKER_PY), "-c", code, str(Path(__file__).resolve().parent.parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_tp_size_must_divide_the_heads(tmp_path):
    model = make_tiny("llama", tmp_path / "llama")   # 4 heads, 2 KV heads
    out = subprocess.run([str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(model), "--port", "0",
                          "--tp-size", "3", "--tp-rank", "1", "--dist-addr", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "tensor-parallel size 3 does not divide the model's num_attention_heads 4 and num_key_value_heads 2" \
        in out.stderr, out.stderr
    out = subprocess.run([str(WORKER_PY), "-m", "ms_worker", "serve", "--model", str(model), "--port", "0",
                          "--tp-size", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--tp-size 2 needs --dist-addr" in out.stderr, out.stderr
