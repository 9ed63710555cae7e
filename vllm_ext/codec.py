"""vLLM's SchedulerOutput -> ms_rpc.v1.StepRequest, and ms_rpc.v1.StepResult -> vLLM's ModelRunnerOutput.

Only deltas cross the wire, as in SchedulerOutput itself: a request's prompt and sampling parameters once, then
new block ids and counts. Everything here is plain data mapping; no state.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput

from ms_rpc.v1 import ALL_LOGPROBS, PROTOCOL_VERSION
from ms_rpc.v1 import worker_pb2 as pb


_LOGPROBS_MODES = {
    "raw_logprobs": pb.LOGPROBS_MODE_RAW_LOGPROBS, "raw_logits": pb.LOGPROBS_MODE_RAW_LOGITS,
    "processed_logprobs": pb.LOGPROBS_MODE_PROCESSED_LOGPROBS, "processed_logits": pb.LOGPROBS_MODE_PROCESSED_LOGITS,
}


class UnsupportedRequestError(ValueError):
    pass


def _only_group(block_ids, req_id: str) -> list[int]:
    if block_ids is None:
        return []
    if len(block_ids) != 1:
        raise UnsupportedRequestError(f"request {req_id}: {len(block_ids)} KV cache groups; ms_rpc serves one")
    return list(block_ids[0])


def _logprob_count(n: int | None) -> int:
    """vLLM's count (-1 = the whole vocabulary) on the wire; the worker caps counts at its vocabulary."""
    return ALL_LOGPROBS if n == -1 else max(n or 0, 0)


def encode_sampling(sp, logprobs_mode: str = "raw_logprobs") -> pb.SamplingParams:
    if sp is None:
        raise UnsupportedRequestError("pooling requests are not supported by ms_rpc workers")
    out = pb.SamplingParams(
        temperature=sp.temperature, top_k=max(sp.top_k or 0, 0), top_p=sp.top_p, min_p=sp.min_p,
        logprobs=_logprob_count(sp.logprobs), want_logprobs=sp.logprobs is not None or bool(sp.logprob_token_ids),
        logprob_token_ids=sp.logprob_token_ids or [],
        logprobs_mode=_LOGPROBS_MODES[logprobs_mode],
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty, logit_bias={int(k): float(v) for k, v in (sp.logit_bias or {}).items()},
        allowed_token_ids=sp.allowed_token_ids or [], min_tokens=sp.min_tokens,
        stop_token_ids=sorted(sp.all_stop_token_ids),
    )
    for word in sp.bad_words_token_ids or []:
        out.bad_words.add(token_ids=word)
    if sp.seed is not None:
        out.seed = sp.seed & (2**64 - 1)
    if sp.prompt_logprobs is not None:
        out.prompt_logprobs = _logprob_count(sp.prompt_logprobs)
    return out


def encode_step(so: SchedulerOutput, step_id: int, logprobs_mode: str = "raw_logprobs",
                defer_sampling: bool = False, resumed: set[str] | frozenset = frozenset()) -> pb.StepRequest:
    """`resumed`: new requests whose state the workers already hold. vLLM's V2 model runner gets a preempted
    request that resumes as a new request (its id known, `prefill_token_ids` = all its tokens, its whole block
    table); it goes to the workers as a resumed cached request, as vLLM sends it for the V1 model runner."""
    drafts = so.scheduled_spec_decode_tokens
    msg = pb.StepRequest(protocol_version=PROTOCOL_VERSION, step_id=step_id,
                         total_num_scheduled_tokens=so.total_num_scheduled_tokens, defer_sampling=defer_sampling,
                         refuse_alone=True)
    msg.finished_req_ids.extend(sorted(so.finished_req_ids))
    n = so.num_scheduled_tokens
    for r in so.scheduled_new_reqs:
        if r.req_id in resumed and r.req_id not in so.finished_req_ids:
            msg.cached_requests.add(
                req_id=r.req_id, resumed=True, new_block_ids=_only_group(r.block_ids, r.req_id),
                all_token_ids=r.prefill_token_ids or r.prompt_token_ids, num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=n[r.req_id], draft_token_ids=drafts.get(r.req_id, ()),
            )
            continue
        if r.prompt_token_ids is None:
            raise UnsupportedRequestError(f"request {r.req_id}: prompt embeddings are not supported by ms_rpc")
        if r.mm_features:
            raise UnsupportedRequestError(f"request {r.req_id}: multimodal inputs are not supported")
        msg.new_requests.add(
            req_id=r.req_id, prompt_token_ids=r.prompt_token_ids, sampling=encode_sampling(r.sampling_params, logprobs_mode),
            block_ids=_only_group(r.block_ids, r.req_id), num_computed_tokens=r.num_computed_tokens,
            num_scheduled_tokens=n[r.req_id], draft_token_ids=drafts.get(r.req_id, ()),
            lora_id=r.lora_request.lora_int_id if r.lora_request is not None else 0,
        )
    c = so.scheduled_cached_reqs
    add = msg.cached_requests.add
    for i, rid in enumerate(c.req_ids):   # fields set one by one and defaults left unset: 4x faster than add(**kw)
        cr = add()
        cr.req_id = rid
        cr.num_computed_tokens = c.num_computed_tokens[i]
        cr.num_scheduled_tokens = n[rid]
        if rid in c.resumed_req_ids:
            cr.resumed = True
        if c.new_block_ids[i] is not None:
            cr.new_block_ids.extend(_only_group(c.new_block_ids[i], rid))
        if rid in drafts:
            cr.draft_token_ids.extend(drafts[rid])
        if rid in c.all_token_ids:
            cr.all_token_ids.extend(c.all_token_ids[rid])
        if c.new_token_ids and c.new_token_ids[i]:
            cr.new_token_ids.extend(c.new_token_ids[i])
    return msg


def encode_grammar(step_id: int, grammar_output) -> pb.SampleRequest:
    """vLLM's GrammarOutput (int32 bitmask rows, one per structured-output request) -> a SampleRequest."""
    msg = pb.SampleRequest(protocol_version=PROTOCOL_VERSION, step_id=step_id)
    if grammar_output is not None and grammar_output.structured_output_request_ids:
        mask = np.ascontiguousarray(grammar_output.grammar_bitmask, dtype="<i4")
        msg.structured_req_ids.extend(grammar_output.structured_output_request_ids)
        msg.grammar_bitmask = mask.tobytes()
        msg.bitmask_words = mask.shape[1]
    return msg


def decode_result(res: pb.StepResult) -> ModelRunnerOutput:
    req_ids, sampled, with_lp, with_prompt_lp = [], [], [], []
    for r in res.results:               # one pass; HasField first: an absent message is cheaper to skip than read
        req_ids.append(r.req_id)
        sampled.append(r.sampled_token_ids[:])
        if r.HasField("logprobs") and r.logprobs.token_ids:
            with_lp.append(r)
        if r.HasField("prompt_logprobs") and r.prompt_logprobs.width:
            with_prompt_lp.append(r)
    logprobs = None
    if with_lp:
        # vLLM's LogprobsLists: one row per sampled token, [sampled, top-1..top-N] (or [sampled, its
        # logprob_token_ids]), padded to the widest request with token 0 at -inf as vLLM's sampler pads; a
        # request's rows start at cu_num_generated_tokens[its index].
        width = max(len(r.logprobs.token_ids) // len(r.sampled_token_ids) for r in with_lp)
        total = sum(len(s) for s in sampled)
        ids = np.zeros((total, width), np.int32)
        lps = np.full((total, width), -np.inf, np.float32)
        ranks = np.zeros((total,), np.int32)
        cu, j = [], 0
        for r in res.results:
            cu.append(j)
            m = len(r.sampled_token_ids)
            if r.logprobs.token_ids:
                k = len(r.logprobs.token_ids) // m
                ids[j:j + m, :k] = np.reshape(r.logprobs.token_ids, (m, k))
                lps[j:j + m, :k] = np.reshape(r.logprobs.logprobs, (m, k))
                ranks[j:j + m] = r.logprobs.ranks
            j += m
        logprobs = LogprobsLists(ids, lps, ranks, cu)
    prompt_lp = {}
    for r in with_prompt_lp:
        p = r.prompt_logprobs
        prompt_lp[r.req_id] = LogprobsTensors(
            torch.tensor(p.token_ids, dtype=torch.int32).view(-1, p.width),
            torch.tensor(p.logprobs, dtype=torch.float32).view(-1, p.width),
            torch.tensor(p.ranks, dtype=torch.int32),
        )
    return ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
        sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs_dict=prompt_lp,
    )
