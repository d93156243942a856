"""The serving path cannot be crashed or mis-steered by a request (no engine start).

Each test names the defect it guards against; each failed on the code before the fix
(see the commit message). Batch updates come from vLLM's own ``InputBatch`` (the V1
runner's persistent batch, with its ``condense()`` and swaps) and slot admission from
vLLM's own ``Scheduler``, so the sequences are the ones the engine produces.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessors  # noqa: E402
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch  # noqa: E402

from roast_vllm import SteeringVector  # noqa: E402
from roast_vllm.engine import registry  # noqa: E402
from roast_vllm.engine.spec import (  # noqa: E402
    DIGEST_KEY,
    MAX_SCALE,
    SteeringRequestError,
    parse_steer_args,
)
from roast_vllm.engine.state import SteeringState, set_state  # noqa: E402
from roast_vllm.engine.tracker import SteeringBatchTracker  # noqa: E402

L, H, ROWS = 4, 8, 6


def vec(value: float, layers=range(L)) -> SteeringVector:
    return SteeringVector(directions={l: torch.full((H,), float(value)) for l in layers})


@pytest.fixture
def front():
    """A front-end registry like roast_vllm.LLM's: vectors a (layers 0..3), b (layer 1)."""
    registry.reset()
    registry.set_model(L, max_model_len=64, dtype="float16", allow_capture=False)
    registry.add("a", vec(1.0))
    registry.add("b", vec(2.0, layers=[1]))
    yield
    registry.reset()


def validate(extra: dict) -> dict:
    """Run vLLM's submission-time hook; returns the extra_args the engine would get."""
    sp = SamplingParams(max_tokens=4, extra_args=extra)
    SteeringBatchTracker.validate_params(sp)
    return sp.extra_args


# ---------------------------------------------------------------- request values
@pytest.mark.parametrize(
    "extra, key",
    [
        ({"steer_vector": "a", "steer_scale": 1e39}, "steer_scale"),
        ({"steer_vector": "a", "steer_scale": "1e39"}, "steer_scale"),
        ({"steer_vector": "a", "steer_scale": 2**62}, "steer_scale"),
        ({"steer_vector": "a", "steer_scale": -2 * MAX_SCALE}, "steer_scale"),
        ({"steer_vector": "a", "steer_start": "99999999999999999999"}, "steer_start"),
        ({"steer_vector": "a", "steer_start": 2**63 - 1}, "steer_start"),
        ({"steer_vector": "a", "steer_start": math.inf}, "steer_start"),
        ({"steer_vector": "a", "steer_start": 64}, "steer_start"),  # = max_model_len
        ({"steer_vector": "a", "steer_layers": [math.inf]}, "steer_layers"),
        ({"steer_vector": "a", "steer_layers": "Infinity"}, "steer_layers"),
        ({"steer_vector": "a", "steer_layers": [2**40]}, "steer_layers"),
        ({"steer_vector": "b", "steer_layers": [2]}, "steer_layers"),  # b has layer 1 only
        ({"steer_vector": "a", "steer_scale": 5000.0}, "steer_scale"),  # fp16: adds > 4096
        ({"steer_vector": "a", "steer_positions": ["all"]}, "steer_positions"),
        ({"steer_vector": "x" * 300}, "steer_vector"),
        ({"roast_capture": "c1"}, "roast_capture"),  # capture is off on this front end
        ({DIGEST_KEY: "0123456789abcdef"}, DIGEST_KEY),  # internal, without steering
        ({"roast_other": 1}, "roast_other"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_out_of_range_values_are_refused_naming_the_key(front, extra, key):
    """Before the fix, scale 1e39 and start 1e20 passed validation and then overflowed a
    tensor write in update_state (fatal to the engine core); inf layers raised
    OverflowError (HTTP 500); roast_capture was open to any client."""
    with pytest.raises(SteeringRequestError, match=key):
        validate(extra)


def test_front_end_without_a_registry_refuses_steering():
    """Stock ``vllm serve`` without ROAST_VLLM_CONFIG could not check layers, and a layer the
    vector lacks raised KeyError in the engine; now such a front end refuses steering."""
    registry.reset()
    with pytest.raises(SteeringRequestError, match="no roast-vllm registry"):
        validate({"steer_vector": "a", "steer_layers": [3]})
    validate({"temperature_note": 1})  # requests without steering are not affected


def test_accepted_requests_are_stamped_with_the_vector_version(front):
    extra = {"steer_vector": "a", DIGEST_KEY: "ffffffffffffffff"}  # a client's stamp is overwritten
    out = validate(extra)
    assert out[DIGEST_KEY] == vec(1.0).digest()
    assert extra[DIGEST_KEY] == "ffffffffffffffff"  # the caller's dict is not modified
    registry.add("a", vec(3.0))
    assert validate({"steer_vector": "a"})[DIGEST_KEY] == vec(3.0).digest() != out[DIGEST_KEY]


def test_capture_is_opt_in(front):
    registry.set_model(L, 64, "bfloat16", allow_capture=True)
    assert validate({"roast_capture": "c1"}) == {"roast_capture": "c1"}
    with pytest.raises(SteeringRequestError, match="roast_capture"):
        validate({"roast_capture": ""})


# ------------------------------------------------------- vLLM's persistent batch
class Batch:
    """vLLM's V1 ``InputBatch`` with the steering tracker, and a ``SteeringState``."""

    def __init__(self, max_slots: int = 2, **state_kw) -> None:
        self.state = SteeringState(
            L, H, max_slots=max_slots, max_num_seqs=ROWS, max_num_tokens=64, dtype=torch.float32, **state_kw
        )
        set_state(self.state)
        self.ib = InputBatch(
            max_num_reqs=ROWS,
            max_model_len=64,
            max_num_batched_tokens=64,
            device=torch.device("cpu"),
            vocab_size=100,
            block_sizes=[16],
            max_num_blocks_per_req=[4],
            logitsprocs=LogitsProcessors([SteeringBatchTracker(None, "cpu", False)]),
        )
        self.state.prompt_len_of_row = lambda row: int(self.ib.num_prompt_tokens[row])
        self.specs: dict[str, dict] = {}

    def add(self, rid: str, extra: dict, prompt_len: int = 5, embeds: bool = False) -> None:
        self.specs[rid] = extra
        self.ib.add_request(
            CachedRequestState(
                req_id=rid,
                prompt_token_ids=None if embeds else list(range(prompt_len)),
                mm_features=[],
                sampling_params=SamplingParams(max_tokens=4, extra_args=extra),
                generator=None,
                block_ids=([],),
                num_computed_tokens=0,
                output_token_ids=[],
                prompt_embeds=torch.zeros(prompt_len, 8) if embeds else None,
            )
        )

    def remove(self, rid: str) -> None:
        self.ib.remove_request(rid)
        self.specs.pop(rid)

    def step(self) -> None:
        """What the runner does before a forward: condense, then the batch update."""
        self.ib.condense()
        self.ib.refresh_metadata()

    def check(self) -> None:
        """Every row holds its own request's steering; slots are exactly the distinct
        configurations in the batch."""
        st = self.state
        keys = set()
        for row, rid in enumerate(self.ib.req_ids):
            spec = parse_steer_args(self.specs[rid]) if rid is not None else None
            s = int(st.row_slot_cpu[row])
            if spec is None:
                assert s == 0, (row, rid)
                continue
            assert s != 0, (row, rid)
            digest = spec.digest or st.names[spec.vector]
            v = st.versions[digest]
            layers = spec.layers or tuple(v.layers)
            keys.add((digest, spec.scale, spec.layers))
            assert float(st.slot_scale[s]) == pytest.approx(spec.scale)
            for l in layers:
                assert torch.equal(st.table[l, s], v.directions[l]), (row, rid, l)
        assert st.active_slots() == len(keys)
        assert torch.equal(st.row_slot, st.row_slot_cpu)


@pytest.fixture
def batch():
    b = Batch(max_slots=2)
    b.state.register_vector("a", vec(1.0))
    b.state.register_vector("b", vec(-1.0))
    b.state.register_vector("c", vec(0.5))
    yield b
    set_state(None)


def test_condense_refill_releases_before_acquire(batch):
    """Slots full (a, b); r0 (a) and r1 (b) finish and r5 (c) arrives: vLLM puts r5 in
    row 0 and condense() moves r2 into row 1, so row 1 never appears in ``removed``.
    Before the fix b's slot was freed only in the move, after r5's acquire: "all 2
    steering slots are in use" raised in update_state and killed the engine."""
    batch.add("r0", {"steer_vector": "a"})
    batch.add("r1", {"steer_vector": "b"})
    batch.add("r2", {"steer_vector": "a"})
    batch.step()
    batch.check()
    batch.remove("r0")
    batch.remove("r1")
    batch.add("r5", {"steer_vector": "c"})
    batch.step()
    assert batch.ib.req_ids == ["r5", "r2"]
    batch.check()
    assert batch.state.num_rows_refused == 0


def test_prompt_embeddings_get_their_prompt_length(batch):
    """With prompt embeddings vLLM's batch update has no prompt token ids; the prompt
    length was taken as 0, so "generated" steered the whole prompt."""
    batch.add("e", {"steer_vector": "a", "steer_positions": "generated"}, prompt_len=9, embeds=True)
    batch.step()
    assert int(batch.state.row_lo_cpu[0]) == 9


def test_re_registered_vector_keeps_pinned_requests(batch):
    """A request pinned to the old version keeps it after re-registration, also when it
    leaves the batch for a step (preemption, token budget) and comes back."""
    old = batch.state.names["a"]
    batch.add("r0", {"steer_vector": "a", DIGEST_KEY: old})
    batch.step()
    new = batch.state.register_vector("a", vec(7.0))
    batch.add("r1", {"steer_vector": "a", DIGEST_KEY: new})
    batch.step()
    batch.check()
    extra = batch.specs["r0"]
    batch.remove("r0")  # leaves the batch for a step ...
    batch.step()
    batch.add("r0", extra)  # ... and resumes
    batch.step()
    batch.check()
    assert batch.state.active_slots() == 2


def test_request_the_engine_cannot_apply_runs_logged_not_fatal(batch, caplog):
    """Below the front end nothing raises: an unknown version (or no free slot) is an
    error in the log and a count, never an exception in update_state."""
    batch.add("r0", {"steer_vector": "a", DIGEST_KEY: "0" * 16})
    batch.add("r1", {"steer_vector": "nope"})
    batch.add("r2", {"steer_vector": "a", "steer_scale": "not a number"})
    batch.add("r3", {"steer_vector": "a", "steer_scale": 1.0})
    batch.add("r4", {"steer_vector": "b"})
    batch.add("r5", {"steer_vector": "c"})  # a third configuration: no free slot
    batch.step()
    assert batch.state.num_rows_refused == 4
    assert "UNSTEERED" in caplog.text


def test_captures_are_bounded():
    b = Batch(max_slots=1, max_capture_bytes=2 * L * H * 4)  # room for two captures
    st = b.state
    st.capture_sites = ("residual",)
    for i in range(4):
        st.set_capture(0, f"c{i}", prompt_len=1)
        st.prepare_step(torch.tensor([0]), torch.tensor([0]), 1)
        for l in range(L):
            st.capture_residual(l, torch.ones(1, H), None)
    st._finish_capture_step()
    assert sorted(st.captures) == ["c2", "c3"] and st.num_captures_dropped == 2
    set_state(None)


# ------------------------------------------------------------ vLLM's scheduler
@pytest.fixture(scope="module")
def make_scheduler(model_dir):
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from roast_vllm.engine.scheduler import SteeringScheduler

    try:
        from vllm.utils.hashing import sha256
    except ImportError:  # older layout
        from vllm.utils import sha256
    init_none_hash(sha256)
    hasher = get_request_block_hasher(16, sha256)

    def make(slots: int):
        mc = ModelConfig(model=model_dir, dtype="float32", max_model_len=512)
        sc = SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=512,
            max_model_len=512,
            is_encoder_decoder=False,
            enable_chunked_prefill=True,
        )
        cc = CacheConfig(block_size=16, enable_prefix_caching=True)
        cc.num_gpu_blocks = 128
        vc = VllmConfig(
            model_config=mc,
            scheduler_config=sc,
            cache_config=cc,
            device_config=DeviceConfig("cpu"),
            additional_config={"roast": {"max_steering_slots": slots}},
        )
        spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=16, dtype=torch.float32)
        kv = KVCacheConfig(
            num_blocks=128, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
        )
        sched = SteeringScheduler(
            vllm_config=vc,
            kv_cache_config=kv,
            structured_output_manager=StructuredOutputManager(vc),
            block_size=16,
        )

        def request(rid: str, extra: dict | None, prompt_len: int = 40):
            sp = SamplingParams(max_tokens=4, extra_args=extra)
            return Request(rid, list(range(1, prompt_len + 1)), sp, None, block_hasher=hasher)

        return sched, request

    return make


def _running_keys(sched) -> set:
    return {
        parse_steer_args(r.sampling_params.extra_args).slot_key
        for r in sched.running
        if r.sampling_params.extra_args
    }


def test_held_requests_keep_their_queue_order(make_scheduler):
    """vLLM's FCFS ``prepend_requests`` reverses its argument; held-back requests were put
    back reversed every step, so the queue's order flipped step by step."""
    sched, request = make_scheduler(2)
    for i in range(5):
        sched.add_request(request(f"r{i}", {"steer_vector": f"v{i}"}))
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["r0", "r1"]
    assert [r.request_id for r in sched.waiting] == ["r2", "r3", "r4"]
    assert sched.num_slot_blocked == 3


def test_versions_of_one_vector_count_as_two_configurations(make_scheduler):
    """Re-registering a vector gives requests on the old and the new version different
    slots on the worker; the scheduler counted them as one and let both in."""
    sched, request = make_scheduler(1)
    sched.add_request(request("old", {"steer_vector": "v", DIGEST_KEY: "0" * 16}))
    sched.add_request(request("new", {"steer_vector": "v", DIGEST_KEY: "1" * 16}))
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["old"]
    assert len(_running_keys(sched)) == 1


def test_kv_holding_waiting_requests_are_slot_checked(make_scheduler):
    """vLLM drains ``kv_holding_waiting`` (waiting requests that hold KV blocks) before
    ``waiting``; those requests skipped the slot check."""
    sched, request = make_scheduler(1)
    sched.add_request(request("a", {"steer_vector": "a"}))
    sched.schedule()
    r = request("b", {"steer_vector": "b"})
    sched.add_request(r)
    sched.waiting.remove_request(r)  # as if it held blocks (e.g. a KV load finished)
    sched.kv_holding_waiting.add_request(r)
    sched.schedule()
    assert len(_running_keys(sched)) == 1 and [x.request_id for x in sched.kv_holding_waiting] == ["b"]


def test_cache_salt_follows_the_absolute_steered_range(make_scheduler):
    """Turn 2 of a chat holds turn 1's prompt and reply in its prompt. With scope
    "generated" turn 1 steered its reply's positions and turn 2 must not; before the fix
    the salt held only the mode, so turn 2 reused turn 1's steered KV blocks."""
    sched, request = make_scheduler(4)
    gen = {"steer_vector": "a", "steer_positions": "generated"}
    t1, t2 = request("t1", gen, prompt_len=20), request("t2", gen, prompt_len=48)
    sched.add_request(t1)
    sched.add_request(t2)
    assert t1.block_hashes[0] != t2.block_hashes[0]
    every = {"steer_vector": "a"}  # scope "all": same positions steered, KV may be shared
    u1, u2 = request("u1", every, prompt_len=20), request("u2", every, prompt_len=48)
    sched.add_request(u1)
    sched.add_request(u2)
    assert u1.block_hashes[0] == u2.block_hashes[0]


# ------------------------------------------------------------------- fuzzing
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from roast_vllm.engine.spec import KEYS  # noqa: E402

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        ["a", "b", "2.5", "-3", "1e39", "99999999999999999999", "Infinity", "NaN", "3,1", "0", "63", "all"]
        + ["prompt", "generated", "last_prompt_and_generated", "0123456789abcdef", ""]
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=6,
)
_keys = [*KEYS, "steer_vectr", "roast_capture", DIGEST_KEY, "roast_debug", "seed_note"]
# values that are often valid, so accepted requests are drawn as often as refused ones
_plausible = {
    "steer_scale": st.floats(-20, 20) | st.integers(-5, 5) | st.sampled_from(["2.5", "-1", "0"]),
    "steer_layers": st.lists(st.integers(0, L), min_size=1, max_size=3)
    | st.sampled_from(["1", "0,2", "3, 1"]),
    "steer_positions": st.sampled_from(["all", "prompt", "generated", "last_prompt_and_generated"]),
    "steer_start": st.integers(0, 70) | st.sampled_from(["0", "12"]),
}
_requests = st.one_of(
    st.dictionaries(st.sampled_from(_keys), _json, max_size=5),
    *[
        st.fixed_dictionaries(
            {"steer_vector": st.sampled_from(["a", "b"])},
            optional={k: v | _json if weird else v for k, v in _plausible.items()},
        )
        for weird in (False, True)
    ],
)

# derandomized: CI explores the same examples every run; ROAST_FUZZ_EXAMPLES=5000 (and
# ROAST_FUZZ_RANDOM=1) explore further locally
FUZZ = settings(
    max_examples=int(os.environ.get("ROAST_FUZZ_EXAMPLES", "300")),
    derandomize=not os.environ.get("ROAST_FUZZ_RANDOM"),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def fuzz_batch(front):
    b = Batch(max_slots=4)
    b.state.register_vector("a", vec(1.0))
    b.state.register_vector("b", vec(2.0, layers=[1]))
    yield b
    set_state(None)


@FUZZ
@given(extra=_requests, prompt_len=st.integers(1, 40), embeds=st.booleans())
def test_fuzz_every_request_is_refused_naming_a_key_or_applies(fuzz_batch, extra, prompt_len, embeds):
    """Arbitrary JSON for every steer_* key, unknown and internal keys included: the front
    end either refuses it with a message naming one of its keys, or accepts it, and then
    vLLM's batch update applies it without an exception and steered as asked."""
    from vllm.exceptions import VLLMValidationError

    try:
        sp = SamplingParams(max_tokens=4, extra_args=extra)
    except VLLMValidationError:
        assume(False)  # vLLM's own extra_args check refused it first (HTTP 400 as well)
    try:
        SteeringBatchTracker.validate_params(sp)
    except SteeringRequestError as e:
        assert any(k in str(e) for k in extra), (extra, str(e))
        event("refused")
        return
    event("accepted, steered" if parse_steer_args(sp.extra_args) else "accepted, plain")
    b = fuzz_batch
    refused = b.state.num_rows_refused
    b.add("x", sp.extra_args, prompt_len=prompt_len, embeds=embeds)
    b.step()
    b.check()
    assert b.state.num_rows_refused == refused
    spec = parse_steer_args(sp.extra_args)
    if spec is not None:
        lo, hi = spec.token_range(prompt_len)
        assert (int(b.state.row_lo_cpu[0]), int(b.state.row_hi_cpu[0])) == (lo, hi)
    b.remove("x")
    b.step()
    assert b.state.active_slots() == 0


_CONFIGS = [
    {"steer_vector": "a"},
    {"steer_vector": "a", "steer_scale": -2.0, "steer_positions": "generated"},
    {"steer_vector": "b", "steer_layers": [1]},
    {"steer_vector": "c", "steer_start": 3},
    {"steer_vector": "a", "steer_scale": 0.5, "steer_positions": "prompt"},
    {},
]
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, len(_CONFIGS) - 1), st.integers(1, 30), st.booleans()),
        st.tuples(st.just("remove"), st.integers(0, 99)),
        st.tuples(st.just("swap"), st.integers(0, ROWS - 1), st.integers(0, ROWS - 1)),
        st.tuples(st.just("reregister"), st.floats(-4, 4, allow_nan=False)),
        st.tuples(st.just("step")),
    ),
    max_size=60,
)


@FUZZ
@given(ops=_ops)
def test_fuzz_rows_and_slots_follow_vllms_persistent_batch(ops):
    """Random adds, finishes, swaps and re-registrations through vLLM's own InputBatch
    (condense() and its moves included), at most ``max_slots`` configurations in the
    batch as the scheduler guarantees: every row steers with its own request's
    configuration after every step, nothing is refused, and when the batch empties every
    slot is free and zero."""
    b = Batch(max_slots=3)
    for name, v in (("a", 1.0), ("b", -1.0), ("c", 0.25)):
        b.state.register_vector(name, vec(v))
    n = 0
    try:
        for op in ops:
            if op[0] == "add" and len(b.specs) < ROWS:
                extra = dict(_CONFIGS[op[1]])
                if extra:
                    extra[DIGEST_KEY] = b.state.names[extra["steer_vector"]]
                keys = {parse_steer_args(e).slot_key for e in [*b.specs.values(), extra] if e}
                if len(keys) <= 3:  # the scheduler's admission rule
                    b.add(f"r{n}", extra, prompt_len=op[2], embeds=op[3])
                    n += 1
            elif op[0] == "remove" and b.specs:
                b.remove(sorted(b.specs)[op[1] % len(b.specs)])
            elif op[0] == "swap":
                b.step()  # swaps act on a condensed batch, as the runner's reorder does
                if max(op[1], op[2]) < b.ib.num_reqs and op[1] != op[2]:
                    b.ib.swap_states(op[1], op[2])
            elif op[0] == "reregister":
                b.state.register_vector("a", vec(op[1]))
            b.step()
            b.check()
        assert b.state.num_rows_refused == 0
        for rid in list(b.specs):
            b.remove(rid)
        b.step()
        assert b.state.active_slots() == 0 and sorted(b.state._free) == [1, 2, 3]
        assert not b.state.table.any() and not b.state.slot_scale.any() and not b.state.row_slot.any()
    finally:
        set_state(None)


# ------------------------------------------------- what steering refuses at start
@pytest.mark.parametrize(
    "kw, what",
    [
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative decoding"),
        ({"runner": "pooling"}, "pooling models"),
        ({"convert": "embed"}, "pooling conversions"),
        ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
        (
            {"kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}},
            "KV connectors",
        ),
    ],
    ids=["spec-decode", "pooling", "convert", "pipeline-parallel", "kv-offload"],
)
def test_unsupported_features_are_refused_before_any_engine_starts(model_dir, kw, what):
    import roast_vllm
    from roast_vllm.cli.serve import serve_command

    with pytest.raises(ValueError, match=what):
        roast_vllm.LLM(model_dir, **kw)
    flag = "--" + next(iter(kw)).replace("_", "-")
    value = kw[next(iter(kw))]
    argv = [flag, value if isinstance(value, str) else str(value).replace("'", '"')]
    with pytest.raises(ValueError, match=what):
        serve_command(model_dir, {}, 8, argv, cpu=True)


def test_serve_accepts_mlp_act_vectors(model_dir, tmp_path, capsys):
    """`roast-vllm serve` checked every vector against the hidden size, so it refused
    mlp_act vectors (ROAST's default site)."""
    from roast_vllm.cli import main
    from roast_vllm.engine.model_prep import model_dims

    dims = model_dims(model_dir)
    path = tmp_path / "m.safetensors"
    SteeringVector.random(dims["num_layers"], dims["intermediate_size"], layers=[3], site="mlp_act").save(
        path
    )
    main(["serve", "--model", model_dir, "--vector", f"m={path}", "--dry-run"])
    assert f'"m": "{path}"' in capsys.readouterr().out
