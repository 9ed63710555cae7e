"""Fuzzing the worker port: well over 1,000 malformed or hostile messages to one real worker, over real gRPC.

One worker process (tiny random Llama, eager, `--max-message-mb 1`) on loopback. Hypothesis builds the messages:

- random bytes, truncated and byte-mutated serialisations, on every ModelWorker method (sent raw, with identity
  serialisers);
- valid protobuf messages with unknown protocol versions, stale / replayed / future step ids, and steps that carry
  exactly one defect among otherwise valid content: unknown or duplicated requests, block ids outside the cache,
  token ids outside the vocabulary (negative or too large), zero or huge counts, too few blocks, requests longer
  than max_model_len or token lists shorter than their prompt, more requests or tokens than the configured
  budgets, NaN / inf / out-of-range sampling parameters, unknown logprobs modes;
- deferred steps followed by bad Sample calls (bitmask too short, wrong length, unknown or duplicated request ids);
- hostile handshakes (wrong layer count, zero or astronomically large caches);
- messages beyond the worker's configured maximum message size.

The oracle decides every message's answer before it is sent. A message the worker must refuse gets its non-OK
status (INVALID_ARGUMENT for something malformed or invalid, FAILED_PRECONDITION for a wrong protocol version, step
order or phase, RESOURCE_EXHAUSTED for too big) with a message naming the problem. A hostile-but-valid message the
worker can serve (huge top_k / logprobs / prompt_logprobs, extreme seeds, extreme-but-legal temperatures and
penalties, unknown finished ids, empty steps, chunked prefills) gets an OK reply whose contents are checked. A
random payload that happens to decode to a message that would really act (Shutdown, a servable InitializeCache,
the expected step) is not sent. After every message the worker process must be alive; every call has a deadline
and none may hit it. A refused step must change nothing: the worker's step counter and request count are checked
after each, and a request held through the whole fuzzing ("anchor") must go on to produce exactly the greedy
tokens it produced in a clean run, as must a fresh request afterwards.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections import Counter

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import start_worker
from ms_rpc.v1 import worker_pb2 as pb

V = pb.PROTOCOL_VERSION_CURRENT
SERVICE = "ms_rpc.v1.ModelWorker"
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE_S = 10.0
MAX_MESSAGE_MB = 1

# The worker under test: tiny_llama (conftest) and the cache the test asks for.
VOCAB, LAYERS, MAX_POS = 131, 2, 256
NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 32, 4, 64, 8, 64
ANCHOR_BLOCKS = [0, 1, 2, 3]                 # the anchor request's blocks; nothing else the worker serves uses them
POOL = list(range(4, NUM_BLOCKS))            # blocks for the servable requests the fuzzer sends
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
GEN = 8

REQUESTS = {"Describe": pb.DescribeRequest, "DetermineAvailableMemory": pb.MemoryRequest,
            "InitializeCache": pb.CacheConfig, "Warmup": pb.WarmupRequest, "Execute": pb.StepRequest,
            "Sample": pb.SampleRequest, "Shutdown": pb.ShutdownRequest, "CheckLiveness": pb.LivenessRequest}
REPLIES = {"Describe": pb.WorkerInfo, "DetermineAvailableMemory": pb.MemoryInfo, "InitializeCache": pb.CacheInfo,
           "Warmup": pb.WarmupReply, "Execute": pb.StepResult, "Sample": pb.StepResult,
           "Shutdown": pb.ShutdownReply, "CheckLiveness": pb.LivenessReply}
METHODS = list(REQUESTS)
# No shrinking: the worker is stateful, so the first failing message is the one to report, as it was sent.
FUZZ = settings(deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False)


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)

INT32 = st.integers(-2**31, 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf])


def _identity(b: bytes) -> bytes:
    return b


def _show(method: str, payload) -> str:
    if isinstance(payload, bytes):
        return f"{method}({len(payload)} raw bytes: {payload[:80]!r})"
    text = text_format.MessageToString(payload, as_one_line=True)
    return f"{method}({text[:300]}{'...' if len(text) > 300 else ''})"


class Port:
    """The worker's port, the oracle's model of its state, and the tallies."""

    def __init__(self, proc, address: str):
        self.proc = proc
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                               ("grpc.max_receive_message_length", 64 * 2**20)])
        self.raw = {m: self.channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=_identity,
                                                response_deserializer=_identity) for m in METHODS}
        self.next_step = 1
        self.active: set[str] = set()          # request ids the worker holds
        self.hostile = 0                       # malformed / hostile messages sent
        self.by_code: Counter = Counter()
        self.by_phase: Counter = Counter()
        self.skipped = 0                       # random payloads the oracle would not send (they would really act)
        self.max_latency = 0.0
        self.n_new = 0
        self.bytes_per_token = 0
        self.failures: list[str] = []

    def fresh_id(self, prefix: str) -> str:
        self.n_new += 1
        return f"{prefix}{self.n_new}"

    def call(self, method: str, payload, expect, detail: str | None = None, phase: str = "", hostile: bool = True):
        """Send one message; assert its status is in `expect` (a code or a set) and, for an error, that its
        details contain `detail`. Returns the parsed reply (OK) or (code, details)."""
        raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
        expect = {expect} if isinstance(expect, grpc.StatusCode) else set(expect)
        t0 = time.monotonic()
        try:
            reply, code, details = self.raw[method](raw, timeout=DEADLINE_S), OK, ""
        except grpc.RpcError as e:
            reply, code, details = None, e.code(), e.details() or ""
        dt = time.monotonic() - t0
        self.max_latency = max(self.max_latency, dt)
        if hostile:
            self.hostile += 1
            self.by_code[code.name] += 1
            self.by_phase[phase] += 1
        if self.proc.poll() is not None:
            self.fail(f"the worker died (exit {self.proc.returncode}) on {_show(method, payload)}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.fail(f"no answer in {DEADLINE_S} s to {_show(method, payload)}")
        if code not in expect:
            self.fail(f"{_show(method, payload)}: got {code.name} {details!r}, expected "
                      f"{sorted(c.name for c in expect)}")
        if code == OK:
            return REPLIES[method].FromString(reply)
        if not details:
            self.fail(f"{_show(method, payload)}: {code.name} without a message")
        if detail is not None and detail not in details:
            self.fail(f"{_show(method, payload)}: {code.name} {details!r} does not say {detail!r}")
        return code, details

    @staticmethod
    def fail(why: str):
        raise AssertionError(why)

    def first(self, fn):
        """Under @given: keeps the first failure of any kind (with its traceback) for run() to report. Hypothesis
        replays a failing example before it reports it, and against a stateful worker the replay fails differently
        (e.g. the step the first run consumed is now stale)."""
        @functools.wraps(fn)
        def example(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:
                if not self.failures:
                    self.failures.append(traceback.format_exc())
                raise
        return example

    def run(self, phase) -> None:
        try:
            phase()
        except Exception:
            if self.failures:
                raise AssertionError("first failure:\n" + self.failures[0]) from None
            raise

    # -- the worker's state, as the oracle believes it -------------------------------------------------------
    def check_state(self) -> None:
        live = self.call("CheckLiveness", pb.LivenessRequest(protocol_version=V), OK, hostile=False)
        assert live.next_step_id == self.next_step, f"worker expects step {live.next_step_id}, not {self.next_step}"
        assert live.requests_active == len(self.active), \
            f"worker holds {live.requests_active} requests, expected {len(self.active)} ({sorted(self.active)})"

    def step(self, step: pb.StepRequest, hostile: bool = False, phase: str = "") -> pb.StepResult:
        """A step the worker must serve; the oracle's state follows it."""
        assert step.step_id == self.next_step
        reply = self.call("Execute", step, OK, hostile=hostile, phase=phase)
        self.next_step += 1
        for rid in step.finished_req_ids:
            self.active.discard(rid)
        self.active |= {r.req_id for r in step.new_requests}
        assert reply.step_id == step.step_id
        assert [r.req_id for r in reply.results] == \
            [r.req_id for r in step.new_requests] + [r.req_id for r in step.cached_requests]
        return reply


def _step(port: Port, **kw) -> pb.StepRequest:
    return pb.StepRequest(protocol_version=V, step_id=port.next_step, **kw)


def _new(req_id: str, prompt, blocks, scheduled=None, computed=0, **sampling) -> pb.NewRequest:
    return pb.NewRequest(req_id=req_id, prompt_token_ids=list(prompt), block_ids=list(blocks),
                         num_computed_tokens=computed,
                         num_scheduled_tokens=len(prompt) - computed if scheduled is None else scheduled,
                         sampling=pb.SamplingParams(**sampling))


def _greedy(port: Port, rid: str, prompt, blocks, n: int, finish: bool = True) -> list[int]:
    """A normal greedy request with prompt logprobs (so that its state holds them too): prefill, then n-1
    decodes."""
    first = port.step(_step(port, new_requests=[_new(rid, prompt, blocks, prompt_logprobs=2)])).results[0]
    assert first.prompt_logprobs.width == 3 and len(first.prompt_logprobs.ranks) == len(prompt) - 1
    out = list(first.sampled_token_ids)
    for _ in range(n - 1):
        nc = len(prompt) + len(out) - 1
        r = port.step(_step(port, cached_requests=[pb.CachedRequest(req_id=rid, num_computed_tokens=nc,
                                                                    num_scheduled_tokens=1)]))
        out += r.results[0].sampled_token_ids
    if finish:
        port.step(_step(port, finished_req_ids=[rid]))
    return out


# -- strategies ---------------------------------------------------------------------------------------------------
def tokens(min_size=1, max_size=12):
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=max_size)


def bad_token():
    return st.one_of(st.integers(-2**31, -1), st.integers(VOCAB, 2**31 - 1), st.sampled_from([-1, VOCAB]))


def bad_block():
    return st.one_of(st.integers(-2**31, -1), st.integers(NUM_BLOCKS, 2**31 - 1), st.sampled_from([-1, NUM_BLOCKS]))


def blocks_for(n_tokens: int, start: int = 0) -> list[int]:
    need = -(-n_tokens // BLOCK_SIZE)
    return [POOL[(start + i) % len(POOL)] for i in range(need)]


@st.composite
def valid_sampling(draw) -> dict:
    """Legal sampling parameters, some at the edges of their ranges (what vLLM itself accepts)."""
    s = {}
    if draw(st.booleans()):
        s["temperature"] = draw(st.sampled_from([0.0, 1e-6, 0.01, 0.7, 1.0, 2.0, 1e30]))
    if draw(st.booleans()):
        s["top_k"] = draw(st.sampled_from([-1, 0, 1, 5, VOCAB, VOCAB + 1, 2**31 - 1]))
    if draw(st.booleans()):
        s["top_p"] = draw(st.sampled_from([0.0, 1e-9, 0.5, 1.0]))
    if draw(st.booleans()):
        s["min_p"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    if draw(st.booleans()):
        s["seed"] = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1]))
    if draw(st.booleans()):
        s["want_logprobs"] = True
        s["logprobs"] = draw(st.sampled_from([0, 1, 20, VOCAB, VOCAB + 1, 2**32 - 1]))
        s["logprobs_mode"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        s["prompt_logprobs"] = draw(st.sampled_from([0, 1, VOCAB, 2**32 - 1]))
    if draw(st.booleans()):
        s["presence_penalty"] = draw(st.sampled_from([-2.0, 0.0, 2.0]))
        s["frequency_penalty"] = draw(st.sampled_from([-2.0, 0.0, 2.0]))
        s["repetition_penalty"] = draw(st.sampled_from([0.0, 0.01, 1.0, 2.0, 100.0]))
    if draw(st.booleans()):
        s["logit_bias"] = draw(st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=5))
    if draw(st.booleans()):
        s["allowed_token_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10))
    if draw(st.booleans()):
        s["bad_words"] = [pb.TokenSequence(token_ids=w) for w in draw(st.lists(tokens(1, 3), max_size=3))]
    if draw(st.booleans()):
        s["stop_token_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), max_size=5))
        s["min_tokens"] = draw(st.sampled_from([0, 1, 2**32 - 1]))
    return s


# Sampling parameters no sampler can apply: (field, value, what the refusal must name).
BAD_SAMPLING = st.one_of(
    st.tuples(st.just("temperature"), st.one_of(BAD_FLOATS, st.floats(-1e30, -1e-3))),
    st.tuples(st.just("top_p"), st.one_of(BAD_FLOATS, st.floats(-1e30, -1e-6), st.floats(1.001, 1e30))),
    st.tuples(st.just("top_k"), st.integers(-2**31, -2)),
    st.tuples(st.just("min_p"), st.one_of(BAD_FLOATS, st.floats(-1e30, -1e-6), st.floats(1.001, 1e30))),
    st.tuples(st.sampled_from(["presence_penalty", "frequency_penalty"]),
              st.one_of(BAD_FLOATS, st.floats(2.001, 1e30), st.floats(-1e30, -2.001))),
    st.tuples(st.just("repetition_penalty"), st.one_of(BAD_FLOATS, st.floats(-1e30, -1e-6))),
    st.tuples(st.just("logprobs_mode"), st.one_of(st.integers(4, 2**31 - 1), st.integers(-2**31, -1))),
    st.tuples(st.just("logit_bias"), BAD_FLOATS),
)


# -- the worker ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def port(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "worker.log"
    proc, address = start_worker(tiny_llama, ["--no-jit", "--max-message-mb", str(MAX_MESSAGE_MB)], log_path=log)
    p = Port(proc, address)
    try:
        yield p
    finally:
        p.channel.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        print(f"\nworker log: {log}")


def _memory_expected(msg: pb.MemoryRequest) -> tuple[set, str]:
    """(codes, detail) of a DetermineAvailableMemory: a bad block size or fraction is refused; any other is answered,
    or refused as too large for this host (more than it has free) or too small (a budget below the weights)."""
    if msg.block_size == 0:
        return {INVALID}, "block_size"
    if not 0 <= msg.gpu_memory_utilization <= 1:
        return {INVALID}, "gpu_memory_utilization"
    return {OK, EXHAUSTED, PRECONDITION}, "KV cache size"


def test_fuzz_the_worker_port(port: Port):
    t_start = time.monotonic()
    p = port

    # -- before: hand-shake, a clean greedy run, and the anchor request that lives through the fuzzing -------------
    info = p.call("Describe", pb.DescribeRequest(protocol_version=V), OK, hostile=False)
    assert info.model.vocab_size == VOCAB and info.model.num_layers == LAYERS
    mem = p.call("DetermineAvailableMemory", pb.MemoryRequest(protocol_version=V, block_size=1,
                                                              requested_bytes=64 << 20), OK, hostile=False)
    p.bytes_per_token = mem.bytes_per_block
    p.call("InitializeCache", pb.CacheConfig(protocol_version=V, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                             num_layers=LAYERS, max_num_seqs=MAX_SEQS,
                                             max_num_batched_tokens=MAX_TOKENS, max_model_len=MAX_MODEL_LEN),
           OK, hostile=False)
    reference = _greedy(p, "reference", PROMPT, ANCHOR_BLOCKS, GEN)
    anchor = _greedy(p, "anchor", PROMPT, ANCHOR_BLOCKS, GEN // 2, finish=False)
    assert anchor == reference[: GEN // 2]
    p.check_state()

    # -- 1. unknown protocol versions, on every method (a wrong version is refused before anything else) ----------
    @fuzz(80)
    @given(method=st.sampled_from(METHODS), version=st.integers(0, 2**32 - 1).filter(lambda v: v != V),
           step_id=st.integers(0, 2**64 - 1))
    @p.first
    def versions(method, version, step_id):
        msg = REQUESTS[method](protocol_version=version)
        if method == "Execute":          # a version mismatch wins over everything else, even the right step
            msg.step_id = p.next_step if step_id % 2 else step_id
            msg.new_requests.append(_new(p.fresh_id("v"), [1, 2, 3], POOL[:1]))
        elif method == "InitializeCache":
            msg.num_blocks, msg.block_size = 8, 4
        p.call(method, msg, PRECONDITION, "protocol version mismatch", "versions")

    p.run(versions)
    p.check_state()

    # -- 2. random bytes; 3. truncated and byte-mutated serialisations: the oracle decodes them first ------------
    def expected(method: str, raw: bytes):
        """(codes, detail) for a raw payload, or None when it must not be sent (it would really act)."""
        try:
            msg = REQUESTS[method].FromString(raw)
        except DecodeError:
            return {INVALID}, "malformed"
        if msg.protocol_version != V:
            return {PRECONDITION}, "protocol version mismatch"
        if method in ("Describe", "CheckLiveness", "Warmup"):
            return {OK}, None
        if method == "DetermineAvailableMemory":
            return _memory_expected(msg)
        if method == "Sample":
            return {PRECONDITION}, "Sample for step"
        if method == "Execute":
            return ({PRECONDITION}, "out of order") if msg.step_id != p.next_step else None
        if method == "InitializeCache":
            if msg.num_layers and msg.num_layers != LAYERS:
                return {INVALID}, "layers"
            if msg.num_blocks == 0 or msg.block_size == 0:
                return {INVALID}, "positive"
            if msg.num_blocks * msg.block_size * p.bytes_per_token >= 2**40:
                return {EXHAUSTED}, "more than this host has free"
            return None                   # a real re-allocation: it would reset every request
        return None                       # Shutdown: it would stop the worker

    def send_raw(method: str, raw: bytes, phase: str):
        exp = expected(method, raw)
        if exp is None:
            p.skipped += 1
            return
        p.call(method, raw, *exp, phase=phase)

    @fuzz(320)
    @given(method=st.sampled_from(METHODS), raw=st.binary(max_size=256))
    @p.first
    def random_bytes(method, raw):
        send_raw(method, raw, "random bytes")

    p.run(random_bytes)
    p.check_state()

    @st.composite
    def full_message(draw, method):
        """A message of `method`'s type with most fields set, that the worker would refuse as it stands."""
        version = draw(st.sampled_from([V, V + 1]))
        if method == "Execute":
            step_id = draw(st.one_of(st.integers(0, max(p.next_step - 1, 0)),
                                     st.integers(p.next_step + 1, 2**64 - 1)))
            new = _new(p.fresh_id("t"), draw(tokens()), POOL[:4], **draw(valid_sampling()))
            cached = pb.CachedRequest(req_id="anchor", num_computed_tokens=11, num_scheduled_tokens=1,
                                      new_block_ids=draw(st.lists(st.integers(0, NUM_BLOCKS - 1), max_size=3)),
                                      all_token_ids=draw(tokens(0, 12)))
            return pb.StepRequest(protocol_version=version, step_id=step_id, new_requests=[new],
                                  cached_requests=[cached], finished_req_ids=["anchor", "zz"],
                                  total_num_scheduled_tokens=draw(UINT32), defer_sampling=draw(st.booleans()))
        if method == "Sample":
            n = draw(st.integers(0, 3))
            return pb.SampleRequest(protocol_version=version, step_id=draw(st.integers(0, 2**64 - 1)),
                                    structured_req_ids=[f"r{i}" for i in range(n)],
                                    grammar_bitmask=draw(st.binary(min_size=n * 20, max_size=n * 20)),
                                    bitmask_words=5)
        if method == "InitializeCache":
            return pb.CacheConfig(protocol_version=version, num_blocks=draw(st.integers(2**31, 2**32 - 1)),
                                  block_size=draw(st.integers(2**16, 2**32 - 1)), num_layers=draw(UINT32),
                                  max_num_seqs=draw(UINT32), max_num_batched_tokens=draw(UINT32),
                                  max_model_len=draw(UINT32))
        if method == "DetermineAvailableMemory":
            return pb.MemoryRequest(protocol_version=version, block_size=draw(UINT32),
                                    requested_bytes=draw(st.integers(0, 2**64 - 1)))
        return REQUESTS[method](protocol_version=V + 1)

    @fuzz(240)
    @given(data=st.data(), method=st.sampled_from(METHODS))
    @p.first
    def truncated_or_mutated(data, method):
        raw = data.draw(full_message(method)).SerializeToString()
        raw += data.draw(st.binary(max_size=8))                      # sometimes trailing garbage
        if data.draw(st.booleans()) and len(raw) > 1:
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]     # truncated
        else:
            b = bytearray(raw or b"\0")
            for _ in range(data.draw(st.integers(1, 4))):            # mutated
                b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
            raw = bytes(b)
        send_raw(method, raw, "truncated or mutated")

    p.run(truncated_or_mutated)
    p.check_state()

    # -- 4. steps out of order: stale, replayed, gaps, absurd ids (each would be valid at the right id) ----------
    @fuzz(60)
    @given(step_id=st.one_of(st.just(0), st.integers(1, p.next_step - 1), st.integers(p.next_step + 1, 2**64 - 1),
                             st.just(2**64 - 1)),
           prompt=tokens(), defer=st.booleans())
    @p.first
    def out_of_order(step_id, prompt, defer):
        assert step_id != p.next_step
        msg = pb.StepRequest(protocol_version=V, step_id=step_id, defer_sampling=defer, finished_req_ids=["anchor"],
                             new_requests=[_new(p.fresh_id("o"), prompt, blocks_for(len(prompt)))])
        p.call("Execute", msg, PRECONDITION, f"expects step {p.next_step}", "out of order")

    p.run(out_of_order)
    p.check_state()

    # -- 5. steps at the right id with one defect among valid content: refused whole, nothing changes -------------
    @st.composite
    def defective_step(draw):
        """(StepRequest, what the refusal must name)."""
        nid = p.fresh_id
        extras = [_new(nid("x"), pr, blocks_for(len(pr), 8 * i), **draw(valid_sampling()))
                  for i, pr in enumerate(draw(st.lists(tokens(1, 8), max_size=2)))]
        anchor_ok = pb.CachedRequest(req_id="anchor", num_computed_tokens=11, num_scheduled_tokens=1)
        step = _step(p, new_requests=extras, defer_sampling=draw(st.booleans()),
                     finished_req_ids=draw(st.lists(st.sampled_from(["anchor", "gone", ""]), max_size=2)))
        if "anchor" not in step.finished_req_ids and draw(st.booleans()):
            step.cached_requests.append(anchor_ok)
        kind = draw(st.sampled_from([
            "unknown cached", "new block", "cached block", "prompt token", "sampling token", "cached token",
            "zero scheduled", "too many scheduled", "huge computed", "duplicate new", "new and cached",
            "cached twice", "known id", "empty prompt", "prompt over max_model_len", "cached over max_model_len",
            "total mismatch", "too few blocks", "resumed without blocks", "shorter than prompt",
            "too many requests", "too many tokens"] + ["bad sampling"] * 6))      # 8 fields to cover
        prompt = draw(tokens())
        new = _new(nid("d"), prompt, blocks_for(len(prompt), 16), **draw(valid_sampling()))
        if kind == "unknown cached":
            rid = draw(st.text(max_size=12).filter(lambda s: s not in p.active or s in step.finished_req_ids))
            step.cached_requests.append(pb.CachedRequest(req_id=rid, num_computed_tokens=draw(UINT32),
                                                         num_scheduled_tokens=1))
            return step, "not known to the worker"
        if kind == "new block":
            new.block_ids.insert(draw(st.integers(0, len(new.block_ids))), draw(bad_block()))
            step.new_requests.append(new)
            return step, "outside the KV cache"
        if kind == "cached block":
            del step.cached_requests[:]
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            step.cached_requests.append(pb.CachedRequest(
                req_id="anchor", num_computed_tokens=11, num_scheduled_tokens=1, resumed=draw(st.booleans()),
                new_block_ids=ANCHOR_BLOCKS + [draw(bad_block())]))
            return step, "outside the KV cache"
        if kind == "prompt token":
            new.prompt_token_ids.insert(draw(st.integers(0, len(new.prompt_token_ids))), draw(bad_token()))
            new.num_scheduled_tokens += 1
            step.new_requests.append(new)
            return step, "outside the vocabulary"
        if kind == "sampling token":
            where = draw(st.sampled_from(["logit_bias", "allowed_token_ids", "bad_words", "stop_token_ids"]))
            t = draw(bad_token())
            s = new.sampling
            if where == "logit_bias":
                s.logit_bias[t] = 1.0
            elif where == "bad_words":
                s.bad_words.add(token_ids=[1, t])
            else:
                getattr(s, where).append(t)
            step.new_requests.append(new)
            return step, "outside the vocabulary"
        if kind == "cached token":
            del step.cached_requests[:]
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            cr = pb.CachedRequest(req_id="anchor", num_computed_tokens=11, num_scheduled_tokens=1)
            toks = PROMPT + anchor + [draw(bad_token())]
            if draw(st.booleans()):
                cr.all_token_ids.extend(toks)
            else:
                cr.new_token_ids.extend(toks[11:])
            step.cached_requests.append(cr)
            return step, "outside the vocabulary"
        if kind == "zero scheduled":
            new.num_scheduled_tokens = 0
            step.new_requests.append(new)
            return step, "scheduled 0 tokens"
        if kind == "too many scheduled":
            new.num_scheduled_tokens = draw(st.integers(len(prompt) + 1, 2**32 - 1))
            step.new_requests.append(new)
            return step, "refused"
        if kind == "huge computed":
            new.num_computed_tokens = draw(st.integers(len(prompt), 2**32 - 1))
            new.num_scheduled_tokens = draw(st.integers(1, 2**32 - 1))
            step.new_requests.append(new)
            return step, "refused"
        if kind == "duplicate new":
            step.new_requests.extend([new, new])
            return step, "scheduled twice"
        if kind == "new and cached":
            step.new_requests.append(new)
            step.cached_requests.append(pb.CachedRequest(req_id=new.req_id, num_computed_tokens=0,
                                                         num_scheduled_tokens=1))
            return step, "scheduled twice"
        if kind == "cached twice":
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            del step.cached_requests[:]
            step.cached_requests.extend([anchor_ok, anchor_ok])
            return step, "scheduled twice"
        if kind == "known id":
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            del step.cached_requests[:]
            new.req_id = "anchor"
            step.new_requests.append(new)
            return step, "already known"
        if kind == "empty prompt":
            del new.prompt_token_ids[:]
            new.num_scheduled_tokens = draw(st.integers(0, 4))
            step.new_requests.append(new)
            return step, "empty prompt"
        if kind == "prompt over max_model_len":
            long = draw(tokens(MAX_MODEL_LEN + 1, 3 * MAX_MODEL_LEN))
            step.new_requests.append(_new(new.req_id, long, blocks_for(len(long)), scheduled=draw(st.integers(1, 8))))
            return step, "max_model_len"
        if kind == "cached over max_model_len":
            del step.cached_requests[:]
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            step.cached_requests.append(pb.CachedRequest(
                req_id="anchor", num_computed_tokens=11, num_scheduled_tokens=1,
                all_token_ids=PROMPT + anchor + draw(tokens(MAX_MODEL_LEN, 2 * MAX_MODEL_LEN)),
                new_block_ids=blocks_for(3 * MAX_MODEL_LEN)))
            return step, "max_model_len"
        if kind == "total mismatch":
            step.new_requests.append(new)
            total = sum(r.num_scheduled_tokens for r in step.new_requests) + len(step.cached_requests)
            step.total_num_scheduled_tokens = draw(st.integers(1, 2**32 - 1).filter(lambda t: t != total))
            return step, "add up to"
        if kind == "too few blocks":
            del new.block_ids[-1]
            step.new_requests.append(new)
            return step, "blocks"
        if kind == "resumed without blocks":
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            del step.cached_requests[:]
            step.cached_requests.append(pb.CachedRequest(req_id="anchor", resumed=True, num_computed_tokens=11,
                                                         num_scheduled_tokens=1))
            return step, "blocks"
        if kind == "bad sampling":
            field, value = draw(BAD_SAMPLING)
            if field == "logit_bias":
                new.sampling.logit_bias[draw(st.integers(0, VOCAB - 1))] = value
            else:
                setattr(new.sampling, field, value)
            step.new_requests.append(new)
            return step, field
        if kind == "shorter than prompt":
            step.finished_req_ids[:] = [r for r in step.finished_req_ids if r != "anchor"]
            del step.cached_requests[:]
            short = draw(st.integers(1, len(PROMPT) - 1))
            step.cached_requests.append(pb.CachedRequest(req_id="anchor", resumed=draw(st.booleans()),
                                                         all_token_ids=PROMPT[:short], num_computed_tokens=0,
                                                         num_scheduled_tokens=short, new_block_ids=ANCHOR_BLOCKS))
            return step, "prompt"
        if kind == "too many requests":
            del step.new_requests[:]
            n = draw(st.integers(MAX_SEQS + 1 - len(step.cached_requests), 3 * MAX_SEQS))
            step.new_requests.extend(_new(nid("m"), [i % VOCAB], [POOL[i % len(POOL)]]) for i in range(n))
            return step, "max_num_seqs"
        if kind == "too many tokens":
            del step.new_requests[:]
            step.new_requests.extend(_new(nid("k"), PROMPT * 2, blocks_for(16, 4 * i)) for i in range(5))
            return step, "max_num_batched_tokens"
        raise AssertionError(kind)

    @fuzz(320)
    @given(case=defective_step())
    @p.first
    def defective_steps(case):
        step, detail = case
        p.call("Execute", step, INVALID, detail, "defective step")
        if "refused" not in detail:
            p.call("Execute", step, INVALID, "refused", "defective step")   # the same message again: same answer
        p.check_state()

    p.run(defective_steps)

    # -- 6. hostile but valid: the worker serves these (OK), and the replies hold up -------------------------------
    @fuzz(40)
    @given(data=st.data())
    @p.first
    def servable(data):
        """Up to three requests with legal but extreme sampling parameters, some from a prefix-cache hit, some in
        chunks: step 1 schedules them, step 2 continues each (a decode, the rest of the prompt, or a resumption
        with the full token list), step 3 finishes them. Unknown and duplicated finished ids ride along."""
        reqs = []
        for i in range(data.draw(st.integers(0, 3))):
            prompt = data.draw(tokens(1, 12))
            computed = data.draw(st.integers(0, len(prompt) - 1))
            chunk = data.draw(st.integers(1, len(prompt) - computed))
            reqs.append(_new(p.fresh_id("s"), prompt, blocks_for(len(prompt) + 2, 4 * i), scheduled=chunk,
                             computed=computed, **data.draw(valid_sampling())))
        resume = [data.draw(st.booleans()) for _ in reqs]
        unknown = data.draw(st.lists(st.text(max_size=8).filter(lambda s: s not in p.active), max_size=3))

        def check(req, res, done):
            s = req.sampling
            assert len(res.sampled_token_ids) == (1 if done else 0), res
            assert all(0 <= t < VOCAB for t in res.sampled_token_ids)
            if done and s.want_logprobs:
                lp = res.logprobs
                assert len(lp.token_ids) == len(lp.logprobs) == 1 + min(s.logprobs, VOCAB)
                assert lp.token_ids[0] == res.sampled_token_ids[0] and all(0 <= t < VOCAB for t in lp.token_ids)
                assert len(lp.ranks) == 1 and 1 <= lp.ranks[0] <= VOCAB
                assert not any(math.isnan(x) for x in lp.logprobs)
            if res.HasField("prompt_logprobs"):
                plp = res.prompt_logprobs
                assert s.HasField("prompt_logprobs") and done
                assert plp.width == 1 + min(s.prompt_logprobs, VOCAB)
                assert len(plp.token_ids) == len(plp.logprobs) == plp.width * (len(req.prompt_token_ids) - 1)
                assert len(plp.ranks) == len(req.prompt_token_ids) - 1

        reply = p.step(_step(p, new_requests=reqs, finished_req_ids=unknown + unknown), hostile=True,
                       phase="servable")
        cached = []
        for req, res, again in zip(reqs, reply.results, resume):
            n, start = len(req.prompt_token_ids), req.num_computed_tokens + req.num_scheduled_tokens
            done = start == n
            check(req, res, done)
            if done and req.num_computed_tokens == 0 and n > 1 and req.sampling.HasField("prompt_logprobs"):
                assert res.HasField("prompt_logprobs"), res
            known = list(req.prompt_token_ids) + list(res.sampled_token_ids)
            if again:           # resumed after a preemption: the whole token list and block table again
                cached.append(pb.CachedRequest(req_id=req.req_id, resumed=True, all_token_ids=known,
                                               new_block_ids=req.block_ids, num_computed_tokens=0,
                                               num_scheduled_tokens=len(known)))
            else:
                cached.append(pb.CachedRequest(req_id=req.req_id, num_computed_tokens=start,
                                               num_scheduled_tokens=1 if done else n - start))
        reply = p.step(_step(p, cached_requests=cached), hostile=True, phase="servable")
        for req, res in zip(reqs, reply.results):
            check(req, res, True)
        p.step(_step(p, finished_req_ids=[r.req_id for r in reqs]), hostile=True, phase="servable")

    p.run(servable)
    p.check_state()

    # -- 7. deferred steps and hostile Sample calls ----------------------------------------------------------------
    words = -(-VOCAB // 32)

    @fuzz(25)
    @given(data=st.data())
    @p.first
    def sample_calls(data):
        # Everything is drawn before anything is sent: Hypothesis may abandon an example part-way through a draw,
        # and a deferred step left behind would derail the next example.
        prompts = data.draw(st.lists(tokens(1, 8), min_size=1, max_size=3))
        reqs = [_new(p.fresh_id("g"), pr, blocks_for(len(pr), 4 * i)) for i, pr in enumerate(prompts)]
        ids = [r.req_id for r in reqs]
        step_id = p.next_step
        rows = [data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=words, max_size=words)) for _ in ids]
        for row in rows:                                           # each row allows at least one token
            t = data.draw(st.integers(0, VOCAB - 1))
            row[t // 32] |= 1 << (t % 32)
        good = b"".join(w.to_bytes(4, "little") for row in rows for w in row)

        def sample(**kw):
            return pb.SampleRequest(**{**dict(protocol_version=V, step_id=step_id, structured_req_ids=ids,
                                              grammar_bitmask=good, bitmask_words=words), **kw})

        bad = [
            (sample(bitmask_words=data.draw(st.integers(0, words - 1)),
                    grammar_bitmask=good[: 4 * len(ids) * (words - 1)]), INVALID, "bitmask"),
            (sample(grammar_bitmask=good[: data.draw(st.integers(0, len(good) - 1))]), INVALID, "bitmask"),
            (sample(grammar_bitmask=good + data.draw(st.binary(min_size=1, max_size=64))), INVALID, "bitmask"),
            (sample(bitmask_words=data.draw(st.integers(words + 1, 2**32 - 1))), INVALID, "bitmask"),
            (sample(structured_req_ids=ids[:-1] + [data.draw(st.text(max_size=8).filter(lambda s: s not in ids))]),
             INVALID, "not in the step"),
            (sample(structured_req_ids=[ids[0]] * len(ids) + [ids[0]],
                    grammar_bitmask=good + good[: 4 * words]), INVALID, "more than once"),
            (sample(step_id=data.draw(st.integers(0, 2**64 - 1).filter(lambda s: s != step_id))), PRECONDITION,
             f"deferred step is {step_id}"),
            (sample(protocol_version=data.draw(st.integers(2, 2**32 - 1))), PRECONDITION, "protocol version"),
            (pb.StepRequest(protocol_version=V, step_id=step_id + 1,
                            new_requests=[_new(p.fresh_id("g"), [1, 2], POOL[:1])]), PRECONDITION, "awaits Sample"),
        ]
        picks = data.draw(st.lists(st.integers(0, len(bad) - 1), min_size=3, max_size=6))

        p.call("Sample", pb.SampleRequest(protocol_version=V, step_id=step_id - 1), PRECONDITION,
               "deferred step is none", "sample")
        reply = p.step(_step(p, new_requests=reqs, defer_sampling=True), hostile=True, phase="sample")
        assert all(not r.sampled_token_ids for r in reply.results)
        for i in picks:
            msg, code, detail = bad[i]
            p.call("Execute" if isinstance(msg, pb.StepRequest) else "Sample", msg, code, detail, "sample")
        out = p.call("Sample", sample(), OK, hostile=False)
        for row, res in zip(rows, out.results):
            (t,) = res.sampled_token_ids
            assert row[t // 32] >> (t % 32) & 1, f"token {t} is not allowed by the grammar bitmask"
        p.step(_step(p, finished_req_ids=ids))

    p.run(sample_calls)
    p.check_state()

    # -- 8. hostile hand-shakes: wrong layers, zero or astronomically large caches ---------------------------------
    @fuzz(60)
    @given(data=st.data())
    @p.first
    def handshakes(data):
        kind = data.draw(st.sampled_from(["layers", "zero", "huge", "memory"]))
        if kind == "memory":
            msg = pb.MemoryRequest(protocol_version=V, block_size=data.draw(UINT32),
                                   requested_bytes=data.draw(st.integers(0, 2**64 - 1)))
            if data.draw(st.booleans()):
                msg.gpu_memory_utilization = data.draw(st.floats(width=32))
                msg.max_num_batched_tokens = data.draw(UINT32)
            r = p.call("DetermineAvailableMemory", msg, *_memory_expected(msg), phase="handshake")
            if not isinstance(r, tuple):
                assert r.bytes_per_block == msg.block_size * p.bytes_per_token
            return
        cfg = pb.CacheConfig(protocol_version=V, num_blocks=data.draw(st.integers(1, 2**32 - 1)),
                             block_size=data.draw(st.integers(1, 2**32 - 1)), num_layers=LAYERS,
                             max_num_seqs=data.draw(UINT32), max_num_batched_tokens=data.draw(UINT32),
                             max_model_len=data.draw(UINT32))
        if kind == "layers":
            cfg.num_layers = data.draw(st.integers(1, 2**32 - 1).filter(lambda n: n != LAYERS))
            p.call("InitializeCache", cfg, INVALID, "layers", "handshake")
        elif kind == "zero":
            setattr(cfg, data.draw(st.sampled_from(["num_blocks", "block_size"])), 0)
            p.call("InitializeCache", cfg, INVALID, "must be positive", "handshake")
        else:
            cfg.block_size = data.draw(st.integers(max(1, 2**40 // (cfg.num_blocks * p.bytes_per_token) + 1),
                                                   2**32 - 1)) if cfg.num_blocks < 2**31 else cfg.block_size
            if cfg.num_blocks * cfg.block_size * p.bytes_per_token < 2**40:
                cfg.num_blocks = 2**32 - 1
            p.call("InitializeCache", cfg, EXHAUSTED, "more than this host has free", "handshake")

    p.run(handshakes)
    p.check_state()

    # -- 9. messages beyond the configured maximum size (and one just under it, which is read and judged) ----------
    limit = MAX_MESSAGE_MB * 2**20
    for method in METHODS:
        for size in (limit + 1, limit + 4096, 3 * limit):
            msg = REQUESTS[method](protocol_version=V)
            raw = msg.SerializeToString() + _unknown_field(size)
            p.call(method, raw, EXHAUSTED, "larger than max", "oversized")
    big = pb.StepRequest(protocol_version=V, step_id=p.next_step + 1,
                         finished_req_ids=["z" * 1000] * (limit // 1100))
    assert limit // 2 < big.ByteSize() < limit
    p.call("Execute", big, PRECONDITION, "out of order", "oversized")
    big.step_id = p.next_step
    big.finished_req_ids.append("y" * (limit - big.ByteSize()))
    assert big.ByteSize() > limit
    p.call("Execute", big, EXHAUSTED, "larger than max", "oversized")
    p.check_state()

    # -- after: the anchor carries on exactly as in the clean run, and a fresh request matches it too --------------
    rest = []
    for _ in range(GEN - GEN // 2):
        nc = len(PROMPT) + len(anchor) + len(rest) - 1
        r = p.step(_step(p, cached_requests=[pb.CachedRequest(req_id="anchor", num_computed_tokens=nc,
                                                              num_scheduled_tokens=1)]))
        rest += r.results[0].sampled_token_ids
    p.step(_step(p, finished_req_ids=["anchor"]))
    assert anchor + rest == reference, "the anchor request's tokens changed over the fuzzing"
    assert _greedy(p, "after", PROMPT, ANCHOR_BLOCKS, GEN) == reference
    p.check_state()

    # Absurd but legal hints in a new hand-shake are served (clamped to the model; warm-up shapes are capped), and
    # the fresh cache generates the same tokens again.
    info = p.call("InitializeCache", pb.CacheConfig(protocol_version=V, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                                    max_num_seqs=2**32 - 1, max_num_batched_tokens=2**32 - 1,
                                                    max_model_len=2**32 - 1), OK, phase="handshake")
    assert info.next_step_id == 1
    p.next_step, p.active = 1, set()
    p.call("Warmup", pb.WarmupRequest(protocol_version=V), OK, phase="handshake")
    assert _greedy(p, "again", PROMPT, ANCHOR_BLOCKS, GEN) == reference
    p.check_state()
    assert p.proc.poll() is None

    runtime = time.monotonic() - t_start
    print(f"\nfuzz: {p.hostile} hostile messages in {runtime:.1f} s, max latency {p.max_latency * 1000:.0f} ms, "
          f"{p.skipped} random payloads not sent (they would really act)")
    print("  by status: " + ", ".join(f"{k} {v}" for k, v in p.by_code.most_common()))
    print("  by phase: " + ", ".join(f"{k} {v}" for k, v in p.by_phase.most_common()))
    assert p.hostile >= 1000, p.hostile


def _unknown_field(size: int) -> bytes:
    """A length-delimited field number 1000 (unknown to every message) holding `size` bytes."""
    n, varint = size, bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        varint.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes([0xC2, 0x3E]) + bytes(varint) + b"\0" * size
