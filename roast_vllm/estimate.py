"""ROAST estimation, the reduction step: pair differences -> ``SteeringVector``.

``d_i = h_l(q ⊕ r⁺)[-1] - h_l(q ⊕ r⁻)[-1]`` for every (correct, incorrect) pair ``i`` of
question ``g_i`` (ROC), then Grouped Mean Normalization with Continuous Soft Scaling
through the fused ``roast_vllm.kernels.grouped_css`` op (METHODS.md, ROAST steps 4-6).
``estimate_from_rollouts`` is the whole step behind ``roast-vllm estimate``: rollouts ->
pairs (``roast_vllm.pairs``) -> last-token activations captured in vLLM (in parallel over
the worker pool) -> ``estimate_vector``. ``method="caa"`` gives the baseline: the
residual-stream mean difference over the same pairs (no CSS, no grouping).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from roast_vllm.kernels.grouped_css import MODES, grouped_css
from roast_vllm.vector import SteeringVector


def estimate_vector(
    diffs: torch.Tensor,
    weights: torch.Tensor,
    groups: torch.Tensor,
    layers: list[int],
    *,
    mode: str = "max_norm",
    grouped: bool = True,
    site: str = "residual",
    num_layers: int | None = None,
    recss: bool = False,
    **meta: Any,
) -> SteeringVector:
    """``diffs [len(layers), N, H]`` pair differences for the given ``layers``.

    ``recss``: re-apply CSS to the merged vector (the authors do this when combining
    shards; METHODS.md step 6).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if diffs.shape[0] != len(layers):
        raise ValueError(f"diffs has {diffs.shape[0]} layers but {len(layers)} layer ids were given")
    v = grouped_css(diffs, weights, groups, mode=mode, grouped=grouped)
    if recss:
        from roast_vllm.kernels.grouped_css import css

        v = css(v, mode)
    provenance = dict(meta.pop("provenance", {}) or {})
    provenance.update(
        {
            "css": mode,
            "grouped": grouped,
            "recss": recss,
            "n_pairs": int(diffs.shape[1]),
            "n_groups": int(torch.unique(groups).numel()),
        }
    )
    return SteeringVector(
        directions={l: v[i] for i, l in enumerate(layers)},
        site=site,
        num_layers=num_layers,
        method=meta.pop("method", "roast"),
        provenance=provenance,
        **meta,
    )


@dataclass
class EstimateOptions:
    """ROAST / CAA options (recorded in the vector's provenance)."""

    method: str = "roast"
    """``roast`` (CSS + optional grouping) or ``caa`` (plain mean difference, residual)."""
    site: str = "mlp_act"
    """Activation site for ``roast``: ``mlp_act`` (the paper's default) or ``residual``."""
    layers: list[int] | None = None
    """Layers to estimate (None: all)."""
    css: str = "max_norm"
    """Continuous Soft Scaling mode: max_norm | l2 | softmax | none."""
    grouped: bool = True
    """Grouped Mean Normalization (one question, one vote)."""
    recss: bool = False
    """Re-apply CSS to the merged vector."""
    reread_weight: float = 1.0
    """Weight of gold-answer fallback pairs."""
    gold_fallback: bool = True
    wrong_fallback: bool = True
    max_pairs_per_question: int | None = None
    seed: int = 0
    capture_batch: int = 256
    """Sequences per capture job."""


def estimate_from_rollouts(
    questions,
    rollouts: list[dict],
    opts: EstimateOptions,
    engine,
    pool,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> SteeringVector:
    """Pairs -> captured differences -> ``SteeringVector`` (see module docstring)."""
    from tqdm import tqdm

    from roast_vllm.model_prep import default_model, model_dims
    from roast_vllm.pairs import build_pairs
    from roast_vllm.workers import open_pool

    if opts.method not in ("roast", "caa"):
        raise ValueError(f"method={opts.method!r}; use 'roast' or 'caa'")
    site = "residual" if opts.method == "caa" else opts.site
    if site not in ("residual", "mlp_act"):
        raise ValueError(f"site={site!r}; use 'mlp_act' or 'residual'")
    model = engine.model or default_model()
    dims = model_dims(model)
    layers = opts.layers if opts.layers is not None else list(range(dims["num_layers"]))
    bad = [l for l in layers if not 0 <= l < dims["num_layers"]]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {dims['num_layers']} layers")
    ps = build_pairs(
        questions,
        rollouts,
        reread_weight=opts.reread_weight,
        use_gold_fallback=opts.gold_fallback,
        use_wrong_fallback=opts.wrong_fallback,
        max_pairs_per_question=opts.max_pairs_per_question,
        seed=opts.seed,
    )
    by_id = {q.qid: q for q in questions}
    items = [(by_id[qid], r) for qid, r in ps.texts]
    b = opts.capture_batch
    jobs = [(i, "capture_texts", (items[i : i + b], layers, [site])) for i in range(0, len(items), b)]
    chunks: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(items), desc="capturing q+r activations", unit="seq", disable=not progress)
    with open_pool(engine, pool) as wp:
        for i, res in wp.run(jobs):
            chunks[i] = res[site]
            bar.update(res[site].shape[1])
    bar.close()
    acts = torch.cat([chunks[i] for i in sorted(chunks)], 1)  # [L, texts, dim]
    return vector_from_activations(
        ps, acts, layers, opts, num_layers=dims["num_layers"], model_id=str(model), provenance=provenance
    )


def vector_from_activations(
    ps,
    acts: torch.Tensor,
    layers: list[int],
    opts: EstimateOptions,
    num_layers: int | None = None,
    model_id: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> SteeringVector:
    """``acts [len(layers), len(ps.texts), dim]`` last-token activations of the pair
    texts -> ROC differences ``d = acts[pos] - acts[neg]`` -> ``estimate_vector``."""
    if acts.shape[1] != len(ps.texts):
        raise ValueError(f"acts has {acts.shape[1]} texts, the pair set {len(ps.texts)}")
    site = "residual" if opts.method == "caa" else opts.site
    pos = torch.tensor([p.pos for p in ps.pairs])
    neg = torch.tensor([p.neg for p in ps.pairs])
    diffs = acts[:, pos] - acts[:, neg]  # [L, pairs, dim]: ROC differences
    weights = torch.tensor([p.weight for p in ps.pairs], dtype=torch.float32)
    groups = torch.tensor([p.group for p in ps.pairs], dtype=torch.long)
    prov = dict(provenance or {})
    prov.update({"pairs": ps.stats, "options": asdict(opts)})
    if opts.method == "caa":
        mode, grouped, recss = "none", False, False
    else:
        mode, grouped, recss = opts.css, opts.grouped, opts.recss
    return estimate_vector(
        diffs,
        weights,
        groups,
        layers,
        mode=mode,
        grouped=grouped,
        site=site,
        num_layers=num_layers,
        recss=recss,
        model_id=model_id,
        method=opts.method,
        provenance=prov,
    )
