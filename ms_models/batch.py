"""One step's work as a flat token batch: every scheduled token of every request in one row of [T].

Requests are contiguous, in order: request r owns rows ``query_start_loc[r]:query_start_loc[r + 1]``, positions
``seq_lens[r] - qlen .. seq_lens[r] - 1`` of its sequence. Decodes (one row), prefill chunks, resumed requests and
whole prefills mix freely; attention reads each request's earlier keys from the paged cache through its row of
``block_tables``. The model pads T (and with it the request count) to a fixed bucket (``token_bucket``) so that
the compiled graphs are few and known at warm-up.

Pure numpy: importing this module does not import MindSpore.
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["FlatBatch", "token_buckets", "token_bucket", "token_parts", "logits_bucket", "LOGITS_BUCKETS",
           "FORWARD_OVERHEAD_TOKENS"]

# Row counts of the lm-head graph (logits of the sampled rows): powers of two.
LOGITS_BUCKETS = tuple(1 << i for i in range(13))


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """The padded token counts of the model graphs for steps of at most ``max_tokens`` tokens: powers of two, and
    ``max_tokens`` itself (chunked prefill fills the budget exactly)."""
    max_tokens = max(int(max_tokens), 1)
    out = [b for b in (1 << i for i in range(20)) if b < max_tokens]
    return tuple(out + [max_tokens])


def token_bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} tokens exceed the largest graph ({buckets[-1]})")


# A forward's fixed cost on CPU in tokens of a compute-bound bucket: one pass over the weights at a few rows costs
# what about 32 more rows of a large bucket do (SmolLM2 on a 2-vCPU AMD EPYC: 1 row 31 ms, 8 rows 54, 128 rows
# 183, 256 rows 350).
FORWARD_OVERHEAD_TOKENS = 32


def token_parts(n: int, buckets: tuple[int, ...], overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[int]:
    """The token counts of the consecutive forwards a step of ``n`` tokens runs as (each padded to its bucket).
    Over the largest bucket: cut at it. Just over a bucket (a 128-token prompt beside a few decodes): that bucket
    and a small forward for the rest, when padding to the next bucket would cost over 10 % more, each forward
    costing ``overhead`` + its bucket in tokens (0: never cut below the largest bucket)."""
    parts = []
    while n > buckets[-1]:
        parts.append(buckets[-1])
        n -= buckets[-1]
    return parts + _cheapest_parts(n, buckets, overhead)[1]


def _cheapest_parts(n: int, buckets: tuple[int, ...], overhead: int) -> tuple[int, list[int]]:
    best = (overhead + token_bucket(n, buckets), [n])
    lower = max((b for b in buckets if b < n), default=0)
    if overhead and lower:
        cost, rest = _cheapest_parts(n - lower, buckets, overhead)
        if overhead + lower + cost < 0.9 * best[0]:
            best = (overhead + lower + cost, [lower] + rest)
    return best


def logits_bucket(n: int) -> int:
    return token_bucket(n, LOGITS_BUCKETS)


@dataclasses.dataclass
class FlatBatch:
    """A step's model inputs (host arrays). ``logits_indices``: the rows whose logits are wanted (each request's
    last row when it samples; every prompt row for prompt logprobs), in the order the results are returned."""

    input_ids: np.ndarray        # [T] int32
    positions: np.ndarray        # [T] int32
    slot_mapping: np.ndarray     # [T] int32, cache slot = block * block_size + offset
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray         # [R] int32, context length after this step
    block_tables: np.ndarray     # [R, M] int32
    logits_indices: np.ndarray   # [S] int32
    lora_slots: np.ndarray | None = None  # [T] int32, each token's LoRA slot (-1 = the base model); None = all base

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def gather(cls, token_ids: np.ndarray, block_ids: np.ndarray, rows, starts, counts, block_size: int,
               logits_indices=None) -> "FlatBatch":
        """The batch in which request r computes tokens ``starts[r] .. starts[r] + counts[r] - 1`` of row
        ``rows[r]`` of the tables ``token_ids`` [N, L] and ``block_ids`` [N, M'] (array operations only); logits
        of each request's last row unless ``logits_indices`` is given."""
        rows, starts, counts = (np.asarray(a, np.int64) for a in (rows, starts, counts))
        qsl = np.zeros(counts.size + 1, np.int64)
        np.cumsum(counts, out=qsl[1:])
        req = np.repeat(np.arange(counts.size), counts)
        pos = starts[req] + np.arange(int(qsl[-1])) - qsl[req]
        slots = block_ids[rows[req], pos // block_size] * block_size + pos % block_size
        ends = starts + counts
        m = int(-(-ends.max() // block_size))
        li = qsl[1:] - 1 if logits_indices is None else logits_indices
        return cls(token_ids[rows[req], pos].astype(np.int32), pos.astype(np.int32), slots.astype(np.int32),
                   qsl.astype(np.int32), ends.astype(np.int32), block_ids[rows, :m].astype(np.int32),
                   np.asarray(li, np.int32))

    @classmethod
    def build(cls, token_ids: list, starts, counts, block_tables: list, block_size: int,
              logits_indices=None) -> "FlatBatch":
        """``gather`` from per-request lists (tests and tools): request r's tokens ``token_ids[r]`` and blocks
        ``block_tables[r]``."""
        def table(lists):
            out = np.full((len(lists), max(len(x) for x in lists)), -1, np.int32)
            for r, x in enumerate(lists):
                out[r, :len(x)] = x
            return out

        return cls.gather(table(token_ids), table(block_tables), np.arange(len(token_ids)), starts, counts,
                          block_size, logits_indices)

    def split(self, sizes: list[int]) -> list["FlatBatch"]:
        """Consecutive batches of ``sizes`` rows (adding up to this one's) that compute the same as this one (a
        request cut in two reads the keys its first part wrote). ``logits_indices`` are renumbered into each part;
        the parts' logits, concatenated, are this batch's."""
        T = self.num_tokens
        if sum(sizes) != T:
            raise ValueError(f"parts of {sizes} tokens do not add up to the batch's {T}")
        if len(sizes) == 1:
            return [self]
        parts = []
        qsl = self.query_start_loc.astype(np.int64)
        li = self.logits_indices.astype(np.int64)
        for lo, hi in zip(np.cumsum([0] + sizes[:-1]).tolist(), np.cumsum(sizes).tolist()):
            rs = [r for r in range(self.num_reqs) if qsl[r] < hi and qsl[r + 1] > lo]
            start = np.clip(qsl[rs], lo, hi)
            end = np.clip(qsl[np.asarray(rs) + 1], lo, hi)
            sl = self.seq_lens[rs] - (qsl[np.asarray(rs) + 1] - end)
            sel = li[(li >= lo) & (li < hi)]
            parts.append(FlatBatch(
                self.input_ids[lo:hi], self.positions[lo:hi], self.slot_mapping[lo:hi],
                np.concatenate([[0], np.cumsum(end - start)]).astype(np.int32), sl.astype(np.int32),
                self.block_tables[rs], (sel - lo).astype(np.int32),
                None if self.lora_slots is None else self.lora_slots[lo:hi]))
        if sum(p.logits_indices.size for p in parts) != li.size or np.any(np.diff(li) < 0):
            raise ValueError("logits_indices must be ascending row indices of the batch")
        return parts
