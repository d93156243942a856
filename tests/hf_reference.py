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
