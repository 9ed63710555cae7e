"""Tensor parallelism over MindSpore's own collectives (Megatron-style, N ranks, one process each).

Each rank holds 1/N of the weights and computes 1/N of every layer:

* column-parallel q/k/v and gate/up projections (the output dim is split: a rank owns whole
  attention heads / KV heads and 1/N of the MLP's intermediate features); with fewer KV heads than
  ranks, each KV head is replicated on N / kv_heads ranks (rank r holds KV head r * kv_heads // N), as
  vLLM's QKVParallelLinear does;
* row-parallel o_proj and down_proj (the input dim is split), followed by the ranks' sum, ``ops.AllReduce``
  (layers.tp_all_reduce; their bias, if any, is added by rank 0 only, before the sum);
* vocab-parallel embedding (each rank looks up the rows it owns, zeros for the others, then
  ``ops.AllReduce``) and lm head (each rank computes the logits of its vocab slice, then
  ``ops.AllGather``), so that every rank ends with the same full logits, bit for bit (both whole on every rank
  when the experts are spread over data-parallel engines: see below).

* mixture-of-experts layers (ms_models.moe): the router is replicated; without expert parallel every
  expert is split like a dense MLP (1/N of its intermediate features per rank); with expert parallel
  (vLLM's --enable-expert-parallel) rank r holds experts [r*E/N, (r+1)*E/N) whole and computes only
  their share of the routed tokens. Either way each rank ends the layer with a partial sum of the
  experts' output (the shared expert split like a dense MLP adds its own), and one ``ops.AllReduce``
  completes it: every rank routes every token itself, so no token has to be sent to another rank
  before the experts (the all-reduce plays the part of the all-to-all's combine).

* expert parallel across data-parallel engines (vLLM's --enable-expert-parallel with --data-parallel-size M): the
  M engines' workers form one MindSpore cluster and the experts are partitioned over all M x N ranks (engine d's
  rank r is cluster rank d*N + r). The engines' batches differ, so a sparse layer gathers every engine's tokens
  (``ops.AllGather``), computes its experts' part of all of them, sums the parts (``ops.AllReduce``) and keeps its own
  rows: all-gather + all-reduce, as MindSpore's CPU backend has neither a reduce-scatter nor an all-to-all kernel.
  Every engine runs each step's forward together (vLLM's engines step in lockstep, an idle one runs a dummy batch),
  with the same token bucket (CausalLM agrees on it first). MindSpore's CPU collectives run on the world group
  only (a sub-group's AllGather is refused: "only support mccl_world_group on CPU"), so with N > 1 an engine's
  tensor-parallel sum is built from the world's: an AllGather of every rank's part, then the sum of the engine's
  N parts, in rank order on each of its ranks (layers.tp_all_reduce). The embedding and the lm head are then
  replicated, not split by vocabulary (vocab_parallel): the head runs on each engine's own schedule (its rows
  and chunks differ between engines), so it must not need a collective. In a sparse layer each of an engine's
  N ranks contributes 1/N of the engine's rows to the gather, so every engine's tokens are routed once; the
  experts' sum is kept by the engine's rank 0 only, and the layer's tensor-parallel sum, which also completes the
  shared expert, adds it once.

* multi-head latent attention (ms_models.mla): query heads split as above, the latent and its rope key
  computed on every rank (the latent cache is replicated, as in vLLM).

Split by vocabulary, the vocabulary is padded to a multiple of N (zero rows; their logits are cut off after the
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
    expert_parallel: bool = False  # experts partitioned whole across the ranks (vLLM's --enable-expert-parallel)
    dp_rank: int = 0               # with expert parallel over data-parallel engines: this engine, of dp_size
    dp_size: int = 1

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0..{self.size - 1} (size {self.size})")
        if self.dp_size < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"data-parallel rank {self.dp_rank} is not in 0..{self.dp_size - 1}")
        if self.dp_size > 1 and not self.expert_parallel:
            raise ValueError("data-parallel engines share one cluster only for expert parallel")

    @property
    def enabled(self) -> bool:
        """Tensor parallel: the weights are split over this engine's ranks."""
        return self.size > 1

    @property
    def dp_experts(self) -> bool:
        """The experts are spread over several data-parallel engines (their tokens meet in each sparse layer)."""
        return self.dp_size > 1

    @property
    def vocab_parallel(self) -> bool:
        """The embedding and lm head split by vocabulary over this engine's ranks: with tensor parallel, unless the
        experts are spread over data-parallel engines (then replicated: the module docstring)."""
        return self.enabled and not self.dp_experts

    @property
    def cluster(self) -> tuple[int, int]:
        """(rank, size) of this process in its MindSpore cluster: every engine's ranks with dp_experts."""
        return self.dp_rank * self.size + self.rank, self.dp_size * self.size

    def split(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of ``n`` items (contiguous, as even as possible; the first
        ``n % size`` ranks get one more)."""
        base, extra = divmod(int(n), self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank holds: its 1/size share, or with fewer KV heads than ranks
        the one KV head its query heads read (replicated on size / num_kv_heads ranks)."""
        if num_kv_heads >= self.size:
            per = num_kv_heads // self.size
            return self.rank * per, per
        return self.rank * num_kv_heads // self.size, 1

    def experts(self, num_experts: int) -> tuple[int, int]:
        """[start, stop) of the experts this rank holds whole: all of them without expert parallel, else its share
        of the cluster's (every engine's ranks with dp_experts)."""
        if not self.expert_parallel:
            return 0, int(num_experts)
        rank, size = self.cluster
        per = int(num_experts) // size
        return rank * per, (rank + 1) * per

    def vocab_per_rank(self, vocab: int) -> int:
        """Rows of the (padded) vocabulary each rank owns: ceil(vocab / size), all of them unless vocab_parallel."""
        return -(-int(vocab) // self.size) if self.vocab_parallel else int(vocab)

    def vocab_range(self, vocab: int) -> tuple[int, int, int]:
        """(start, stop, padded) of this rank's vocabulary rows: real rows [start, stop), then zero rows up to
        ``padded`` = vocab_per_rank rows in all."""
        vp = self.vocab_per_rank(vocab)
        start = min(self.rank * vp, int(vocab)) if self.vocab_parallel else 0
        return start, min(start + vp, int(vocab)), vp


def check_divisible(num_heads: int, num_kv_heads: int, size: int) -> str | None:
    """Why ``size`` ranks cannot split these attention heads, or None: each rank owns whole query heads, and
    whole KV heads or (size a multiple of the KV heads) one replicated KV head."""
    kv_ok = num_kv_heads % size == 0 or size % num_kv_heads == 0
    if num_heads % size == 0 and kv_ok:
        return None
    bad = [f"num_attention_heads {num_heads}"] if num_heads % size else []
    if not kv_ok:
        bad.append(f"num_key_value_heads {num_kv_heads} (nor is {size} a multiple of it)")
    fits = [d for d in range(1, num_heads + 1)
            if num_heads % d == 0 and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
    return (f"tensor-parallel size {size} does not divide the model's " + " and ".join(bad) +
            f" (each rank must own whole heads; sizes that fit: {fits})")


def check_tensor_parallel(cfg, size: int, expert_parallel: bool = False, dp_size: int = 1) -> str | None:
    """Why ``size`` ranks (per engine; ``dp_size`` engines sharing the experts) cannot serve the model of
    ModelConfig ``cfg``, or None: its heads must divide (check_divisible; a multi-head latent attention model's one
    latent KV head is replicated), and with expert parallel a mixture-of-experts model's experts must divide into
    equal parts over all dp_size x size ranks (without it each expert's intermediate features split like a dense
    MLP's, unevenly if need be)."""
    if expert_parallel and not cfg.num_experts:
        return (f"--enable-expert-parallel: {cfg.architecture} has no routed experts to place (it is not a "
                f"mixture-of-experts model)")
    ranks = size * dp_size
    if expert_parallel and cfg.num_experts % ranks:
        over = f"{ranks} ranks" + (f" ({dp_size} data-parallel engines x {size})" if dp_size > 1 else "")
        return (f"--enable-expert-parallel over {over}: {cfg.architecture}'s {cfg.num_experts} experts do "
                f"not divide into {ranks} equal parts (expert-parallel sizes that fit: "
                f"{[d for d in range(1, cfg.num_experts + 1) if cfg.num_experts % d == 0]})")
    return check_divisible(cfg.num_heads, cfg.num_kv_heads, size)
