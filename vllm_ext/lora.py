"""vLLM's LoRA calls (add_lora / remove_lora / pin_lora / list_loras) as ms_rpc.v1 RPCs on every rank.

Local (embedded) workers share the front's files: LoadLora names the adapter's directory. External workers may run
on another host: the front reads the PEFT files and streams their content, in chunks below the smallest message
limit a worker accepts. The executor remembers the adapters it added, so that workers brought back after a loss
get them again.
"""
from __future__ import annotations

import logging
import os

from ms_rpc.v1 import LORA_FILES, PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb
from vllm_ext.client import WorkerError

log = logging.getLogger("vllm.ms_rpc")

CHUNK_BYTES = 2**20 - 2**16   # content per LoadLora chunk: under a worker's smallest --max-message-mb (1)
LORA_TIMEOUT_S = 300.0


def adapter_chunks(lora_request, with_content: bool) -> list[pb.LoraChunk]:
    """The LoadLora stream of one adapter: its id, name and path, then (``with_content``) its files' bytes.
    Raises vLLM's LoRAAdapterNotFoundError when the front cannot read the files it must send."""
    head = dict(protocol_version=PROTOCOL_VERSION, lora_id=lora_request.lora_int_id, name=lora_request.lora_name,
                path=lora_request.lora_path, replace=lora_request.load_inplace)
    if not with_content:
        return [pb.LoraChunk(**head)]
    chunks = []
    for f in LORA_FILES:
        try:
            with open(os.path.join(lora_request.lora_path, f), "rb") as fh:
                data = fh.read()
        except OSError as e:
            from vllm.exceptions import LoRAAdapterNotFoundError

            raise ValueError(f"{LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)} "
                             f"({f}: {e.strerror})") from None
        for lo in range(0, max(len(data), 1), CHUNK_BYTES):
            chunks.append(pb.LoraChunk(**head, file=f, data=data[lo:lo + CHUNK_BYTES]))
    return chunks


class LoraAdapters:
    def __init__(self, lora_config):
        self.lora_config = lora_config
        self.added: dict[int, object] = {}    # lora_id -> vLLM LoRARequest
        self.pinned: set[int] = set()

    @property
    def enabled(self) -> bool:
        return self.lora_config is not None

    def config(self) -> pb.LoraConfig | None:
        c = self.lora_config
        return None if c is None else pb.LoraConfig(max_loras=c.max_loras, max_lora_rank=c.max_lora_rank)

    def add(self, group, lora_request) -> bool:
        """LoadLora on every rank. A bad adapter raises one error naming it and why (vLLM answers the load with
        it; a missing adapter is vLLM's 404, LoRAAdapterNotFoundError) and changes nothing."""
        chunks = adapter_chunks(lora_request, with_content=bool(group.external))
        try:
            ok = group.call_all(lambda c: c.call("LoadLora", iter(chunks), LORA_TIMEOUT_S)).ok
        except WorkerError as e:
            if e.code is not None and e.code.name == "NOT_FOUND":
                from vllm.exceptions import LoRAAdapterNotFoundError

                raise ValueError(f"{LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)}: "
                                 f"{e.details}") from None
            raise ValueError(f"ms_rpc: loading LoRA adapter {lora_request.lora_name!r} failed: {e.details}") from None
        if ok or lora_request.lora_int_id not in self.added:
            self.added[lora_request.lora_int_id] = lora_request
        return ok

    def _each(self, group, rpc: str, lora_id: int) -> bool:
        req = pb.LoraRequest(protocol_version=PROTOCOL_VERSION, lora_id=lora_id)
        return group.call_all(lambda c: c.call(rpc, req, 30.0)).ok

    def remove(self, group, lora_id: int) -> bool:
        self.added.pop(lora_id, None)
        self.pinned.discard(lora_id)
        return self._each(group, "RemoveLora", lora_id)

    def pin(self, group, lora_id: int) -> bool:
        ok = self._each(group, "PinLora", lora_id)
        if ok:
            self.pinned.add(lora_id)
        return ok

    def list(self, group) -> set[int]:
        req = pb.LoraRequest(protocol_version=PROTOCOL_VERSION)
        return set(group.call_all(lambda c: c.call("ListLoras", req, 30.0)).lora_ids)

    def restore(self, group) -> None:
        """Loads (and pins) again every adapter added so far, on workers that came back without them."""
        for lora_id, lora_request in self.added.items():
            try:
                self.add(group, lora_request)
                if lora_id in self.pinned:
                    self._each(group, "PinLora", lora_id)
            except (ValueError, WorkerError) as e:
                log.error("ms_rpc: LoRA adapter %r not restored on the workers: %s", lora_request.lora_name, e)
