"""vLLM's SchedulerOutput -> ms_rpc.v1.StepRequest, and ms_rpc.v1.StepResult -> vLLM's ModelRunnerOutput.

Only deltas cross the wire, as in SchedulerOutput itself: a request's prompt and sampling parameters once, then
new block ids and counts. Everything here is plain data mapping; no state.
"""

from __future__ import annotations

import logging

import numpy as np
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput

from ms_rpc.v1 import worker_pb2 as pb

log = logging.getLogger("vllm.ms_rpc")  # under vLLM's logger: same format and level

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT

# SamplingParams fields the worker does not apply yet, with their neutral values.
_NOT_YET_APPLIED = {
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": None,
    "allowed_token_ids": None, "min_tokens": 0, "prompt_logprobs": None, "structured_outputs": None,
}


class UnsupportedRequestError(ValueError):
    pass


def _only_group(block_ids, req_id: str) -> list[int]:
    if block_ids is None:
        return []
    if len(block_ids) != 1:
        raise UnsupportedRequestError(f"request {req_id}: {len(block_ids)} KV cache groups; ms_rpc serves one")
    return list(block_ids[0])


def encode_sampling(sp) -> pb.SamplingParams:
    if sp is None:
        raise UnsupportedRequestError("pooling requests are not supported by ms_rpc workers")
    ignored = [k for k, v in _NOT_YET_APPLIED.items() if getattr(sp, k, v) not in (v, None, [], {})]
    if ignored:
        log.warning("ms_rpc: sampling parameters %s are not applied by the worker yet and are ignored", ignored)
    out = pb.SamplingParams(
        temperature=sp.temperature, top_k=max(sp.top_k or 0, 0), top_p=sp.top_p, min_p=sp.min_p,
        logprobs=max(sp.logprobs or 0, 0), want_logprobs=sp.logprobs is not None,
    )
    if sp.seed is not None:
        out.seed = sp.seed & (2**64 - 1)
    return out


def encode_step(so: SchedulerOutput, step_id: int) -> pb.StepRequest:
    if so.scheduled_spec_decode_tokens:
        raise UnsupportedRequestError("speculative decoding is not supported by ms_rpc workers")
    msg = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=step_id,
                         total_num_scheduled_tokens=so.total_num_scheduled_tokens)
    msg.finished_req_ids.extend(sorted(so.finished_req_ids))
    n = so.num_scheduled_tokens
    for r in so.scheduled_new_reqs:
        if r.prompt_token_ids is None:
            raise UnsupportedRequestError(f"request {r.req_id}: prompt embeddings are not supported by ms_rpc")
        if r.lora_request is not None or r.mm_features:
            raise UnsupportedRequestError(f"request {r.req_id}: LoRA and multimodal inputs are not supported")
        msg.new_requests.add(
            req_id=r.req_id, prompt_token_ids=r.prompt_token_ids, sampling=encode_sampling(r.sampling_params),
            block_ids=_only_group(r.block_ids, r.req_id), num_computed_tokens=r.num_computed_tokens,
            num_scheduled_tokens=n[r.req_id],
        )
    c = so.scheduled_cached_reqs
    for i, rid in enumerate(c.req_ids):
        cr = msg.cached_requests.add(
            req_id=rid, resumed=rid in c.resumed_req_ids, new_block_ids=_only_group(c.new_block_ids[i], rid),
            num_computed_tokens=c.num_computed_tokens[i], num_scheduled_tokens=n[rid],
        )
        if rid in c.all_token_ids:
            cr.all_token_ids.extend(c.all_token_ids[rid])
        if c.new_token_ids and c.new_token_ids[i]:
            cr.new_token_ids.extend(c.new_token_ids[i])
    return msg


def decode_result(res: pb.StepResult) -> ModelRunnerOutput:
    req_ids = [r.req_id for r in res.results]
    sampled = [list(r.sampled_token_ids) for r in res.results]
    logprobs = None
    with_lp = [r for r in res.results if r.logprobs.token_ids]
    if with_lp:
        # vLLM's LogprobsLists: one row per sampled token, [sampled, top-1..top-N], padded to the widest request.
        width = max(len(r.logprobs.token_ids) for r in with_lp)
        rows = [r for r in res.results if r.sampled_token_ids]
        ids = np.zeros((len(rows), width), np.int32)
        lps = np.full((len(rows), width), -np.inf, np.float32)
        ranks = np.zeros((len(rows),), np.int32)
        for j, r in enumerate(rows):
            k = len(r.logprobs.token_ids)
            ids[j, :k] = r.logprobs.token_ids
            lps[j, :k] = r.logprobs.logprobs
            ranks[j] = r.logprobs.ranks[0] if r.logprobs.ranks else 0
        cu = [0]
        for r in res.results:
            cu.append(cu[-1] + (1 if r.sampled_token_ids else 0))
        logprobs = LogprobsLists(ids, lps, ranks, cu[:-1])
    return ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
        sampled_token_ids=sampled, logprobs=logprobs,
    )
