"""Activation capture and ``mlp_act`` steering in vLLM vs a transformers forward-hook
reference (SmolLM2, bf16, eager engine; one engine for the module).

``max_num_batched_tokens`` is small so long sequences are prefilled in chunks and their
last token lands in a later step than their first.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ENGINE_DEFAULTS, TORCH_DTYPE, shutdown

from roast_vllm import SteeringVector
from roast_vllm.engine.spec import SteerSpec

pytestmark = pytest.mark.engine

ENGINE = dict(ENGINE_DEFAULTS, enforce_eager=True, max_num_batched_tokens=256, max_num_seqs=16)
LAYERS = [0, 7, 15, 22, 29]

# vLLM's CPU kernels and HF's eager math round differently (bf16: a lot; fp32: summation
# order only); the per-sequence activation vectors must point the same way and agree in size.
BF16 = TORCH_DTYPE == torch.bfloat16
MIN_COS = 0.998 if BF16 else 0.99999
MAX_REL = 0.05 if BF16 else 2e-3
# the same engine at two batch shapes (its CPU kernels are not batch-invariant)
MAX_REL_BATCH = 2e-2 if BF16 else 1e-4


@pytest.fixture(scope="module")
def llm(model_dir):
    import roast_vllm

    engine = roast_vllm.LLM(model_dir, **ENGINE)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def seqs(llm):
    """q ⊕ r texts as a ROAST run makes them: shared question prefixes (prefix caching),
    a long one (chunked prefill), a one-token one."""
    from roast_vllm.runtime.jobs import prompt_ids, response_ids
    from roast_vllm.tasks import Question

    tok = llm.get_tokenizer()
    q = Question("q", "Is the Earth flat?", [{"role": "user", "content": "Is the Earth flat?"}], "", "", [])
    out = [prompt_ids(tok, q) + response_ids(tok, r) for r in ("No, it is round.", "Yes, it is flat.", "No.")]
    out.append(tok("The history of astronomy " * 40).input_ids)  # > 256 tokens: 2+ chunks
    out.append(tok("Hi").input_ids[:1])
    return out


def _assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    # [layers, N, dim]
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(cos.min()) >= MIN_COS, cos
    assert float(rel.max()) <= MAX_REL, rel


def test_capture_matches_transformers_hooks(llm, hf_model, seqs):
    from roast_vllm.engine.capture import capture_activations
    from roast_vllm.methods.hf import capture_last_token

    got = capture_activations(llm, seqs, LAYERS, batch_size=3, progress=False)
    ref = capture_last_token(hf_model, seqs, LAYERS)
    assert got["residual"].shape == (len(LAYERS), len(seqs), 576)
    assert got["mlp_act"].shape == (len(LAYERS), len(seqs), 1536)
    _assert_close(got["residual"], ref["residual"])
    _assert_close(got["mlp_act"], ref["mlp_act"])
    # the two sites are different activations, and different sequences differ
    assert not torch.allclose(got["residual"][:, 0], got["residual"][:, 1])


def test_mean_capture_matches_transformers_hooks(llm, hf_model, seqs):
    """Fusion Steering's reference vectors: the residual stream after every layer averaged
    over positions ``start ..``, in the engine (the long sequence's span crosses a prefill
    chunk boundary; the one-token one is its own mean) vs transformers hooks, with every
    block already in the prefix cache; and a reference text as METHODS.md builds it. A
    last-token capture is not such a mean."""
    from roast_vllm.methods.fusion import (
        mean_residual_hf,
        reference_text,
        reference_tokens,
        reference_vectors,
    )

    tok = llm.get_tokenizer()
    ids, start = reference_tokens(tok, *reference_text("Is the Earth flat?", "No", "No, it is round."))
    seq = [*seqs, ids]
    starts = [len(seqs[0]) - 4, 3, len(seqs[2]) - 1, 100, 0, start]
    # first a last-token capture of the same sequences: their blocks are in the prefix
    # cache now, and a mean capture must not read them (it would miss those positions)
    last = capture_last(llm, seq)
    got = reference_vectors(llm, seq, starts, batch_size=4, progress=False)
    assert got.shape == (len(seq), 30, 576)
    ref = torch.stack([mean_residual_hf(hf_model, list(t), s) for t, s in zip(seq, starts)])
    _assert_close(got.transpose(0, 1), ref.transpose(0, 1))
    assert not torch.allclose(got[3], last[3], rtol=0.05), "a mean over 100+ positions is not the last token"
    # one token: its own mean (two runs at different batch shapes: batch tolerance)
    assert float(((got[4] - last[4]).norm(dim=-1) / last[4].norm(dim=-1)).max()) <= MAX_REL_BATCH
    with pytest.raises(ValueError, match="starts has 2 entries"):
        reference_vectors(llm, seq, [0, 0], progress=False)
    with pytest.raises(ValueError, match="not positions of their sequence"):
        reference_vectors(llm, seq[:1], [len(seq[0])], progress=False)


def test_response_mean_capture_of_texts_matches_transformers_hooks(llm, hf_model):
    """A worker's ``capture_texts(..., pooling="response_mean")`` (ROAST's token-mean
    variant): the residual averaged over the response's tokens of ``prompt(q) ⊕ r``, vs
    transformers hooks; an empty response is its prompt's last token. Near miss: the
    mean from one position earlier (the prompt's last token included) is further off."""
    from roast_vllm.methods.fusion import mean_residual_hf
    from roast_vllm.runtime.jobs import prompt_ids, response_ids
    from roast_vllm.runtime.pool import EngineWorker
    from roast_vllm.tasks import Question

    w = EngineWorker.around(llm)
    q = Question("q", "Name a planet.", [{"role": "user", "content": "Name a planet."}], "", "", [])
    items = [(q, "Mars is the fourth planet from the Sun."), (q, "Venus."), (q, "")]
    got = w.capture_texts(items, list(range(30)), ["residual"], "response_mean")["residual"]
    p = prompt_ids(w.tok, q)
    seqs = [p + response_ids(w.tok, r) for _, r in items]
    starts = [len(p), len(p), len(p) - 1]
    ref = torch.stack([mean_residual_hf(hf_model, s, st) for s, st in zip(seqs, starts)]).transpose(0, 1)
    _assert_close(got, ref)
    early = mean_residual_hf(hf_model, seqs[0], len(p) - 1)  # [30, dim]
    err = lambda x: float(((got[:, 0] - x).norm(dim=-1) / x.norm(dim=-1)).max())  # noqa: E731
    assert err(early) > max(3 * err(ref[:, 0]), MAX_REL)
    with pytest.raises(ValueError, match="pooling='first'"):
        w.capture_texts(items, [0], ["residual"], "first")


def capture_last(llm, seq):
    from roast_vllm.engine.capture import capture_activations

    return capture_activations(llm, seq, list(range(30)), ("residual",), progress=False)[
        "residual"
    ].transpose(0, 1)


def test_capture_is_per_request_in_a_mixed_batch(llm, seqs):
    """Capture requests next to ordinary (and steered) generation: each capture gets its
    own sequence's activations, the generation is unaffected."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from roast_vllm.engine.capture import capture_activations

    solo = capture_activations(llm, seqs[:1], LAYERS, sites=["residual"], progress=False)["residual"]
    prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
    params = [
        SamplingParams(max_tokens=1, extra_args={"roast_capture": f"mix-{i}"}) for i in range(len(seqs))
    ]
    gen = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    before = llm.generate(["Once upon a time"], gen)[0].outputs[0].token_ids
    outs = llm.generate(prompts + ["Once upon a time"], params + [gen])
    assert outs[-1].outputs[0].token_ids == before
    import safetensors.torch

    caps = safetensors.torch.load(
        llm.collective_rpc("roast_pop_captures", args=([f"mix-{i}" for i in range(5)],))[0]
    )
    assert sorted({k.split("/")[0] for k in caps}) == [f"mix-{i}" for i in range(5)]
    got, want = caps["mix-0/residual"], solo[:, 0]  # [layers, H]
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(rel.max()) <= MAX_REL_BATCH, rel
    # not some other sequence's activations (the near miss: a row mix-up; sequence 3 ends in
    # another token than sequence 0, so even layer 0 differs)
    other = (caps["mix-3/residual"] - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(other.min()) > 100 * MAX_REL_BATCH, other


def test_capture_rejects_bad_input_and_engine_survives(llm, seqs):
    from roast_vllm.engine.capture import capture_activations

    with pytest.raises(ValueError, match="empty"):
        capture_activations(llm, [seqs[0], []], LAYERS, progress=False)
    with pytest.raises(ValueError, match="sites"):
        capture_activations(llm, seqs[:1], LAYERS, sites=["attn"], progress=False)
    with pytest.raises(Exception, match="out of range"):
        capture_activations(llm, seqs[:1], [30], progress=False)
    out = capture_activations(llm, seqs[:1], [3], progress=False)
    assert out["residual"].shape == (1, 1, 576)


@pytest.mark.parametrize("positions", ["all", "last_prompt_and_generated"])
def test_mlp_act_steering_matches_transformers_hooks(llm, hf_model, positions):
    """Per request: the reference of its own configuration, not of its near misses."""
    from hf_reference import check_mlp_act

    check_mlp_act(llm, hf_model, positions)


def test_steer_start_scores_a_continuation_like_generation(llm, hf_model):
    """``jobs.loglik`` (prompt logprobs, steering from the context's last token) equals
    HF's teacher-forced log-likelihood under the same hook."""
    from roast_vllm.methods.hf import teacher_forced_logprobs
    from roast_vllm.runtime import jobs
    from roast_vllm.tasks import Question

    vec = SteeringVector.random(30, 576, layers=list(range(5, 25)), seed=1)
    import roast_vllm

    roast_vllm.register_vector(llm, "res1", vec)
    w = SimpleNamespace(llm=llm, tok=llm.get_tokenizer())
    q = Question("q", "What colour is the sky?", [], "", "", [])
    answers = ["The sky is blue.", "The sky is green."]
    steer = {"steer_vector": "res1", "steer_scale": 16.0, "steer_positions": "last_prompt_and_generated"}
    got = jobs.loglik(w, [(q, answers)], steer)[0]
    plain = jobs.loglik(w, [(q, answers)])[0]
    ctx = jobs.prompt_ids(
        w.tok, Question("q", q.question, [{"role": "user", "content": q.question}], "", "", [])
    )
    spec = SteerSpec("res1", 16.0, None, "last_prompt_and_generated")
    for a, g, p in zip(answers, got, plain):
        ids = jobs.response_ids(w.tok, a)
        ref = teacher_forced_logprobs(hf_model, ctx, ids, vec, spec)[
            torch.arange(len(ids)), torch.tensor(ids)
        ]
        assert abs(float(ref.sum()) - g) <= 0.25 * len(ids) ** 0.5, (float(ref.sum()), g)
        assert abs(g - p) > 0.5  # steering changed the score


def test_sample_job_steered_and_unverified(llm, tmp_path):
    """The rollout job on plain prompts: seeded samples are reproducible, steering applies,
    and ``correct`` is None for a task without a verifier."""
    import roast_vllm
    from roast_vllm.runtime import jobs
    from roast_vllm.tasks import get_task

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "Tell me about the sea."}\n{"prompt": "Describe a city at night."}\n')
    qs = get_task("prompts").load(p)
    roast_vllm.register_vector(llm, "res9", SteeringVector.random(30, 576, layers=list(range(4, 26)), seed=9))
    w = SimpleNamespace(llm=llm, tok=llm.get_tokenizer())
    a = jobs.sample(w, "prompts", qs, 2, 0.8, 0.9, 12, 7)
    b = jobs.sample(w, "prompts", qs, 2, 0.8, 0.9, 12, 7)
    s = jobs.sample(w, "prompts", qs, 2, 0.8, 0.9, 12, 7, {"steer_vector": "res9", "steer_scale": 8.0})
    assert [r["response"] for r in a] == [r["response"] for r in b]  # per-sample seeds
    assert a[0]["response"] != a[1]["response"]  # distinct samples of one prompt
    assert sum(x["response"] != y["response"] for x, y in zip(a, s)) >= 3
    assert all(
        r["correct"] is None and (r["completion_tokens"] == 12 or r["finish_reason"] == "stop") for r in s
    )
