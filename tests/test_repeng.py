"""repeng's ``ControlVector`` in and out (``SteeringVector.from_repeng`` / ``to_repeng``), with
repeng itself as the client: exact round trips in memory and through each side's GGUF
writer and reader, repeng's ``ControlModel`` forward equal to ours on the same vector, and
a vector trained with repeng on the default model steering our engine as repeng's own
transformers path does (same greedy tokens up to the first near tie).

repeng 0.4.0 pins ``numpy<2`` while vLLM needs NumPy 2, so it is installed with ``pip install
--no-deps repeng`` (``make setup``); ``roast_vllm.vector._import_repeng`` puts back the
``np.float_`` alias its type hints name at import. Under transformers 5 decoder layers return
a tensor, not a tuple; repeng's ``ControlModule`` handles both, no workaround is needed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import ENGINE_DEFAULTS, TIE_NATS, TORCH_DTYPE, shutdown

from roast_vllm import SteeringVector, SteeringVectorError
from roast_vllm.vector import _import_repeng

try:
    repeng = _import_repeng()
except ImportError as e:  # only a missing repeng skips; a broken one fails
    pytest.skip(str(e), allow_module_level=True)

L, H = 30, 576  # SmolLM2-135M-Instruct


def _vec(**kw) -> SteeringVector:
    return SteeringVector.random(L, H, layers=[1, 7, 15, 29], seed=3, model_id="m", **kw)


def _bit_equal(a: np.ndarray, b) -> bool:
    b = np.asarray(b)
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------- round trips
def test_steering_vector_round_trips_through_repeng_exactly():
    v = _vec(provenance={"seed": 3, "note": "x"})
    cv = v.to_repeng()
    assert type(cv) is repeng.ControlVector and cv.model_type == "llama"
    assert sorted(cv.directions) == v.layers
    for l, t in v.directions.items():
        assert _bit_equal(cv.directions[l], t.numpy())
        assert not np.shares_memory(cv.directions[l], t.numpy())  # a copy: repeng owns it
    assert SteeringVector.from_repeng(cv) == v  # metadata included
    assert v.to_repeng(model_type="mistral").model_type == "mistral"


def test_control_vector_round_trips_through_steering_vector_exactly():
    rng = np.random.default_rng(0)
    cv = repeng.ControlVector(
        model_type="mistral", directions={l: rng.standard_normal(H).astype(np.float32) for l in range(3, 9)}
    )
    v = SteeringVector.from_repeng(cv)
    assert v.layers == list(range(3, 9)) and v.site == "residual" and v.method == "repeng"
    assert v.model_id == "mistral"  # as load_gguf does with a repeng file's model_hint
    back = v.to_repeng()
    assert back == cv and back.model_type == "mistral"
    assert all(_bit_equal(back.directions[l], d) for l, d in cv.directions.items())
    # what repeng's own arithmetic makes (new objects) is foreign: repeng metadata, exact values
    w = SteeringVector.from_repeng(v.to_repeng() * 2.0)
    assert w.method == "repeng" and torch.equal(w.directions[3], 2.0 * v.directions[3])
    # and an in-place edit does not keep stale metadata of the original
    mine = _vec().to_repeng()
    mine.directions[7] = mine.directions[7] * 3
    assert SteeringVector.from_repeng(mine).method == "repeng"


def test_from_repeng_picks_control_model_layer_ids_and_refuses_what_does_not_fit():
    cv = _vec().to_repeng()
    v = SteeringVector.from_repeng(cv, [-1, -15, 7], num_layers=L)
    assert v.layers == [7, 15, 29] and v.num_layers == L
    assert torch.equal(v.directions[29], _vec().directions[29])
    with pytest.raises(SteeringVectorError, match="num_layers"):
        SteeringVector.from_repeng(cv, [-1])
    with pytest.raises(SteeringVectorError, match="no direction for layer 2"):
        SteeringVector.from_repeng(cv, [2])
    with pytest.raises(SteeringVectorError, match="not a repeng ControlVector"):
        SteeringVector.from_repeng({1: np.zeros(H)})
    with pytest.raises(SteeringVectorError, match="residual"):
        SteeringVector.random(L, 1536, layers=[4], site="mlp_act").to_repeng()


def test_repeng_export_gguf_reads_back_equal(tmp_path):
    cv = _vec().to_repeng(model_type="qwen2")
    cv = repeng.ControlVector(model_type=cv.model_type, directions=cv.directions)  # repeng's own
    cv.export_gguf(str(tmp_path / "r.gguf"))
    v = SteeringVector.load_gguf(tmp_path / "r.gguf")
    assert v.model_id == "qwen2" and v.layers == sorted(cv.directions)
    assert all(_bit_equal(d, v.directions[l].numpy()) for l, d in cv.directions.items())
    assert v.to_repeng() == cv
    assert repeng.ControlVector.import_gguf(str(tmp_path / "r.gguf")) == cv


def test_our_gguf_reads_back_equal_in_repeng(tmp_path):
    v = _vec()
    path = v.save_gguf(tmp_path / "ours.gguf", model_hint="llama")
    cv = repeng.ControlVector.import_gguf(str(path))
    assert cv.model_type == "llama" and cv == v.to_repeng()
    assert all(_bit_equal(np.asarray(cv.directions[l]), t.numpy()) for l, t in v.directions.items())
    w = SteeringVector.from_repeng(cv)  # repeng's reader keeps no metadata of ours
    assert w.model_id == "llama" and w.method == "repeng" and w.layers == v.layers
    assert all(torch.equal(w.directions[l], t) for l, t in v.directions.items())
    assert SteeringVector.load_gguf(path) == v  # our own metadata rides in the file


# ------------------------------------------------------- same forward as repeng's ControlModel
@pytest.fixture(scope="module")
def hf(model_dir):
    """A transformers model of our own (repeng's ControlModel mutates the model it wraps,
    so the session's shared hf_model is not used) and its tokenizer."""
    from roast_vllm.methods.hf import load_hf

    return load_hf(model_dir, dtype=TORCH_DTYPE)


@torch.no_grad()
def test_control_model_forward_equals_our_reference_hook(hf):
    """On the same vector and coefficient, repeng's ControlModel and this project's
    forward-hook reference (``methods.hf.steering_hooks``, which the engine tests hold the
    engine to) give the same logits; the layers shifted by one (a numbering off by one)
    do not."""
    from roast_vllm.engine.spec import SteerSpec
    from roast_vllm.methods.hf import steering_hooks

    model, tok = hf
    layer_ids = [-3, -10, 8]
    cv = SteeringVector.random(L, H, seed=5).to_repeng()
    ids = tok("Tell me about your weekend.", return_tensors="pt").input_ids
    cm = repeng.ControlModel(model, layer_ids)
    try:
        cm.set_control(cv, 6.0)
        theirs = cm(ids).logits[0]
        cm.reset()
        plain = cm(ids).logits[0]
    finally:
        cm.unwrap()

    def ours(v):
        with steering_hooks(model, v, SteerSpec("v", 6.0), ids.shape[1]):
            return model(ids).logits[0]

    v = SteeringVector.from_repeng(cv, layer_ids, num_layers=L)
    assert v.layers == [8, 20, 27]
    err = float((ours(v) - theirs).abs().max())
    print(f"ControlModel vs our hook: max |logit difference| {err:.2e}")
    assert err <= 1e-4, err
    for d in (+1, -1):
        shifted = SteeringVector({l + d: t for l, t in v.directions.items()}, num_layers=L)
        assert float((ours(shifted) - theirs).abs().max()) > 100 * max(err, 1e-5)
    assert float((plain - theirs).abs().max()) > 0.1


# ------------------------------------------------ trained with repeng, run on our engine
PERSONAS = [("happy", "sad")]
#: suffixes: the first 1..SUFFIX_TOKENS tokens of each line of data/happy.txt and sad.txt
SUFFIX_TOKENS = 4
#: ControlModel's layers (repeng's README uses range(-5, -18, -1) on a 32-layer model)
LAYER_IDS = list(range(-5, -18, -1))
#: (prompt, coefficient): happy and sad on each prompt
PROMPT_TEXTS = ["How do you feel about your life?", "Tell me about your weekend."]
COEFFS = [6.0, -6.0]
MAX_TOKENS = 32
ENGINE = dict(ENGINE_DEFAULTS, enforce_eager=True, max_num_seqs=8)


def _chat(tok, user: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def persona_dataset(tok) -> list:
    """repeng's classic experiment: "Act as if you're extremely {persona}." in the user
    turn, the same assistant-turn suffix for both sides (every token prefix of a line of
    happy.txt and sad.txt up to SUFFIX_TOKENS tokens)."""
    from importlib.resources import files

    lines = []
    for name in ("happy.txt", "sad.txt"):
        lines += files("roast_vllm").joinpath("data", name).read_text().split("\n")
    suffixes = []
    for line in filter(None, lines):
        ids = tok(line).input_ids
        suffixes += [tok.decode(ids[:k]) for k in range(1, min(len(ids), SUFFIX_TOKENS) + 1)]
    return [
        repeng.DatasetEntry(
            positive=_chat(tok, f"Act as if you're extremely {p}.") + s,
            negative=_chat(tok, f"Act as if you're extremely {n}.") + s,
        )
        for s in suffixes
        for p, n in PERSONAS
    ]


@pytest.fixture(scope="module")
def repeng_run(hf):
    """Train with repeng on the default model, then greedy generation through repeng's
    ControlModel (transformers ``generate`` with a KV cache): per prompt unsteered, then at
    each coefficient. Returns the vector, prompt ids and ``{(prompt, coeff): (ids, margins)}``
    (margins: top-1 minus top-2 log-prob per step)."""
    model, tok = hf
    cm = repeng.ControlModel(model, LAYER_IDS)
    try:
        t0 = time.perf_counter()
        dataset = persona_dataset(tok)
        cv = repeng.ControlVector.train(cm, tok, dataset)
        print(f"repeng trained on {len(dataset)} pairs in {time.perf_counter() - t0:.1f} s")
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in PROMPT_TEXTS
        ]
        prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
        runs = {}
        for i, ids in enumerate(prompts):
            for c in [0.0, *COEFFS]:
                cm.reset()
                if c:
                    cm.set_control(cv, c)
                with torch.no_grad():
                    out = cm.generate(
                        input_ids=torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=MAX_TOKENS,
                        do_sample=False,
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
                gen = out.sequences[0, len(ids) :].tolist()
                top2 = torch.stack([torch.log_softmax(x[0].float(), -1).topk(2).values for x in out.logits])
                runs[i, c] = (gen, (top2[:, 0] - top2[:, 1]).tolist())
                print(f"repeng prompt {i} coeff {c:+}: {tok.decode(gen)!r}")
    finally:
        cm.reset()
        cm.unwrap()
    return cv, prompts, runs


def _first_tie(margins: list[float]) -> int:
    return next((k for k, m in enumerate(margins) if m <= TIE_NATS), len(margins))


@pytest.mark.engine
def test_repeng_trained_vector_steers_our_engine_as_repeng_does(model_dir, repeng_run):
    from vllm import SamplingParams

    import roast_vllm

    cv, prompts, runs = repeng_run
    # the coefficients visibly change repeng's own output
    for i in range(len(prompts)):
        for c in COEFFS:
            assert runs[i, c][0] != runs[i, 0.0][0], f"repeng coeff {c} does not change prompt {i}"
    vec = SteeringVector.from_repeng(cv, LAYER_IDS, num_layers=L, model_id=model_dir)
    assert vec.layers == sorted(L + i for i in LAYER_IDS)

    llm = roast_vllm.LLM(model_dir, **ENGINE)
    try:
        roast_vllm.register_vector(llm, "repeng_happy", vec)
        jobs = [(i, c) for i in range(len(prompts)) for c in [0.0, *COEFFS]]
        params = [
            SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_args={"steer_vector": "repeng_happy", "steer_scale": c} if c else None,
            )
            for _, c in jobs
        ]
        outs = llm.generate([{"prompt_token_ids": prompts[i]} for i, _ in jobs], params, use_tqdm=False)
        tok = llm.get_tokenizer()
    finally:
        shutdown(llm)
    got = {job: list(o.outputs[0].token_ids) for job, o in zip(jobs, outs)}
    compared = total = steered_before_tie = 0
    for job in jobs:
        ref, margins = runs[job]
        stop = _first_tie(margins)
        print(f"engine prompt {job[0]} coeff {job[1]:+}: {tok.decode(got[job])!r} (tie at {stop}/{len(ref)})")
        assert got[job][:stop] == ref[:stop], (
            f"prompt {job[0]} coeff {job[1]}: differs before repeng's first tie ({stop})"
        )
        if stop == len(ref):  # no tie: the same length too (both stop at EOS or MAX_TOKENS)
            assert got[job] == ref
        compared += stop
        total += len(ref)
        if job[1]:
            assert got[job] != got[job[0], 0.0], f"engine: coeff {job[1]} does not change prompt {job[0]}"
            plain = runs[job[0], 0.0][0]
            diverge = next(
                (k for k, (a, b) in enumerate(zip(ref, plain)) if a != b), min(len(ref), len(plain))
            )
            steered_before_tie += diverge < stop
    assert compared >= 0.5 * total, f"only {compared}/{total} tokens before a near tie"
    # the comparison bites: steering shows before the first tie (an unsteered engine fails)
    assert steered_before_tie >= len(prompts) * len(COEFFS) - 1, steered_before_tie
