"""Step-time benchmark of an ms_models model (run under the worker env).

    .venv-worker/bin/python -m ms_models.bench models/SmolLM2-135M-Instruct \
        --decode-batches 1,8,32 --ctx 200 --prefill 128

Prints load time, first call (compile) and median steady time per batch (its flat token count padded to a
token bucket).
Tensor parallel: run it once per rank with ``--tp-rank I --tp-size N --dist-addr HOST:PORT``
and the cluster's scheduler beside them (``ms-worker sched --dist-addr HOST:PORT --tp-size N``).
Experts over data-parallel engines: ``--enable-expert-parallel --data-parallel-size M --data-parallel-rank D`` per
engine process (the scheduler's --tp-size is then M x N); every engine runs the same batches.
Decode rows each have ``ctx`` tokens of context (the cache holds arbitrary values: only
timing is measured).
LoRA: ``--lora-slots L --lora-rank R`` gives the model L slots of rank R on all seven targets, each holding a
random adapter, and spreads the batch's rows over them (mixed adapters in every step); a second copy of the model
without LoRA runs the same batches, the two alternating forward by forward (the same load on a shared host), and
each line shows both medians and their ratio.
``--profile DIR``: after each case's timing, ``--reps`` more forwards under MindSpore's profiler (one session per
case, written under DIR), and a line per case with the kernels' time per forward by op type (MatMul, Custom = the
attention / MoE kernels, the rest), from the profiler's cpu_op_type_info table.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from ms_models.kernels import set_omp_wait_policy

set_omp_wait_policy()  # before MindSpore is imported


def _rss_mib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=200, help="context length of decode rows")
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--prefill", default="128", help="comma-separated prompt lengths (B=1)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--eager", action="store_true", help="PyNative instead of ms.jit")
    ap.add_argument("--tp-rank", type=int, default=0, help="tensor-parallel rank of this process")
    ap.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size (one process per rank)")
    ap.add_argument("--dist-addr", default=None, help="HOST:PORT of the MindSpore cluster scheduler (tp-size > 1)")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="mixture-of-experts: each rank holds tp-size'th of the experts whole (else 1/tp-size of each)")
    ap.add_argument("--data-parallel-size", type=int, default=1,
                    help="with --enable-expert-parallel: the experts over this many engines (--tp-size processes each)")
    ap.add_argument("--data-parallel-rank", type=int, default=0, help="this process's engine")
    ap.add_argument("--lora-slots", type=int, default=0, help="LoRA slots (0 = LoRA off)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--profile", metavar="DIR", help="also profile each case (MindSpore's profiler, output in DIR)")
    a = ap.parse_args(argv)

    from . import load_model, runtime
    from .batch import FlatBatch, token_bucket
    from .parallel import TensorParallel

    t0 = time.perf_counter()
    rank, size = TensorParallel(a.tp_rank, a.tp_size, a.enable_expert_parallel, a.data_parallel_rank,
                                a.data_parallel_size).cluster
    runtime.setup(a.device, tp_rank=rank, tp_size=size, dist_addr=a.dist_addr, join_timeout_s=300)
    t1 = time.perf_counter()
    model = load_model(a.model_dir, device=a.device, use_jit=not a.eager, tp_rank=a.tp_rank, tp_size=a.tp_size,
                       expert_parallel=a.enable_expert_parallel, dp_rank=a.data_parallel_rank,
                       dp_size=a.data_parallel_size)
    t2 = time.perf_counter()
    bs, nb = a.block_size, a.num_blocks
    cases = [(int(b), 1, a.ctx) for b in a.decode_batches.split(",") if b]
    cases += [(1, int(q), int(q)) for q in a.prefill.split(",") if q]
    if a.lora_slots:
        from .lora import TARGETS

        slots = model.enable_lora(a.lora_slots, a.lora_rank)
        g = np.random.default_rng(1)
        for sl in range(a.lora_slots):
            slots.write(sl, {(i, t): slots.fold(i, t, g.normal(0, 0.01, (a.lora_rank, slots.shapes[t][0])),
                                                g.normal(0, 0.01, (slots.shapes[t][1], a.lora_rank)), 2.0)
                             for i in range(model.config.num_layers) for t in TARGETS})
    base = load_model(a.model_dir, device=a.device, use_jit=not a.eager) if a.lora_slots else None
    for m in (model, base):
        if m is not None:
            m.allocate_kv_cache(nb, bs, max_num_seqs=max(c[0] for c in cases), max_model_len=max(c[2] for c in cases),
                                max_num_batched_tokens=max(c[0] * c[1] for c in cases))
    print(f"setup {t1 - t0:.2f}s  load {t2 - t1:.2f}s  weights {model.weight_bytes() / 2**20:.1f} MiB  "
          f"kv/block {model.kv_cache_bytes_per_block(bs)} B  rss {_rss_mib()} MiB  pid {os.getpid()}")
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    for B, Q, ctx in cases:
        M = -(-ctx // bs)
        if B * M > nb:
            print(f"B={B} ctx={ctx}: needs {B * M} blocks > --num-blocks {nb}, skipped")
            continue
        blocks = np.arange(B * M, dtype=np.int32).reshape(B, M)
        toks = [rng.integers(0, vocab, ctx) for _ in range(B)]
        batch = FlatBatch.build(toks, [ctx - Q] * B, [Q] * B, list(blocks), bs)
        if a.lora_slots:
            batch.lora_slots = np.repeat(np.arange(B, dtype=np.int32) % a.lora_slots, Q)
        ts, tb = [], []
        for _ in range(a.reps + 1):
            t = time.perf_counter()
            model.forward(batch)
            ts.append(time.perf_counter() - t)
            if base is not None:
                t = time.perf_counter()
                base.forward(batch)
                tb.append(time.perf_counter() - t)
        vs = ""
        if tb:
            vs = (f"  base median {np.median(tb[1:]) * 1e3:7.1f} ms  lora / base "
                  f"{np.median(ts[1:]) / np.median(tb[1:]):.2f}")
        print(f"B={B:<3} Q={Q:<5} ctx={ctx:<5} tokens={B * Q} (graph {token_bucket(B * Q, model.buckets)}): "
              f"first {ts[0] * 1e3:7.0f} ms  median {np.median(ts[1:]) * 1e3:7.1f} ms  "
              f"min {min(ts[1:]) * 1e3:7.1f} ms  rss {_rss_mib()} MiB{vs}")
        if a.profile:
            print("  kernels per forward: " + _profile(model, batch, a.reps, os.path.join(a.profile, f"B{B}_Q{Q}")))


def _profile(model, batch, reps: int, out_dir: str) -> str:
    """``reps`` forwards under MindSpore's profiler; its per-op-type compute time per forward, largest first."""
    import csv
    import glob

    from mindspore import Profiler

    prof = Profiler(output_path=out_dir)
    for _ in range(reps):
        model.forward(batch)
    prof.stop()
    prof.analyse()
    with open(sorted(glob.glob(os.path.join(out_dir, "*", "FRAMEWORK", "cpu_op_type_info_0.csv")))[-1]) as f:
        ms = {row["op_type"]: float(row["total_compute_time"]) / reps for row in csv.DictReader(f)}
    top = sorted(ms.items(), key=lambda kv: -kv[1])
    rest = sum(v for _, v in top[2:])
    return "  ".join(f"{k} {v:.1f} ms" for k, v in top[:2]) + f"  other {rest:.1f} ms  total {sum(ms.values()):.1f} ms"


if __name__ == "__main__":
    main()
