"""Engine outputs against the transformers forward-hook reference (``roast_vllm.methods.hf``), each
with its **near misses**: shared by the eager and the compiled engine's tests.

For one request the engine's greedy tokens are teacher-forced through HF with the
request's own steering, and the per-token log-probs vLLM reported for them are compared
with HF's. The same is done for configurations a slightly wrong engine would run instead:
every steered layer shifted by one (an off-by-one in layer indexing: ``v_l`` added after
layer ``l + 1`` / ``l - 1``) and the scale changed by the smallest step a user would notice.
The engine must match its own configuration within the tolerance and each near miss must
fall outside it, request by request.
"""

from __future__ import annotations

import dataclasses

import torch
from conftest import TORCH_DTYPE

from roast_vllm import SteeringVector
from roast_vllm.engine.spec import SteerSpec
from roast_vllm.methods.hf import teacher_forced_logprobs

BF16 = TORCH_DTYPE == torch.bfloat16
#: Mean over a request's tokens of |HF - vLLM| log-prob of vLLM's tokens that a correct
#: engine stays within. fp32 (the test engines' dtype): the engines differ only in summation
#: order (measured ~1e-5 nats); the bf16 values are for a bf16 run, where near misses with
#: small effects (a prompt-only scope) cannot be told from rounding.
MEAN_LP_TOL = 0.08 if BF16 else 1e-3
#: The same, for the worst single token.
MAX_LP_TOL = 0.25 if BF16 else 1e-2
#: vLLM's token may be other than HF's argmax only when HF's top-1 beats it by at most this.
HF_TIE_NATS = 0.25 if BF16 else 1e-2
#: The smallest relative scale change a user would notice (a 10% stronger vector).
SCALE_STEP = 1.1


def near_misses(vec: SteeringVector, spec: SteerSpec) -> dict[str, tuple[SteeringVector, SteerSpec]]:
    """``{label: (vector, spec)}``: layers shifted by +1 and -1, scale times ``SCALE_STEP``;
    a per-third scale also with its thirds rotated (a segment off by one)."""
    L = vec.num_layers
    layers = spec.layers if spec.layers is not None else tuple(vec.layers)
    out = {}
    for d in (+1, -1):
        moved = {l + d: vec.directions[l] for l in layers if 0 <= l + d < L}
        shifted = SteeringVector(directions=moved, num_layers=L, site=vec.site)
        out[f"layer{d:+d}"] = (shifted, dataclasses.replace(spec, layers=tuple(sorted(moved))))
    per = isinstance(spec.scale, tuple)
    stepped = tuple(x * SCALE_STEP for x in spec.scale) if per else spec.scale * SCALE_STEP
    out[f"scale x{SCALE_STEP}"] = (vec, dataclasses.replace(spec, scale=stepped))
    if per and len(spec.scale) == 3:
        out["thirds rotated"] = (vec, dataclasses.replace(spec, scale=spec.scale[1:] + spec.scale[:1]))
    return out


def lp_errors(hf_model, output, vec, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|HF - vLLM| log-prob of each generated token, HF top-1 minus HF log-prob of it)``
    with HF steered by ``(vec, spec)`` (both None: unsteered)."""
    gen = list(output.outputs[0].token_ids)
    vllm_lp = torch.tensor([output.outputs[0].logprobs[i][t].logprob for i, t in enumerate(gen)])
    ref = teacher_forced_logprobs(hf_model, output.prompt_token_ids, gen, vec, spec)
    hf_lp = ref[torch.arange(len(gen)), torch.tensor(gen)]
    return (hf_lp - vllm_lp).abs(), ref.max(-1).values - hf_lp


def check_request(hf_model, output, vec: SteeringVector, spec: SteerSpec, label: str = "") -> dict:
    """Assert that one request's output (needs ``logprobs >= 1``) is the reference of its own
    configuration and of none of its near misses, nor of the unsteered model. Returns the
    errors (for reports)."""
    err, gaps = lp_errors(hf_model, output, vec, spec)
    right = float(err.mean())
    assert right <= MEAN_LP_TOL and float(err.max()) <= MAX_LP_TOL, (
        f"{label}: mean |HF - vLLM| {right:.4f} (tol {MEAN_LP_TOL}), max {float(err.max()):.4f} "
        f"(tol {MAX_LP_TOL})"
    )
    assert float(gaps.max()) <= HF_TIE_NATS, (
        f"{label}: vLLM chose a token HF ranks {float(gaps.max()):.3f} nats below its top-1"
    )
    report = {"right": round(right, 5)}
    wrong = {**near_misses(vec, spec), "unsteered": (None, None)}
    for name, (v, s) in wrong.items():
        e = float(lp_errors(hf_model, output, v, s)[0].mean())
        report[name] = round(e, 5)
        assert e > MEAN_LP_TOL and e > 2 * right, (
            f"{label}: the near miss '{name}' explains vLLM's log-probs as well as the right "
            f"configuration (mean error {e:.4f} vs {right:.4f}, tol {MEAN_LP_TOL})"
        )
    return report


# ------------------------------------------------------------------ checks run on an engine
# Each registers what it needs under its own names (registering a name again with the same
# content is a no-op version-wise), so the eager and the compiled engine's modules run the
# very same checks.
MAX_TOKENS = 16
SCOPE_PROMPTS = [
    "Q: What is 12 + 30? A:",
    "A good friend is someone who",
    "The largest planet in the solar system is",
    "Write a haiku about rain:",
]


def _sp(extra=None):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True, extra_args=extra
    )


def _extra(spec: SteerSpec) -> dict:
    scale = list(spec.scale) if isinstance(spec.scale, tuple) else spec.scale
    e = {"steer_vector": spec.vector, "steer_scale": scale, "steer_positions": spec.positions}
    if spec.layers is not None:
        e["steer_layers"] = list(spec.layers)
    if spec.start is not None:
        e["steer_start"] = spec.start
    return e


def _register(llm, name: str, vec: SteeringVector) -> None:
    import roast_vllm

    roast_vllm.register_vector(llm, name, vec)


def residual_vector(llm, seed: int, layers=None) -> SteeringVector:
    return SteeringVector.random(
        llm.roast_dims["num_layers"], llm.roast_dims["hidden_size"], layers, seed=seed
    )


def mlp_vector(llm, seed: int, layers=None) -> SteeringVector:
    L, dim = llm.roast_dims["num_layers"], llm.roast_dims["intermediate_size"]
    return SteeringVector.random(L, dim, layers, seed=seed, site="mlp_act")


def check_batch(llm, hf_model, prompts, configs) -> list[dict]:
    """Run ``prompts`` in one batch, request ``i`` steered by ``configs[i] = (vec, spec)``
    (None: plain), and check every steered request against its own reference. Besides the
    layer/scale near misses, the other requests' configurations are near misses too (a
    request must not read a neighbour's slot)."""
    outs = llm.generate(prompts, [_sp(None if c is None else _extra(c[1])) for c in configs], use_tqdm=False)
    reports = []
    for i, (o, c) in enumerate(zip(outs, configs)):
        if c is None:
            continue
        vec, spec = c
        rep = check_request(hf_model, o, vec, spec, label=f"request {i} {_extra(spec)}")
        for j, other in enumerate(configs):
            if other is not None and j != i and other[0] is not vec:
                # the neighbour's vector (on its own layers) at this request's scale and scope
                wrong = dataclasses.replace(spec, vector=other[1].vector, layers=None)
                e = float(lp_errors(hf_model, o, other[0], wrong)[0].mean())
                assert e > MEAN_LP_TOL and e > 2 * rep["right"], (
                    f"request {i}: request {j}'s vector explains its log-probs (error {e:.4f})"
                )
                rep[f"vector of request {j}"] = round(e, 5)
        reports.append({"request": i, "extra": _extra(spec), **rep})
        print("reference check:", reports[-1])
    return reports


def check_position_scope(llm, hf_model, positions: str) -> list[dict]:
    """A residual vector on layers 4..25 at scale 6 with the given position scope."""
    vec = residual_vector(llm, seed=100)
    _register(llm, "ref_res", vec)
    spec = SteerSpec("ref_res", 6.0, tuple(range(4, 26)), positions)
    return check_batch(llm, hf_model, SCOPE_PROMPTS, [(vec, spec)] * len(SCOPE_PROMPTS))


def check_side_by_side(llm, hf_model) -> list[dict]:
    """Distinct vectors, scales (one per third of the layers too), layer sets, scopes and
    both sites in one batch, with plain requests between them."""
    a, b = residual_vector(llm, seed=101), residual_vector(llm, seed=102, layers=list(range(5, 25)))
    m = mlp_vector(llm, seed=103, layers=list(range(6, 20)))
    for name, v in (("ref_a", a), ("ref_b", b), ("ref_m", m)):
        _register(llm, name, v)
    configs = [
        (a, SteerSpec("ref_a", 5.0)),
        None,
        (b, SteerSpec("ref_b", -6.0, tuple(range(5, 25)), "generated")),
        (m, SteerSpec("ref_m", 3.0, None, "last_prompt_and_generated")),
        None,
        (a, SteerSpec("ref_a", 7.0, tuple(range(2, 28)), "prompt")),
        (a, SteerSpec("ref_a", (3.0, 8.0, -5.0))),
    ]
    prompts = [SCOPE_PROMPTS[i % len(SCOPE_PROMPTS)] for i in range(len(configs))]
    return check_batch(llm, hf_model, prompts, configs)


def check_slot_waiting(llm, hf_model, num_configs: int) -> list[dict]:
    """``num_configs`` distinct configurations (more than the engine's slots: some wait for
    a slot, then run), each checked against its own reference."""
    vec = residual_vector(llm, seed=104)
    _register(llm, "ref_w", vec)
    configs = [(vec, SteerSpec("ref_w", 3.0 + 0.75 * i)) for i in range(num_configs)]
    prompts = [SCOPE_PROMPTS[i % len(SCOPE_PROMPTS)] for i in range(num_configs)]
    return check_batch(llm, hf_model, prompts, configs)


def check_mlp_act(llm, hf_model, positions: str) -> list[dict]:
    """An ``mlp_act`` vector on layers 6..19 at scale 3 with the given position scope."""
    vec = mlp_vector(llm, seed=105, layers=list(range(6, 20)))
    _register(llm, "ref_mlp", vec)
    spec = SteerSpec("ref_mlp", 3.0, None, positions)
    return check_batch(llm, hf_model, SCOPE_PROMPTS[:3], [(vec, spec)] * 3)


# ------------------------------------------------------------------ multi-vector requests
def combination_near_misses(vecs: dict, spec: SteerSpec) -> dict:
    """A combination's near misses: each term's scale times ``SCALE_STEP``, each term left
    out, every term's layers shifted by +1."""
    out = {}
    for i, t in enumerate(spec.terms):
        stepped = dataclasses.replace(t, scale=t.scale * SCALE_STEP)
        out[f"term {i} scale x{SCALE_STEP}"] = (
            vecs,
            dataclasses.replace(spec, terms=_swap(spec.terms, i, stepped)),
        )
        rest = spec.terms[:i] + spec.terms[i + 1 :]
        out[f"without term {i}"] = (vecs, dataclasses.replace(spec, terms=rest))
    shifted_vecs, shifted = {}, []
    for t in spec.terms:
        v = vecs[t.vector]
        layers = t.layers if t.layers is not None else tuple(v.layers)
        moved = {l + 1: v.directions[l] for l in layers if l + 1 < v.num_layers}
        name = f"{t.vector}+1"
        shifted_vecs[name] = SteeringVector(directions=moved, num_layers=v.num_layers, site=v.site)
        shifted.append(dataclasses.replace(t, vector=name, layers=tuple(sorted(moved))))
    out["layers +1"] = (shifted_vecs, dataclasses.replace(spec, terms=tuple(shifted)))
    return out


def _swap(terms, i, t):
    return terms[:i] + (t,) + terms[i + 1 :]


def check_combination(llm, hf_model) -> list[dict]:
    """Multi-vector requests (``steer_vectors``) in one batch with a single-vector request
    and a plain one: two residual vectors (one on its own layers, one scope), and a
    residual + ``mlp_act`` pair. Each is the reference of the *sum* of its terms, not of a
    near miss (a term's scale 10% off, a term left out, layers shifted) nor unsteered."""
    from roast_vllm.engine.spec import parse_steer_args

    a, b = residual_vector(llm, seed=111), residual_vector(llm, seed=112, layers=list(range(5, 25)))
    m = mlp_vector(llm, seed=113, layers=list(range(6, 20)))
    vecs = {"cmb_a": a, "cmb_b": b, "cmb_m": m}
    for name, v in vecs.items():
        _register(llm, name, v)
    extras = [
        {"steer_vectors": "cmb_a:4,cmb_b:-5@8-20"},
        {"steer_vector": "cmb_a", "steer_scale": 4.0},
        None,
        {
            "steer_vectors": [{"name": "cmb_a", "scale": 3.0}, {"name": "cmb_m", "scale": 2.5}],
            "steer_positions": "generated",
        },
        {"steer_vectors": "cmb_b:6,cmb_a:-2@2-27", "steer_positions": "last_prompt_and_generated"},
    ]
    prompts = [SCOPE_PROMPTS[i % len(SCOPE_PROMPTS)] for i in range(len(extras))]
    outs = llm.generate(prompts, [_sp(e) for e in extras], use_tqdm=False)
    reports = []
    for i, (o, e) in enumerate(zip(outs, extras)):
        if e is None or "steer_vectors" not in e:
            continue
        spec = parse_steer_args(e)
        err, gaps = lp_errors(hf_model, o, vecs, spec)
        right = float(err.mean())
        assert right <= MEAN_LP_TOL and float(err.max()) <= MAX_LP_TOL, (e, right, float(err.max()))
        assert float(gaps.max()) <= HF_TIE_NATS, (e, float(gaps.max()))
        rep = {"request": i, "extra": e, "right": round(right, 5)}
        for name, (v, s) in {**combination_near_misses(vecs, spec), "unsteered": (None, None)}.items():
            wrong = float(lp_errors(hf_model, o, v, s)[0].mean())
            rep[name] = round(wrong, 5)
            assert wrong > MEAN_LP_TOL and wrong > 2 * right, (
                f"request {i} {e}: the near miss '{name}' explains vLLM's log-probs as well "
                f"(mean error {wrong:.4f} vs {right:.4f})"
            )
        reports.append(rep)
        print("combination check:", rep)
    assert len(reports) == 3
    return reports


# ------------------------------------------------------------------ Fusion Steering
FUSION_QA = [
    (
        "What happens if you crack your knuckles a lot?",
        "Nothing in particular happens if you crack your knuckles a lot",
    ),
    ("What is the capital of Australia?", "The capital of Australia is Canberra"),
]


def fusion_refs(llm, hf_model) -> list[torch.Tensor]:
    """``r [L, H]`` per question of ``FUSION_QA``: the residual stream of a reference text
    averaged over its answer positions (methods/fusion.py), as real references are made."""
    from roast_vllm.methods.fusion import reference_text, reference_vectors_hf

    tok = llm.get_tokenizer()
    return [reference_vectors_hf(hf_model, tok, *reference_text(q, a, a + ".")) for q, a in FUSION_QA]


@torch.no_grad()
def fusion_logprobs(model, prompt_ids, gen, refs, coeffs, skip_first=False, variant="cached") -> torch.Tensor:
    """``[len(gen), vocab]`` teacher-forced log-probs under Fusion Steering. ``cached`` and
    ``uncached``: ``methods.fusion.fusion_hooks`` (the reference). Near misses a wrong
    engine would compute: ``no mean`` (``h += c r``: the running mean never subtracted),
    ``frozen`` (the mean stops at the prompt: decode steps never update the sums)."""
    from roast_vllm.methods.fusion import fusion_hooks
    from roast_vllm.methods.hf import decoder_layers, forward_hooks, output_tensor, with_output_tensor

    ids = torch.tensor([list(prompt_ids) + list(gen)])
    p = len(prompt_ids)
    if variant in ("cached", "uncached"):
        with fusion_hooks(model, refs, coeffs, variant, skip_first):
            logits = model(ids, use_cache=False).logits[0]
    else:

        def make(l):
            def hook(_m, _i, out):
                h = output_tensor(out)
                x = h[0].float()
                pos = torch.arange(x.shape[0])
                use = (pos > 0) if skip_first else torch.ones_like(pos, dtype=torch.bool)
                cnt = (pos + (0 if skip_first else 1)).clamp_min(1).float()
                m = torch.cumsum(x * use[:, None], 0) / cnt[:, None]
                if variant == "frozen":
                    m[p:] = m[p - 1]
                elif variant == "no mean":
                    m = torch.zeros_like(m)
                h = h.clone()
                h[0] = (x + coeffs[l] * (refs[l].float() - m) * use[:, None]).to(h.dtype)
                return with_output_tensor(out, h)

            return hook

        with forward_hooks((layer, make(l)) for l, layer in enumerate(decoder_layers(model))):
            logits = model(ids, use_cache=False).logits[0]
    return torch.log_softmax(logits[p - 1 : p - 1 + len(gen)].float(), -1)


def check_fusion_request(hf_model, output, refs, coeffs, skip_first, others, label) -> dict:
    """One Fusion request against its cached reference, and against its near misses: the
    coefficients 10% off, the thirds rotated, skip_first flipped, no running mean, a mean
    frozen after the prompt, the uncached semantics, another question's reference and the
    unsteered model."""
    gen = list(output.outputs[0].token_ids)
    got = torch.tensor([output.outputs[0].logprobs[i][t].logprob for i, t in enumerate(gen)])
    at = (torch.arange(len(gen)), torch.tensor(gen))

    def err(r, c, skip=skip_first, variant="cached"):
        ref = fusion_logprobs(hf_model, output.prompt_token_ids, gen, r, c, skip, variant)
        return (ref[at] - got).abs(), ref.max(-1).values - ref[at]

    e, gaps = err(refs, coeffs)
    right = float(e.mean())
    assert right <= MEAN_LP_TOL and float(e.max()) <= MAX_LP_TOL, (
        f"{label}: mean |HF - vLLM| {right:.4f} (tol {MEAN_LP_TOL}), max {float(e.max()):.4f}"
    )
    assert float(gaps.max()) <= HF_TIE_NATS, (
        f"{label}: vLLM chose a token HF ranks {float(gaps.max()):.3f} below"
    )
    L = len(coeffs)
    wrong = {
        f"coefficients x{SCALE_STEP}": (refs, [c * SCALE_STEP for c in coeffs], skip_first, "cached"),
        "skip_first flipped": (refs, coeffs, not skip_first, "cached"),
        "no running mean": (refs, coeffs, skip_first, "no mean"),
        "mean frozen after the prompt": (refs, coeffs, skip_first, "frozen"),
        "uncached semantics": (refs, coeffs, skip_first, "uncached"),
        "unsteered": (refs, [0.0] * L, skip_first, "cached"),
    }
    if len(set(coeffs)) > 1:
        rot = [coeffs[(l + L // 3) % L] for l in range(L)]
        wrong["layers rotated by a third"] = (refs, rot, skip_first, "cached")
    for i, other in enumerate(others):
        wrong[f"reference {i}"] = (other, coeffs, skip_first, "cached")
    report = {"right": round(right, 5)}
    for name, (r, c, skip, variant) in wrong.items():
        w = float(err(r, c, skip, variant)[0].mean())
        report[name] = round(w, 5)
        assert w > MEAN_LP_TOL and w > 2 * right, (
            f"{label}: the near miss '{name}' explains vLLM's log-probs as well (error {w:.4f} vs {right:.4f})"
        )
    print("fusion reference check:", label, report)
    return report


def check_fusion(llm, hf_model, long_prompt: str) -> list[dict]:
    """Fusion requests (full-layer, per-third, skip_first; a long prompt prefilled in
    chunks where the engine chunks) beside an additive request and plain ones, in one
    batch: each Fusion request is its cached reference and none of its near misses; the
    plain and additive rows are bit for bit what they are without the Fusion rows beside
    them (same prompts, same batch shape)."""
    from roast_vllm.engine.spec import segment_of

    refs = fusion_refs(llm, hf_model)
    L = refs[0].shape[0]
    from roast_vllm.methods.fusion import ReferenceSet

    # registered as a reference set: question i's reference is the vector "tqa/q<i>"
    names = ReferenceSet([f"q{i}" for i in range(len(refs))], torch.stack(refs)).register(llm, "tqa")
    assert names == [f"tqa/q{i}" for i in range(len(refs))]
    a = residual_vector(llm, seed=106)
    _register(llm, "ref_add", a)
    seg = (0.1, 0.45, 0.25)
    fusion = [  # (prompt, reference index, steer_scale, skip_first)
        (SCOPE_PROMPTS[0], 0, 0.3, False),
        (long_prompt, 1, seg, False),
        (SCOPE_PROMPTS[2], 0, 0.3, True),
    ]
    batch = []  # (prompt, extra, kind)
    for k, (prompt, qi, scale, skip) in enumerate(fusion):
        e = {"steer_vector": f"tqa/q{qi}", "steer_mode": "fusion"}
        e["steer_scale"] = list(scale) if isinstance(scale, tuple) else scale
        if skip:
            e["steer_skip_first"] = True
        batch.append((prompt, e, ("fusion", k)))
        batch.append((SCOPE_PROMPTS[(k + 3) % 4], None, ("plain", k)))
    batch.append((SCOPE_PROMPTS[3], _extra(SteerSpec("ref_add", 5.0)), ("add", 0)))
    prompts = [b[0] for b in batch]
    outs = llm.generate(prompts, [_sp(b[1]) for b in batch], use_tqdm=False)
    reports = []
    for (_, _, (kind, k)), o in zip(batch, outs):
        if kind != "fusion":
            continue
        _, qi, scale, skip = fusion[k]
        coeffs = [scale[segment_of(l, L)] for l in range(L)] if isinstance(scale, tuple) else [scale] * L
        others = [r for j, r in enumerate(refs) if j != qi]
        label = f"fusion request {k} (q{qi}, scale {scale}, skip_first {skip}, {len(o.prompt_token_ids)} prompt tokens)"
        reports.append(check_fusion_request(hf_model, o, refs[qi], coeffs, skip, others, label))
    # the same batch with the Fusion rows unsteered: every other row bit for bit the same
    alone = llm.generate(prompts, [_sp(None if b[2][0] == "fusion" else b[1]) for b in batch], use_tqdm=False)
    for (_, _, (kind, k)), o, p in zip(batch, outs, alone):
        if kind == "fusion":
            assert list(o.outputs[0].token_ids) != list(p.outputs[0].token_ids), (
                f"Fusion request {k} was not steered"
            )
            continue
        assert list(o.outputs[0].token_ids) == list(p.outputs[0].token_ids), f"{kind} row {k} changed"
        lo = [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        lp = [d[t].logprob for d, t in zip(p.outputs[0].logprobs, p.outputs[0].token_ids)]
        assert lo == lp, f"{kind} row {k}: log-probs changed beside Fusion rows"
    # the long-prompt Fusion request again: its KV blocks are in the prefix cache under the
    # same salt, and it must not read them (its running mean would miss those positions)
    again = llm.generate(prompts[2:3], [_sp(batch[2][1])], use_tqdm=False)[0]
    first = outs[2]
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    d = [
        abs(a[t].logprob - b[t].logprob)
        for a, b, t in zip(again.outputs[0].logprobs, first.outputs[0].logprobs, again.outputs[0].token_ids)
    ]
    assert max(d) <= MAX_LP_TOL, f"a repeated Fusion request differs by {max(d):.4f} nats"
    info = llm.collective_rpc("roast_info")[0]
    assert info["fusion_gaps"] == 0 and info["rows_refused"] == 0, info
    return reports
