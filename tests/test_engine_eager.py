"""The steering engine on the real SmolLM2 model, eager mode, one engine for the module.

``max_num_batched_tokens`` is small so long prompts are chunked and mixed with decodes
in one step, and ``max_steering_slots`` is small so slot admission is exercised.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ENGINE_DEFAULTS, LONG_PROMPT, PROMPTS, assert_greedy_match, shutdown, token_ids

from roast_vllm import SteeringVector, SteeringVectorError

pytestmark = pytest.mark.engine

ENGINE = dict(ENGINE_DEFAULTS, enforce_eager=True, max_num_batched_tokens=256, max_num_seqs=16)
MAX_TOKENS = 24


def sp(extra=None, max_tokens=MAX_TOKENS, logprobs=None):
    from vllm import SamplingParams

    # ignore_eos: every request runs MAX_TOKENS steps whatever its steering, so the batch
    # has the same shape step by step in the runs we compare (vLLM's CPU kernels are not
    # batch-invariant: a different mix of rows may round differently).
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, extra_args=extra, logprobs=logprobs, ignore_eos=True
    )


@pytest.fixture(scope="module")
def stock_outputs(model_dir):
    """Greedy output (with top-2 logprobs) of a stock vLLM engine, same settings."""
    import vllm

    llm = vllm.LLM(model_dir, **ENGINE)
    try:
        return llm.generate(PROMPTS + [LONG_PROMPT], sp(logprobs=2))
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def llm(model_dir, stock_outputs):
    import roast_vllm

    llm = roast_vllm.LLM(model_dir, max_steering_slots=3, **ENGINE)
    L, H = llm.roast_dims["num_layers"], llm.roast_dims["hidden_size"]
    for i in range(3):
        roast_vllm.register_vector(llm, f"rnd{i}", SteeringVector.random(L, H, seed=i))
    yield llm
    shutdown(llm)


def steer(name="rnd0", scale=4.0, **kw):
    return {"steer_vector": name, "steer_scale": scale, **kw}


@pytest.fixture(scope="module")
def baseline_outputs(llm):
    return llm.generate(PROMPTS + [LONG_PROMPT], sp(logprobs=2))


@pytest.fixture(scope="module")
def baseline(baseline_outputs):
    return token_ids(baseline_outputs)


# ---------------------------------------------------------------- (a) identity
def test_unsteered_equals_stock_vllm(baseline, stock_outputs):
    # Across two engine instances vLLM's CPU kernels are not bitwise reproducible, so an
    # exact bf16 tie may break either way: identical up to the first tie, which for these
    # prompts is most of the output (a wrong steering add would show at step 0).
    assert assert_greedy_match(stock_outputs, baseline, min_coverage=0.6)


def test_no_keys_and_scale_zero_are_bit_identical(llm):
    a = llm.generate(PROMPTS, sp(logprobs=3))
    b = llm.generate(PROMPTS, sp(steer(scale=0.0), logprobs=3))
    assert token_ids(a) == token_ids(b)
    for oa, ob in zip(a, b):
        for la, lb in zip(oa.outputs[0].logprobs, ob.outputs[0].logprobs):
            assert {k: v.logprob for k, v in la.items()} == {k: v.logprob for k, v in lb.items()}


def test_steering_changes_output(llm, baseline):
    out = token_ids(llm.generate(PROMPTS, sp(steer())))
    changed = sum(o != b for o, b in zip(out, baseline))
    assert changed >= len(PROMPTS) - 1, "a strong random vector should change nearly every output"


# ---------------------------------------------------------------- (b) mixed batch
def test_mixed_batch_each_request_equals_its_own_run(llm, baseline):
    prompts = PROMPTS + [LONG_PROMPT]
    extras = [
        None,
        steer("rnd0"),
        None,
        steer("rnd1", 4.0, steer_layers=list(range(5, 25))),
        None,
        steer("rnd2", 5.0, steer_positions="generated"),
        steer("rnd1", 8.0, steer_positions="prompt"),
    ]
    mixed = token_ids(llm.generate(prompts, [sp(e) for e in extras]))
    steered = [i for i, e in enumerate(extras) if e is not None]
    for i, e in enumerate(extras):
        if e is None:  # same batch shape as the baseline (ignore_eos): bit-identical
            assert mixed[i] == baseline[i], f"unsteered request {i} changed in a mixed batch"
        else:
            assert mixed[i] != baseline[i], f"steered request {i} was not steered"
    # isolation: with every *other* request unsteered, each steered request is
    # bit-identical: no row sees another row's vector. Request 6 is the 4th distinct
    # configuration for 3 slots: in the mixed run it waited for a slot, so it ran beside a
    # different set of rows (vLLM's CPU kernels are not batch-invariant; its first greedy
    # step is a near tie), so it is checked only against its solo run below.
    for i in steered:
        if i == 6:
            continue
        alone = [e if j == i else None for j, e in enumerate(extras)]
        assert token_ids(llm.generate(prompts, [sp(e) for e in alone]))[i] == mixed[i], f"request {i}"
    # what each steered request computed is checked against the transformers reference,
    # request by request with near misses, in test_side_by_side_matches_transformers_hooks


def test_more_configs_than_slots_wait_and_stay_steered(llm, hf_model):
    """6 distinct configurations, 3 slots: half wait for a slot; each must run with its
    own configuration (the transformers reference, request by request, with near misses)."""
    from hf_reference import check_slot_waiting

    before = llm.collective_rpc("roast_info")[0]
    check_slot_waiting(llm, hf_model, 6)
    info = llm.collective_rpc("roast_info")[0]
    assert info["active_slots"] == 0 and info["max_slots"] == 3
    assert info["slot_reuses"] > before["slot_reuses"], "no slot was freed and reused: nothing waited"


def _dims(llm):
    return llm.roast_dims["num_layers"], llm.roast_dims["hidden_size"]


# ---------------------------------------------------------------- prefix caching
def test_prefix_cache_never_mixes_steered_and_unsteered_kv(llm):
    prompt_steer = steer("rnd0", 8.0, steer_positions="prompt")
    llm.reset_prefix_cache()
    long_base = token_ids(llm.generate([LONG_PROMPT], sp()))[0]
    llm.reset_prefix_cache()
    steered = token_ids(llm.generate([LONG_PROMPT], sp(prompt_steer)))[0]
    assert steered != long_base, "prompt-phase steering must change this output for the test to bite"
    # the cache now holds the steered prompt's blocks: an unsteered request must not get them
    assert token_ids(llm.generate([LONG_PROMPT], sp()))[0] == long_base
    # and the steered config still gets its own (consistent) result, cached or not
    assert token_ids(llm.generate([LONG_PROMPT], sp(prompt_steer)))[0] == steered


def test_prefix_cache_is_shared_by_identical_steering_only(llm):
    """Identical steering shares prefix-cache blocks (cached tokens > 0 on a prompt of
    several blocks); other steering, no steering and a re-registered version of the vector
    share none of them."""
    import roast_vllm

    block = llm.llm_engine.vllm_config.cache_config.block_size
    n_prompt = len(llm.get_tokenizer()(LONG_PROMPT).input_ids)
    assert n_prompt > 2 * block, "the prompt must span several KV blocks for the test to bite"
    L, H = _dims(llm)
    roast_vllm.register_vector(llm, "pc", SteeringVector.random(L, H, seed=40))
    cfg = steer("pc", 6.0, steer_positions="prompt")

    def cached(extra):
        o = llm.generate([LONG_PROMPT], sp(extra, max_tokens=4))[0]
        return o.num_cached_tokens, list(o.outputs[0].token_ids)

    llm.reset_prefix_cache()
    first, toks = cached(cfg)
    again, toks_again = cached(cfg)
    assert first == 0 and again >= 2 * block, (first, again)
    assert toks_again == toks
    assert cached(None)[0] == 0, "an unsteered request got steered KV"
    assert cached(None)[0] >= 2 * block, "unsteered requests share with each other"
    assert cached(steer("pc", 6.5, steer_positions="prompt"))[0] == 0, "another scale got this KV"
    assert cached(steer("pc", 6.0, steer_positions="prompt", steer_layers=list(range(1, 30))))[0] == 0
    roast_vllm.register_vector(llm, "pc", SteeringVector.random(L, H, seed=41))  # a new version
    assert cached(cfg)[0] == 0, "a re-registered vector's requests got the old version's KV"
    assert cached(cfg)[0] >= 2 * block
    roast_vllm.register_vector(llm, "pc", SteeringVector.random(L, H, seed=40))  # the first again
    assert cached(cfg) == (again, toks), "blocks are keyed by the vector's content"


# ---------------------------------------------------------------- (c) HF reference
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last_prompt_and_generated"])
def test_steered_output_matches_transformers_hooks(llm, hf_model, positions):
    """Per request: the reference of its own configuration, not of its near misses (layers
    shifted by one, scale 10% off) nor of the unsteered model (tests/hf_reference.py)."""
    from hf_reference import check_position_scope

    check_position_scope(llm, hf_model, positions)


def test_side_by_side_matches_transformers_hooks(llm, hf_model):
    """Distinct vectors (both sites), scales, layer sets and scopes in one batch with plain
    requests: each steered request is its own configuration's reference, not a neighbour's."""
    from hf_reference import check_side_by_side

    check_side_by_side(llm, hf_model)


def test_multi_vector_requests_match_the_sum(llm, hf_model):
    """``steer_vectors`` combinations (two residual vectors; residual + mlp_act) in one
    batch with single and plain requests: each is the transformers reference of the sum of
    its terms, not of a near miss (a term's scale 10% off, a term left out, layers shifted)."""
    from hf_reference import check_combination

    check_combination(llm, hf_model)


def test_fusion_matches_transformers_reference(llm, hf_model):
    """Fusion Steering per request (full-layer, per third, skip_first; the long prompt
    prefilled in chunks of 256 tokens, then decoded) beside additive and plain requests:
    each Fusion request is its cached transformers reference and none of its near misses;
    the other rows are bit for bit unchanged by the Fusion rows beside them."""
    from hf_reference import check_fusion

    check_fusion(llm, hf_model, LONG_PROMPT)


def test_fusion_references_and_search_in_the_engine(llm, hf_model):
    """References built in the engine (explanation generated, reference text captured over
    its answer positions) equal the transformers reference vectors of the same text; the
    search runs each round's trials (one per prompt) as one generate call and scores each
    by its own request's overlap and PPL (the engine's log-probs)."""
    import math

    from roast_vllm.methods import fusion as fu
    from roast_vllm.methods import fusion_search as fs

    rows = [
        ("a", "What is the capital of Australia?", "Canberra"),
        ("b", "Can pigs fly?", "No, pigs cannot fly"),
    ]
    refs = fu.build_references(llm, rows, explain_tokens=12, provenance={"test": True}, progress=False)
    assert refs.ids == ["a", "b"] and refs.vectors.shape == (2, 30, 576) and refs.provenance["test"]
    tok = llm.get_tokenizer()
    for i, (qid, q, gt) in enumerate(rows):
        want = fu.reference_vectors_hf(
            hf_model, tok, *fu.reference_text(q, gt, refs.provenance["explanations"][qid])
        )
        rel = (refs.vectors[i] - want).norm(dim=-1) / want.norm(dim=-1)
        assert float(rel.max()) <= 1e-3, (
            f"{qid}: reference differs from transformers by {float(rel.max()):.2e}"
        )
    refs.register(llm, "srch")
    items = {k: (q, gt) for k, q, gt in rows}
    evaluate = fs.engine_evaluator(llm, items, "srch", max_tokens=8)
    calls = []
    real = llm.generate

    def counting(prompts, params, **kw):
        calls.append(len(prompts))
        return real(prompts, params, **kw)

    llm.generate = counting
    try:
        best = fs.search(list(items), evaluate, n_trials=2, mode="segmented", seed=3, progress=False)
    finally:
        del llm.generate
    assert calls == [2, 2], f"each round must be one batch of every prompt's trial, got {calls}"
    for k in items:
        assert best[k]["trials"] == 2 and -0.3 <= best[k]["value"] <= 0.7 and math.isfinite(best[k]["value"])
    # PPL comes from the served model's own log-probs of its tokens (inf if they were missing)
    assert all(math.isfinite(r["ppl"]) and r["ppl"] >= 1.0 and r["text"] for r in evaluate.last)


# ---------------------------------------------------------------- (e) bad inputs
@pytest.mark.parametrize(
    "extra, match",
    [
        ({"steer_vector": "nope"}, "unknown steering vector 'nope'"),
        (steer(steer_layers=[30]), "out of range"),
        (steer(steer_layers=[999]), "out of range"),
        (steer(steer_positions="middle"), "not one of"),
        (steer(scale=math.inf), "finite"),
        (steer(scale=math.nan), "finite"),
        (steer(scale="loud"), "number"),
        ({"steer_scale": 2.0}, "without steer_vector"),
    ],
    ids=[
        "unknown-vector",
        "layer-30",
        "layer-999",
        "bad-positions",
        "inf-scale",
        "nan-scale",
        "text-scale",
        "no-vector",
    ],
)
def test_bad_request_fails_at_submission_and_engine_keeps_serving(llm, baseline_outputs, extra, match):
    with pytest.raises(Exception, match=match):
        llm.generate([PROMPTS[0]], sp(extra))
    # a batch where one request is bad is rejected whole, before anything runs
    with pytest.raises(Exception, match=match):
        llm.generate(PROMPTS[:2], [sp(), sp(extra)])
    assert_greedy_match(baseline_outputs[:2], token_ids(llm.generate(PROMPTS[:2], sp())))


def test_bad_vectors_fail_at_registration_and_engine_keeps_serving(llm, baseline_outputs, tmp_path):
    import roast_vllm

    L, H = llm.roast_dims["num_layers"], llm.roast_dims["hidden_size"]
    with pytest.raises(SteeringVectorError, match="size 64"):
        roast_vllm.register_vector(llm, "small", SteeringVector.random(L, 64))
    with pytest.raises(SteeringVectorError, match="non-finite"):
        roast_vllm.register_vector(llm, "nan", SteeringVector(directions={0: torch.full((H,), math.nan)}))
    with pytest.raises(SteeringVectorError, match="30 layers"):
        roast_vllm.register_vector(llm, "deep", SteeringVector.random(40, H, layers=[35]))
    good = SteeringVector.random(L, H).save(tmp_path / "v.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[:-100])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for bad in ("trunc", "junk", "missing"):
        with pytest.raises(SteeringVectorError):
            roast_vllm.register_vector(llm, bad, tmp_path / f"{bad}.safetensors")
    assert_greedy_match(baseline_outputs[: len(PROMPTS)], token_ids(llm.generate(PROMPTS, sp())))
    assert token_ids(llm.generate(PROMPTS[:1], sp(steer())))[0] != token_ids(baseline_outputs)[0]
