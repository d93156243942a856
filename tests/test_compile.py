"""vLLM's default torch.compile mode (no enforce_eager), held to the eager engine's
standard: the same transformers-reference checks with near misses (tests/hf_reference.py),
tie-aware agreement with stock vLLM, steering buffers read live (never baked into the
compiled graph). Two compiled engine starts (~2-4 min each here); one steering engine with
3 slots (so slot admission is exercised) for the whole module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ENGINE_DEFAULTS, PROMPTS, first_tie, shutdown, token_ids

from roast_vllm import SteeringVector

pytestmark = pytest.mark.engine

ENGINE = dict(ENGINE_DEFAULTS, max_num_seqs=16)
MAX_TOKENS = 24
SLOTS = 3
#: Committed report of the compiled engine's agreement with stock vLLM (README quotes it).
AGREEMENT_FILE = Path(__file__).resolve().parents[1] / "results" / "compile_agreement.json"


def sp(extra=None, logprobs=None, ignore_eos=False):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra, logprobs=logprobs, ignore_eos=ignore_eos
    )


@pytest.fixture(scope="module")
def stock_outputs(model_dir):
    """Stock vLLM (the plugin installed, not enabled), compiled; greedy with top-2 logprobs."""
    import vllm

    llm = vllm.LLM(model_dir, **ENGINE)
    try:
        assert not llm.llm_engine.vllm_config.model_config.enforce_eager
        return llm.generate(PROMPTS, sp(logprobs=2))
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def llm(model_dir, stock_outputs):
    import os

    import roast_vllm

    # lets the replay-emulation test send a function to the engine process (test only)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    try:
        llm = roast_vllm.LLM(model_dir, max_steering_slots=SLOTS, **ENGINE)
        roast_vllm.register_vector(llm, "v", SteeringVector.random(30, 576, seed=11))
        yield llm
        shutdown(llm)
    finally:
        del os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"]


def test_compile_mode_is_on(llm):
    from vllm.config import CompilationMode

    cfg = llm.llm_engine.vllm_config
    assert cfg.compilation_config.mode != CompilationMode.NONE and not cfg.model_config.enforce_eager


def test_no_keys_and_scale_zero_bit_identical(llm):
    a = llm.generate(PROMPTS, sp(logprobs=2))
    b = llm.generate(PROMPTS, sp({"steer_vector": "v", "steer_scale": 0.0}, logprobs=2))
    assert token_ids(a) == token_ids(b)
    for oa, ob in zip(a, b):
        for la, lb in zip(oa.outputs[0].logprobs, ob.outputs[0].logprobs):
            assert {k: v.logprob for k, v in la.items()} == {k: v.logprob for k, v in lb.items()}


def agreement_report(stock_outputs, ours: list[list[int]]) -> dict:
    """Per prompt: tokens, stock's first near tie, and the length of the identical prefix."""
    rows = []
    for k, (o, t) in enumerate(zip(stock_outputs, ours, strict=True)):
        ref = list(o.outputs[0].token_ids)
        same = next((i for i, (x, y) in enumerate(zip(ref, t)) if x != y), min(len(ref), len(t)))
        rows.append({"prompt": k, "tokens": len(ref), "first_tie": first_tie(o), "identical_prefix": same})
    return {
        "prompts_identical": sum(r["identical_prefix"] == r["tokens"] for r in rows),
        "prompts": len(rows),
        "prompts_identical_up_to_first_tie": sum(r["identical_prefix"] >= r["first_tie"] for r in rows),
        "tokens_before_first_tie": sum(r["first_tie"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "per_prompt": rows,
    }


def test_agreement_with_stock_vllm_compiled(llm, stock_outputs):
    """Without steer keys the compiled steering engine is stock vLLM: every prompt's greedy
    tokens are identical up to stock's first near tie (where two correct engines may part),
    and the tie must come late enough for the check to bite (a prompt wrong from its first
    token fails). Writes results/compile_agreement.json."""
    from conftest import TIE_NATS

    ours = token_ids(llm.generate(PROMPTS, sp()))
    report = agreement_report(stock_outputs, ours)
    report["tie_nats"] = TIE_NATS
    report["command"] = "pytest tests/test_compile.py -k agreement"
    AGREEMENT_FILE.parent.mkdir(exist_ok=True)
    AGREEMENT_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print("compile-mode agreement with stock vLLM:", {k: v for k, v in report.items() if k != "per_prompt"})
    for r in report["per_prompt"]:
        assert r["identical_prefix"] >= r["first_tie"], (
            f"prompt {r['prompt']} differs before its first tie: {r}"
        )
        # its first token is compared: a prompt wrong from its first token fails
        assert r["first_tie"] >= 1, f"prompt {r['prompt']} starts with a tie: the check is vacuous for it"
    assert report["tokens_before_first_tie"] >= 0.5 * report["tokens"], report


def test_agreement_check_fails_a_wrong_first_token(stock_outputs):
    """The agreement check has teeth: an engine wrong from its first token fails it."""
    ids = [list(o.outputs[0].token_ids) for o in stock_outputs]
    wrong = [[(x[0] + 1) % 1000, *x[1:]] if k == 2 else x for k, x in enumerate(ids)]
    rep = agreement_report(stock_outputs, wrong)
    bad = rep["per_prompt"][2]
    assert bad["identical_prefix"] == 0 < bad["first_tie"]
    assert rep["prompts_identical_up_to_first_tie"] == len(ids) - 1


# ------------------------------------------------------------------ transformers reference
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last_prompt_and_generated"])
def test_steered_output_matches_transformers_hooks_compiled(llm, hf_model, positions):
    from hf_reference import check_position_scope

    check_position_scope(llm, hf_model, positions)


def test_side_by_side_matches_transformers_hooks_compiled(llm, hf_model):
    from hf_reference import check_side_by_side

    check_side_by_side(llm, hf_model)


def test_slot_waiting_requests_match_transformers_hooks_compiled(llm, hf_model):
    from hf_reference import check_slot_waiting

    before = llm.collective_rpc("roast_info")[0]
    check_slot_waiting(llm, hf_model, 2 * SLOTS)
    after = llm.collective_rpc("roast_info")[0]
    assert after["slot_reuses"] > before["slot_reuses"], "no slot was freed and reused: nothing waited"


def test_mlp_act_matches_transformers_hooks_compiled(llm, hf_model):
    from hf_reference import check_mlp_act

    check_mlp_act(llm, hf_model, "all")


def test_fusion_matches_transformers_reference_compiled(llm, hf_model):
    """Fusion Steering in the compiled graph (the fusion_mean op at every layer, reading
    its per-step list and running sums by address) against the transformers reference."""
    from conftest import LONG_PROMPT
    from hf_reference import check_fusion

    check_fusion(llm, hf_model, LONG_PROMPT)


def test_vector_replaced_after_start_changes_later_requests(llm):
    import roast_vllm

    extra = {"steer_vector": "v", "steer_scale": 6.0}
    first = token_ids(llm.generate(PROMPTS, sp(extra)))
    roast_vllm.register_vector(llm, "v", SteeringVector.random(30, 576, seed=12))
    second = token_ids(llm.generate(PROMPTS, sp(extra)))
    assert second != first
    roast_vllm.register_vector(llm, "v", SteeringVector.random(30, 576, seed=11))
    assert token_ids(llm.generate(PROMPTS, sp(extra))) == first  # live buffers, no stale graph


def test_mixed_batch_in_compile_mode(llm):
    # ignore_eos keeps the batch shape equal across the runs compared exactly (vLLM's CPU
    # kernels are not batch-invariant; see tests/conftest.py)
    base = token_ids(llm.generate(PROMPTS, sp(ignore_eos=True)))
    extras = [None if i % 2 == 0 else {"steer_vector": "v", "steer_scale": 6.0} for i in range(len(PROMPTS))]
    mixed = token_ids(llm.generate(PROMPTS, [sp(e, ignore_eos=True) for e in extras]))
    for i, e in enumerate(extras):
        if e is None:
            assert mixed[i] == base[i], f"unsteered request {i} changed in a mixed batch"
        else:
            assert mixed[i] != base[i], f"steered request {i} was not steered"
    # what the steered rows computed: test_side_by_side_matches_transformers_hooks_compiled


def test_mlp_act_steering_in_compile_mode(llm):
    """The compiled graph carries the mlp_act site too: steered requests change, unsteered
    ones in the same batch do not, scale 0 is the baseline bit for bit."""
    import roast_vllm
    from roast_vllm import SteeringVector

    roast_vllm.register_vector(
        llm, "m", SteeringVector.random(30, 1536, layers=list(range(4, 24)), seed=5, site="mlp_act")
    )
    base = token_ids(llm.generate(PROMPTS, sp(ignore_eos=True)))
    extras = [None if i % 2 == 0 else {"steer_vector": "m", "steer_scale": 4.0} for i in range(len(PROMPTS))]
    mixed = token_ids(llm.generate(PROMPTS, [sp(e, ignore_eos=True) for e in extras]))
    for i, e in enumerate(extras):
        assert (mixed[i] == base[i]) == (e is None), f"request {i} (steered={e is not None})"
    zero = token_ids(llm.generate(PROMPTS, sp({"steer_vector": "m", "steer_scale": 0.0}, ignore_eos=True)))
    assert zero == base


def test_capture_needs_an_eager_engine(llm):
    from roast_vllm.engine.capture import capture_activations

    with pytest.raises(ValueError, match="enforce_eager=True"):
        capture_activations(llm, [[1, 2, 3]], [0], progress=False)


def _bypass_steered_forward(worker) -> bool:
    """In the engine process: from now on the steered model's own ``forward`` Python is
    skipped and the stock class's runs instead, as a full CUDA-graph replay skips it (in
    compile mode the decoder layers' Python never runs after warm-up anyway)."""
    model = worker.model_runner.get_model()
    cls = type(model)
    stock = next(c for c in cls.__mro__[1:] if not c.__name__.startswith("Roast"))
    own = cls.__dict__.get("forward")
    cls._roast_own_forward = own
    cls.forward = stock.forward
    return own is not None


def _restore_steered_forward(worker) -> None:
    cls = type(worker.model_runner.get_model())
    own = cls.__dict__.get("_roast_own_forward")
    if own is None:
        del cls.forward
    else:
        cls.forward = own


def test_steering_holds_under_full_graph_replay_emulation(llm):
    """Prefill then many decode steps with the steered model's forward Python bypassed:
    mixed steered and plain rows, rows finishing early and their rows reused by waiting
    requests (24 requests, 16 rows), slots released and reused by other vectors, every
    position scope and both sites. Outputs must equal the normal run's exactly (same
    engine, same batch shapes). The pre-hook design (slots computed inside the model's
    forward from attention metadata) fails this: replayed steps read stale slots."""
    from vllm import SamplingParams

    import roast_vllm

    roast_vllm.register_vector(llm, "w", SteeringVector.random(30, 576, seed=21))
    roast_vllm.register_vector(
        llm, "m2", SteeringVector.random(30, 1536, layers=list(range(2, 28)), seed=22, site="mlp_act")
    )
    early = [  # only in the first, short requests: their slots are freed mid-run
        {"steer_vector": "v", "steer_scale": 6.0},
        {"steer_vector": "w", "steer_scale": 6.0, "steer_positions": "generated"},
        {"steer_vector": "v", "steer_scale": -6.0, "steer_positions": "prompt"},
    ]
    late = [  # only in waiting requests admitted into freed rows: they reuse those slots
        {"steer_vector": "m2", "steer_scale": 4.0, "steer_positions": "last_prompt_and_generated"},
        {"steer_vector": "w", "steer_scale": -6.0, "steer_start": 9},
        {"steer_vector": "v", "steer_scale": 3.0, "steer_layers": list(range(8, 20))},
    ]
    prompts, params, plain = [], [], []
    for i in range(24):
        first = i < 16
        extra = None if i % 4 == 3 else (early if first else late)[i % 3]
        max_tokens = (4 + i % 3) if first and i % 2 == 0 else 20
        prompts.append(PROMPTS[i % len(PROMPTS)])
        params.append(
            SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)
        )
        plain.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    def run(ps):
        llm.reset_prefix_cache()  # same prefill work every run: same batch shapes
        return token_ids(llm.generate(prompts, ps, use_tqdm=False))

    base = run(plain)
    normal = run(params)
    before = llm.collective_rpc("roast_info")[0]
    llm.collective_rpc(_bypass_steered_forward)
    try:
        replay = run(params)
    finally:
        llm.collective_rpc(_restore_steered_forward)
    after = llm.collective_rpc("roast_info")[0]

    steered = [i for i, p in enumerate(params) if p.extra_args]
    for i in range(len(prompts)):
        assert replay[i] == normal[i], f"request {i} ({params[i].extra_args}) changed under replay"
        if i not in steered:
            assert normal[i] == base[i], f"plain request {i} changed beside steered ones"
    # not vacuous: every steering configuration changed some request (short requests with
    # narrow scopes may keep their few greedy tokens), most requests changed
    by_config: dict[str, list[bool]] = {}
    for i in steered:
        by_config.setdefault(str(params[i].extra_args), []).append(normal[i] != base[i])
    assert all(any(v) for v in by_config.values()), by_config
    assert sum(sum(v) for v in by_config.values()) >= len(steered) // 2, by_config
    assert after["steps_prepared"] - before["steps_prepared"] >= 20  # the hook ran every step
    assert after["slot_reuses"] > before["slot_reuses"]  # freed slots were reused


def test_multi_vector_requests_match_the_sum_compiled(llm, hf_model):
    """``steer_vectors`` combinations (two residual vectors; residual + mlp_act) in one
    batch with single and plain requests: each is its transformers reference of the sum of
    its terms and none of its near misses (tests/hf_reference.py)."""
    from hf_reference import check_combination

    check_combination(llm, hf_model)
