"""Worker memory and step-time benchmark: RSS and step ms per (B, Q, context) shape (worker env).

    .venv-worker/bin/python scripts/worker_memory.py --workloads decode16,prefill [--kv-mib 1024] [--reps 5]

Loads the model as the worker does, allocates a KV cache of ``--kv-mib``, then runs each workload's steps in
order through ``CausalLM.forward`` (random token ids, every row with the same context, block ids reused modulo
the cache: only shapes matter here), a step of B rows split into forwards of at most the runner's
MAX_FORWARD_TOKENS padded tokens as the worker does. After each step it prints the padded bucket, the first call
(compile) and median step ms, the process's VmRSS / VmHWM from /proc/self/status, and the compiled graphs kept.
The last line compares the peak with the target: weights + KV cache + 700 MiB. Run one workload per process to
see its own peak.

Workloads (name: block size, shapes):
  decode16   16:  decode B = 1..32, context 16..256 tokens (M = 1..16 blocks)
  decode128  128: decode B = 1..32, context 128..2048 tokens (M = 1..16 blocks)
  prefill    128: B = 1..8 prompts of Q = 64..512 tokens
  serve      128: what scripts/bench.py sends at concurrency 1..32: prompts of 128, decodes at context 129..192
  offline64  128: offline batch 64: 64 prompts of 128 tokens in one step, 16 chunks of 512, 64 decodes

Figures (2026-11-26, the 2-vCPU dev machine shared with other jobs: step ms are noisy; SmolLM2-135M fp32, weights
513 MiB, KV cache 1024 MiB, --reps 3, one workload per process). Peak RSS, and in brackets its excess over
weights + KV (target: 700 MiB). "before" is this script run against commit 84e4acd's ms_models (one forward per
step, no graph budget):

  workload    before              after             step ms before -> after (median)
  decode16     3183 (+1646)       2323 (+786)       B=32 ctx 256: 230 -> 179
  decode128    3582 (+2045)       2460 (+923)       B=32 ctx 2048: 911 -> 809; B=1 ctx 2048: 77 -> 62
  prefill     14786 (+13249)      2354 (+817)       1x512: 848 -> 785; 8x512: 8090 -> 5331
  serve        4050 (+2513)       2241 (+704)       8x128 prefill: 1717 -> 1099; decode B=32: 172 -> 164
  offline64   16069 (+14532)      2189 (+652)       64x128: 12239 -> 8890; 16x512: 13714 -> 10543

Where "after" still goes: ~450 MiB is MindSpore and the process before any graph (importing MindSpore and running
one op is 405 MiB, 247 of it shared-library pages), up to 160 MiB the compiled graphs kept (CausalLM.graph_memory),
and MindSpore 2.10 leaks ~6 MiB per graph compiled and later dropped. "after" predates the cache's cover policy
(a batch runs padded in a compiled bigger graph rather than compiling its own once the cache is full), with which
these sequences compile fewer shapes. In the worker, MindSpore runs on one thread (ms_worker.service): calling the
same forwards from several threads in turn cost ~110 MiB more. A/B in one process (HEAD's and this
tree's model, interleaved calls): decode step time equal within +-4%, prefill forwards 4-7% faster, logits equal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCHES = (1, 2, 4, 8, 16, 32)
WORKLOADS = {
    "decode16": (16, [(b, 1, c) for b in BATCHES for c in (16, 64, 128, 256)]),
    "decode128": (128, [(b, 1, c) for b in BATCHES for c in (128, 256, 512, 1024, 2048)]),
    "prefill": (128, [(b, q, q) for b in (1, 2, 4, 8) for q in (64, 128, 256, 512)]),
    "serve": (128, [(b, 128, 128) for b in (1, 2, 4, 8)] + [(b, 1, c) for b in BATCHES for c in (129, 192)]),
    "offline64": (128, [(64, 128, 128), (16, 512, 512), (64, 1, 192)]),
}
OVERHEAD_MIB = 700


def status_mib() -> dict:
    """VmRSS and VmHWM (peak RSS) of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) // 1024
    return out


def step_forwards(model, rng, B: int, Q: int, ctx: int, bs: int, nb: int) -> list[dict]:
    """The forwards of one step of B rows (see the docstring), as forward() arguments."""
    from ms_worker.runner import MAX_FORWARD_TOKENS

    bp, qp, _ = model.bucket_shape(1, Q, 1)
    rows = max(1, MAX_FORWARD_TOKENS // qp) if bp * qp <= MAX_FORWARD_TOKENS else 1
    vocab = model.config.vocab_size
    return [step_inputs(rng, vocab, min(rows, B - b), Q, ctx, bs, nb) for b in range(0, B, rows)]


def step_inputs(rng, vocab: int, B: int, Q: int, ctx: int, bs: int, nb: int) -> dict:
    """forward() arguments for B rows whose last Q tokens (positions ctx-Q..ctx-1) are computed."""
    M = -(-ctx // bs)
    bt = (np.arange(B * M, dtype=np.int32).reshape(B, M)) % nb
    pos = np.tile(np.arange(ctx - Q, ctx, dtype=np.int32), (B, 1))
    slots = np.take_along_axis(bt, pos // bs, 1) * bs + pos % bs
    return dict(input_ids=rng.integers(0, vocab, (B, Q)).astype(np.int32), positions=pos, slot_mapping=slots,
                block_tables=bt, logits_indices=np.full((B,), Q - 1, np.int32))


def run_step(model, forwards: list[dict], reps: int) -> tuple:
    """(first step ms, median ms of ``reps`` further steps)."""
    ts = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        for args in forwards:
            model.forward(**args)
        ts.append((time.perf_counter() - t) * 1e3)
    return ts[0], float(np.median(ts[1:])) if reps else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--workloads", default="decode16", help="comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--kv-mib", type=int, default=1024, help="KV cache size")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per shape after the first")
    ap.add_argument("--graph-mib", type=int, default=None,
                    help="budget for compiled graphs (CausalLM.graph_memory; default: the model's default)")
    a = ap.parse_args(argv)
    names = [w for w in a.workloads.split(",") if w]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")

    from ms_models import load_model

    model = load_model(a.model)
    if a.graph_mib is not None:
        model.graph_memory = a.graph_mib << 20
    weights = model.weight_bytes() / 2**20
    print(f"weights {weights:.0f} MiB, after load: {status_mib()}", flush=True)
    rng = np.random.default_rng(0)
    kv = block_size = peak = 0
    for name in names:
        bs, shapes = WORKLOADS[name]
        if bs != block_size:
            nb = (a.kv_mib << 20) // model.kv_cache_bytes_per_block(bs)
            model.allocate_kv_cache(nb, bs)
            block_size, kv = bs, nb * model.kv_cache_bytes_per_block(bs) / 2**20
            print(f"KV cache {nb} blocks of {bs} ({kv:.0f} MiB), after allocation: {status_mib()}", flush=True)
        print(f"--- {name}")
        for B, Q, ctx in shapes:
            forwards = step_forwards(model, rng, B, Q, ctx, bs, nb)
            first, med = run_step(model, forwards, a.reps)
            st = status_mib()
            peak = max(peak, st["VmHWM"])
            bucket = model.bucket_shape(len(forwards[0]["input_ids"]), Q, -(-ctx // bs))
            print(f"B={B:<3} Q={Q:<4} ctx={ctx:<5} {len(forwards):2d} x {str(bucket):<14} first {first:7.0f} ms  "
                  f"median {med:7.1f} ms  rss {st['VmRSS']:5d}  hwm {st['VmHWM']:5d} MiB  "
                  f"graphs {len(model.graphs)} ({model.graphs.bytes >> 20} MiB)", flush=True)
    limit = weights + kv + OVERHEAD_MIB
    print(f"peak rss {peak} MiB; target weights {weights:.0f} + KV {kv:.0f} + {OVERHEAD_MIB} = {limit:.0f} MiB: "
          f"{'within' if peak <= limit else 'OVER by %.0f MiB' % (peak - limit)}")


if __name__ == "__main__":
    main()
