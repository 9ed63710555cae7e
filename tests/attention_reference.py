"""Plain numpy reference of the PagedAttentionFlat kernel (contract: ms_models/kernels/paged_attention.cc).

``paged_attention_reference(q, k, v, k_cache, v_cache, cos_sin, slot_mapping, query_start_loc, seq_lens,
block_tables, params)`` returns ``(out, k_cache, v_cache)``: the output [T, H*D] and the caches after
this step's writes (new arrays; the inputs are not modified). Float64 arithmetic, float32 results.
"""
from __future__ import annotations

import numpy as np


def rope(x: np.ndarray, cos_sin: np.ndarray) -> np.ndarray:
    """Neox RoPE of x [T, n, D] (float64): x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1)."""
    D = x.shape[-1]
    c, s = cos_sin[:, None, :D // 2], cos_sin[:, None, D // 2:]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def paged_attention_reference(q, k, v, k_cache, v_cache, cos_sin, slot_mapping, query_start_loc, seq_lens,
                              block_tables, params):
    NB, BS, KVH, D = k_cache.shape
    T = q.shape[0]
    H = q.shape[1] // D
    group = H // KVH
    num_reqs, window = int(params[0]), int(params[1])
    cs = cos_sin.astype(np.float64)
    q_rot = rope(q.reshape(T, H, D).astype(np.float64), cs)
    k_rot = rope(k.reshape(T, KVH, D).astype(np.float64), cs).astype(np.float32)
    k_cache, v_cache = k_cache.copy(), v_cache.copy()

    # 1. this step's keys and values go to the cache first
    for t in range(T):
        slot = int(slot_mapping[t])
        if slot >= 0:
            k_cache[slot // BS, slot % BS] = k_rot[t]
            v_cache[slot // BS, slot % BS] = v.reshape(T, KVH, D)[t]

    # 2. every request's queries attend to its keys through the block table
    out = np.zeros((T, H, D), np.float64)
    for r in range(num_reqs):
        start, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
        qlen, ctx = end - start, int(seq_lens[r])
        if qlen == 0:
            continue
        keys = np.arange(ctx)
        slots = block_tables[r, keys // BS].astype(np.int64) * BS + keys % BS
        K = k_cache.reshape(NB * BS, KVH, D)[slots].astype(np.float64)  # [ctx, KVH, D]
        V = v_cache.reshape(NB * BS, KVH, D)[slots].astype(np.float64)
        for i in range(qlen):
            t = start + i
            if slot_mapping[t] < 0:
                continue  # a padding token's row stays zero
            pos = ctx - qlen + i
            visible = keys <= pos
            if window > 0:
                visible &= keys > pos - window
            for h in range(H):
                kvh = h // group
                scores = K[visible, kvh] @ q_rot[t, h]
                p = np.exp(scores - scores.max())
                out[t, h] = (p / p.sum()) @ V[visible, kvh]
    return out.reshape(T, H * D).astype(np.float32), k_cache, v_cache
