"""Tensor parallelism over MindSpore's own collectives (Megatron-style, N ranks, one process each).

Each rank holds 1/N of the weights and computes 1/N of every layer:

* column-parallel q/k/v and gate/up projections (the output dim is split: a rank owns whole
  attention heads / KV heads and 1/N of the MLP's intermediate features);
* row-parallel o_proj and down_proj (the input dim is split), followed by ``ops.AllReduce``
  (their bias, if any, is added by rank 0 only, before the sum);
* vocab-parallel embedding (each rank looks up the rows it owns, zeros for the others, then
  ``ops.AllReduce``) and lm head (each rank computes the logits of its vocab slice, then
  ``ops.AllGather``), so that every rank ends with the same full logits, bit for bit.

The vocabulary is padded to a multiple of N (zero rows; their logits are cut off after the
gather). The collectives are primitives inside the ``ms.jit`` whole-model graph (the
functional ``mindspore.communication.comm_func`` ones have no CPU kernel); the graph
functions are ``layers.vocab_parallel_embedding`` and ``layers.gather_logits``, the weight
split is in ``decoder.build_decoder``, the cluster set-up in ``runtime.setup``.

Pure Python: importing this module does not import MindSpore.
"""
from __future__ import annotations

import dataclasses

__all__ = ["TensorParallel", "check_divisible", "check_tensor_parallel"]


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group: rank ``rank`` of ``size``."""
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0..{self.size - 1} (size {self.size})")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def split(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of ``n`` items (contiguous, as even as possible; the first
        ``n % size`` ranks get one more)."""
        base, extra = divmod(int(n), self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def vocab_per_rank(self, vocab: int) -> int:
        """Rows of the (padded) vocabulary each rank owns: ceil(vocab / size)."""
        return -(-int(vocab) // self.size)

    def vocab_range(self, vocab: int) -> tuple[int, int, int]:
        """(start, stop, padded) of this rank's vocabulary rows: real rows [start, stop), then zero rows up to
        ``padded`` = vocab_per_rank rows in all."""
        vp = self.vocab_per_rank(vocab)
        start = min(self.rank * vp, int(vocab))
        return start, min(start + vp, int(vocab)), vp


def check_divisible(num_heads: int, num_kv_heads: int, size: int) -> str | None:
    """Why ``size`` ranks cannot split these attention heads, or None."""
    bad = [f"{name} {n}" for name, n in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads))
           if n % size]
    if bad:
        return (f"tensor-parallel size {size} does not divide the model's " + " and ".join(bad) +
                f" (each rank must own whole heads; sizes that fit: "
                f"{[d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0 and num_heads % d == 0]})")
    return None


def check_tensor_parallel(cfg, size: int) -> str | None:
    """Why ``size`` ranks cannot serve the model of ModelConfig ``cfg``, or None: its heads must divide
    (check_divisible), and a mixture-of-experts model is served by one rank (no expert sharding yet)."""
    if size > 1 and cfg.num_experts:
        return (f"tensor-parallel size {size}: {cfg.architecture} is a mixture-of-experts model, which ms_rpc "
                f"workers serve at tensor-parallel size 1 only (its experts are not sharded across ranks)")
    return check_divisible(cfg.num_heads, cfg.num_kv_heads, size)
