"""Fusion Steering's transformers reference (no engine): coefficients, prompts, metrics,
reference vectors, and the cached / uncached semantics the engine will be held to."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TORCH_DTYPE

from roast_vllm.methods import fusion as fu
from roast_vllm.methods.hf import greedy_reference

#: |log-prob| differences between computations that are the same math in another order
LP_TOL = 1e-4 if TORCH_DTYPE == torch.float32 else 0.05
QUESTION, TRUTH = "What is the capital of Australia?", "Canberra is the capital of Australia."


def test_coefficients_full_and_segmented():
    assert fu.coefficients(0.5, 0.25, 6) == [0.125] * 6
    c = fu.coefficients([1.0, 0.5, 0.25], [0.5, 0.5, 0.5], 30)  # thirds of 30: 0-9 | 10-19 | 20-29
    assert c == [0.5] * 10 + [0.25] * 10 + [0.125] * 10
    assert fu.coefficients([1.0, 0.5, 0.25], 2.0, 4) == [2.0, 2.0, 1.0, 0.5]  # 4 layers: 0-1 | 2 | 3
    with pytest.raises(ValueError, match="3 numbers"):
        fu.coefficients([1.0, 2.0], 1.0, 30)
    with pytest.raises(ValueError, match="finite"):
        fu.coefficients(float("nan"), 1.0, 30)


def test_prompts_overlap_and_objective():
    assert fu.explanation_prompt("Q?", "A.") == "Question: Q?\nAnswer: A.\nExplanation:"
    assert fu.extract_explanation(" Explanation: because so. ") == "because so."
    assert fu.extract_explanation("no marker here") == "no marker here"
    prefix, answer = fu.reference_text("Q?", "A.", "because so.")
    assert prefix + answer == "Question: Q?\nAnswer and explanation:\nA.\nbecause so."
    assert fu.generation_prompt("Q?") == "Question: Q?\nAnswer and explanation:"
    # lower-cased words, punctuation removed; a fraction of the ground truth's words
    assert fu.overlap("The capital is CANBERRA, not Sydney.", "Canberra.") == 1.0
    assert fu.overlap("It is in the U.S.", "U.S. citizens") == 0.5
    assert fu.overlap("anything", "...") == 0.0
    assert fu.objective(1.0, 10.0) == pytest.approx(0.7 - 0.03)
    assert fu.objective(0.5, 500.0) == pytest.approx(0.35 - 0.3)
    assert fu.objective(0.5, float("inf")) == pytest.approx(0.05)
    assert fu.perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert fu.perplexity([]) == float("inf")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def refs(hf_model, tok):
    prefix, answer = fu.reference_text(QUESTION, TRUTH, "Canberra was chosen as a compromise between Sydney.")
    return fu.reference_vectors_hf(hf_model, tok, prefix, answer)


def test_reference_vectors_average_the_answer_positions(hf_model, tok, refs):
    """``r_l`` is layer ``l``'s residual output averaged over the answer's positions: the
    same numbers from HF's ``output_hidden_states`` (whose last entry is after the final
    norm, so the last layer is left out)."""
    prefix, answer = fu.reference_text(QUESTION, TRUTH, "Canberra was chosen as a compromise between Sydney.")
    n = len(tok(prefix).input_ids)
    hs = hf_model(
        tok(prefix + answer, return_tensors="pt").input_ids, output_hidden_states=True
    ).hidden_states
    L = len(hs) - 1
    assert refs.shape == (L, hf_model.config.hidden_size) and refs.dtype == torch.float32
    want = torch.stack([hs[l + 1][0, n:].float().mean(0) for l in range(L - 1)])
    torch.testing.assert_close(refs[:-1], want, atol=1e-4, rtol=1e-4)
    # the prefix's positions are not in the mean
    assert not torch.allclose(refs[:-1], torch.stack([hs[l + 1][0].float().mean(0) for l in range(L - 1)]))


def _prompt(tok):
    return tok(fu.generation_prompt(QUESTION)).input_ids


def test_zero_coefficients_are_the_plain_model(hf_model, tok, refs):
    ids = _prompt(tok)
    plain, plain_lp = greedy_reference(hf_model, ids, 6)
    zero = [0.0] * refs.shape[0]
    for semantics in fu.SEMANTICS:
        got, lp = fu.fusion_greedy_hf(hf_model, ids, refs, zero, 6, semantics)
        assert got == plain, semantics
        assert float((lp - plain_lp).abs().max()) <= LP_TOL, semantics


@pytest.mark.parametrize("skip_first", [False, True], ids=["all-positions", "skip-first"])
def test_cached_running_mean_does_not_depend_on_prefill_chunks(hf_model, tok, refs, skip_first):
    """The cached semantics is per position: the prompt in one call, in chunks of 3 or
    token by token gives the same log-probs (what the engine must give across prefill
    chunks and decode steps)."""
    ids = _prompt(tok)
    c = fu.coefficients([0.3, 0.5, 0.8], 0.5, refs.shape[0])
    whole, lp_whole = fu.fusion_greedy_hf(hf_model, ids, refs, c, 6, "cached", skip_first=skip_first)
    for chunk in (3, 1):
        got, lp = fu.fusion_greedy_hf(
            hf_model, ids, refs, c, 6, "cached", prefill_chunk=chunk, skip_first=skip_first
        )
        assert got == whole, chunk
        assert float((lp - lp_whole).abs().max()) <= LP_TOL, chunk


def test_skip_first_leaves_position_zero_alone(hf_model, tok, refs):
    """``skip_first``: a one-token prompt (position 0 only) is not steered at all; on a
    real prompt both semantics steer, and differently from the all-positions mean."""
    c = fu.coefficients(0.6, 0.6, refs.shape[0])
    one = _prompt(tok)[:1]
    _, plain = greedy_reference(hf_model, one, 1)
    for semantics in fu.SEMANTICS:
        _, lp = fu.fusion_greedy_hf(hf_model, one, refs, c, 1, semantics, skip_first=True)
        assert float((lp - plain).abs().max()) <= LP_TOL, semantics
    ids = _prompt(tok)
    _, with_first = fu.fusion_greedy_hf(hf_model, ids, refs, c, 1, "cached")
    _, skip = fu.fusion_greedy_hf(hf_model, ids, refs, c, 1, "cached", skip_first=True)
    _, plain = greedy_reference(hf_model, ids, 1)
    assert float((skip - with_first).abs().max()) > 100 * LP_TOL
    assert float((skip - plain).abs().max()) > 100 * LP_TOL


def test_cached_and_uncached_semantics_differ_but_agree_on_one_token(hf_model, tok, refs):
    """On a one-token sequence the running mean is the full mean: both semantics give the
    same first step. On a real prompt they differ (every position's delta uses the mean
    up to it vs the whole sequence's), and both move the model."""
    c = fu.coefficients(0.6, 0.6, refs.shape[0])
    one = _prompt(tok)[:1]
    _, a = fu.fusion_greedy_hf(hf_model, one, refs, c, 1, "cached")
    _, b = fu.fusion_greedy_hf(hf_model, one, refs, c, 1, "uncached")
    assert float((a - b).abs().max()) <= LP_TOL
    ids = _prompt(tok)
    _, plain = greedy_reference(hf_model, ids, 1)
    _, cached = fu.fusion_greedy_hf(hf_model, ids, refs, c, 1, "cached")
    _, uncached = fu.fusion_greedy_hf(hf_model, ids, refs, c, 1, "uncached")
    assert float((cached - uncached).abs().max()) > 100 * LP_TOL
    assert float((cached - plain).abs().max()) > 100 * LP_TOL
    assert float((uncached - plain).abs().max()) > 100 * LP_TOL


def test_hooks_check_their_inputs(hf_model, refs):
    with pytest.raises(ValueError, match="semantics"):
        with fu.fusion_hooks(hf_model, refs, [0.0] * refs.shape[0], "lazy"):
            pass
    with pytest.raises(ValueError, match="need L"):
        with fu.fusion_hooks(hf_model, refs[:3], [0.0] * 3):
            pass


def test_reference_set_file_round_trip_and_bad_files(tmp_path):
    """One safetensors file per run: exact round trip (vectors, ids, provenance), each
    question as a Fusion vector; malformed sets and foreign files refused with the reason."""
    v = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    prov = {"model": "m", "data_sha256": "ab" * 32, "seed": 0, "prompts": {"explain": "..."}}
    prov["explanations"] = {"q0": "e0", "q1": "e1", "q7": "e7"}
    refs = fu.ReferenceSet(["q0", "q1", "q7"], v, prov)
    back = fu.ReferenceSet.load(refs.save(tmp_path / "refs.safetensors"))
    assert back.ids == refs.ids and torch.equal(back.vectors, v) and back.provenance == prov
    sv = back.vector("q7")
    assert sv.method == "fusion" and sorted(sv.directions) == [0, 1, 2, 3]
    assert torch.equal(sv.directions[2], v[2, 2]) and sv.provenance["question"] == "q7"
    # each question's vector carries its own explanation, not every question's
    assert sv.provenance["explanation"] == "e7" and "explanations" not in sv.provenance["reference_set"]
    assert sv.provenance["reference_set"]["data_sha256"] == prov["data_sha256"]
    with pytest.raises(ValueError, match="2 question ids for 3"):
        fu.ReferenceSet(["a", "b"], v)
    with pytest.raises(ValueError, match="unique"):
        fu.ReferenceSet(["a", "a", "b"], v)
    with pytest.raises(ValueError, match="nan or inf"):
        fu.ReferenceSet(["a", "b", "c"], v.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=r"\[questions, layers, hidden\]"):
        fu.ReferenceSet(["a"], v[0])
    from roast_vllm import SteeringVector

    other = SteeringVector(directions={0: torch.ones(8)}).save(tmp_path / "vec.safetensors")
    with pytest.raises(ValueError, match="not a Fusion reference file"):
        fu.ReferenceSet.load(other)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="unreadable"):
        fu.ReferenceSet.load(tmp_path / "junk.safetensors")
