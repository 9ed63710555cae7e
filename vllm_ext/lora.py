"""vLLM's LoRA calls (add_lora / remove_lora / pin_lora / list_loras) as ms_rpc.v1 RPCs on every rank.

Local (embedded) workers share the front's files: LoadLora names the adapter's directory. External workers may run
on another host: the front reads the PEFT files and streams their content, in chunks below the smallest message
limit a worker accepts. The front decides which adapters the workers hold (LoraAdapters), so that workers brought
back after a loss get them again.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

from ms_rpc.v1 import LORA_FILES, PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import WorkerError

log = logging.getLogger("vllm.ms_rpc")

CHUNK_BYTES = 2**20 - 2**16   # content per LoadLora chunk: under a worker's smallest --max-message-mb (1)
LORA_TIMEOUT_S = 300.0


def _not_found(lora_request, why: str) -> ValueError:
    """vLLM's LoRAAdapterNotFoundError message (its API server answers 404 for it)."""
    from vllm.exceptions import LoRAAdapterNotFoundError

    return ValueError(f"{LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)} ({why})")


def checked_path(lora_request, lora_config) -> str:
    """The adapter's directory (a hub name resolved as vLLM does), after vLLM's own check of its
    adapter_config.json against the LoRA settings (PEFTHelper.validate_legal, as vLLM's workers run it before
    loading): the same errors as native vLLM for a missing or unreadable config, DoRA, a rank above
    --max-lora-rank, modules_to_save, unsupported inits."""
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path

    path = get_adapter_absolute_path(lora_request.lora_path)
    try:
        PEFTHelper.from_local_dir(path, None).validate_legal(lora_config)
    except FileNotFoundError as e:
        raise _not_found(lora_request, e.strerror) from None
    return path


def adapter_chunks(lora_request, path: str, with_content: bool) -> list[pb.LoraChunk]:
    """The LoadLora stream of one adapter: its id, name and directory, then (``with_content``) its files' bytes."""
    head = dict(protocol_version=PROTOCOL_VERSION, lora_id=lora_request.lora_int_id, name=lora_request.lora_name,
                path=path, replace=lora_request.load_inplace)
    if not with_content:
        return [pb.LoraChunk(**head)]
    chunks = []
    for f in LORA_FILES:
        try:
            with open(os.path.join(path, f), "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise _not_found(lora_request, f"{f}: {e.strerror}") from None
        for lo in range(0, max(len(data), 1), CHUNK_BYTES):
            chunks.append(pb.LoraChunk(**head, file=f, data=data[lo:lo + CHUNK_BYTES]))
    return chunks


class LoraAdapters:
    """The adapters vLLM named (add_lora, or a request's LoRARequest: loaded on demand, as vLLM's own workers do)
    and which of them the workers hold: at most --max-cpu-loras, the least recently used removed first to make
    room, never a pinned one nor one the step being sent runs with. Every step makes sure its requests' adapters
    are on the workers (one removed earlier is loaded again), as vLLM's workers do for each batch."""

    def __init__(self, lora_config):
        self.lora_config = lora_config
        self.known: dict[int, object] = {}                 # lora_id -> vLLM LoRARequest, to load again
        self.held: OrderedDict[int, None] = OrderedDict()  # on the workers, least recently used first
        self.pinned: set[int] = set()
        self.of_request: dict[str, object] = {}            # req_id -> LoRARequest, for the requests with one

    @property
    def enabled(self) -> bool:
        return self.lora_config is not None

    @property
    def capacity(self) -> int:
        return self.lora_config.max_cpu_loras or self.lora_config.max_loras

    def config(self) -> pb.LoraConfig | None:
        c = self.lora_config
        return None if c is None else pb.LoraConfig(max_loras=c.max_loras, max_lora_rank=c.max_lora_rank,
                                                    max_cpu_loras=self.capacity)

    def add(self, group, lora_request, keep: set[int] = frozenset()) -> bool:
        """LoadLora on every rank, after removing the least recently used adapter (not in ``keep``) when the
        workers hold --max-cpu-loras. A bad adapter raises one error naming it and why (vLLM answers the load with
        it; a missing adapter is vLLM's 404, LoRAAdapterNotFoundError) and changes nothing."""
        lora_id = lora_request.lora_int_id
        path = checked_path(lora_request, self.lora_config)
        if lora_id not in self.held:
            self._make_room(group, lora_request.lora_name, keep)
        chunks = adapter_chunks(lora_request, path, with_content=bool(group.external))
        try:
            ok = group.call_all(lambda c: c.call("LoadLora", iter(chunks), LORA_TIMEOUT_S)).ok
        except WorkerError as e:
            if e.code is not None and e.code.name == "NOT_FOUND":
                raise _not_found(lora_request, e.details) from None
            raise ValueError(f"ms_rpc: loading LoRA adapter {lora_request.lora_name!r} failed: {e.details}") from None
        self.known[lora_id] = lora_request
        self.held[lora_id] = None
        self.held.move_to_end(lora_id)
        return ok

    def _make_room(self, group, name: str, keep: set[int]) -> None:
        while len(self.held) >= self.capacity:
            victim = next((i for i in self.held if i not in self.pinned and i not in keep), None)
            if victim is None:
                raise ValueError(f"ms_rpc: no room for LoRA adapter {name!r}: the workers hold --max-cpu-loras "
                                 f"{self.capacity} adapters, each pinned or needed by a step")
            self._each(group, "RemoveLora", victim)
            del self.held[victim]

    def ensure(self, group, so) -> None:
        """Before a step goes out: its requests' adapters are on the workers and the most recently used. One that
        cannot be loaded is logged here, and the workers refuse its requests alone."""
        for rid in so.finished_req_ids:
            self.of_request.pop(rid, None)
        for r in so.scheduled_new_reqs:
            if r.lora_request is not None:
                self.of_request[r.req_id] = r.lora_request
        need = {lr.lora_int_id: lr for rid in so.num_scheduled_tokens if (lr := self.of_request.get(rid))}
        for lora_id in sorted(need):
            if lora_id not in self.held:
                lr = self.known.get(lora_id, need[lora_id])   # removed by remove_lora: again from its path
                try:
                    self.add(group, lr, keep=set(need))
                except Exception as e:  # noqa: BLE001 - the workers refuse the requests alone; the engine goes on
                    log.error("ms_rpc: LoRA adapter %r not loaded for step's requests: %s", lr.lora_name, e)
            if lora_id in self.held:
                self.held.move_to_end(lora_id)

    def _each(self, group, rpc: str, lora_id: int) -> bool:
        req = pb.LoraRequest(protocol_version=PROTOCOL_VERSION, lora_id=lora_id)
        return group.call_all(lambda c: c.call(rpc, req, 30.0)).ok

    def remove(self, group, lora_id: int) -> bool:
        self.known.pop(lora_id, None)
        self.held.pop(lora_id, None)
        self.pinned.discard(lora_id)
        return self._each(group, "RemoveLora", lora_id)

    def pin(self, group, lora_id: int) -> bool:
        if lora_id in self.known and lora_id not in self.held:   # removed to make room: load it again first
            self.add(group, self.known[lora_id])
        ok = self._each(group, "PinLora", lora_id)
        if ok:
            self.pinned.add(lora_id)
        return ok

    def list(self, group) -> set[int]:
        req = pb.LoraRequest(protocol_version=PROTOCOL_VERSION)
        return set(group.call_all(lambda c: c.call("ListLoras", req, 30.0)).lora_ids)

    def restore(self, group) -> None:
        """Loads (and pins) again the adapters the workers held, on workers that came back without them; the
        requests that used them ended with the loss."""
        held, self.held = list(self.held), OrderedDict()
        for lora_id in held:
            lora_request = self.known[lora_id]
            try:
                self.add(group, lora_request)
                if lora_id in self.pinned:
                    self._each(group, "PinLora", lora_id)
            except (ValueError, WorkerError) as e:
                log.error("ms_rpc: LoRA adapter %r not restored on the workers: %s", lora_request.lora_name, e)
