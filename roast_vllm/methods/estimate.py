"""ROAST estimation, the reduction step: pair differences -> ``SteeringVector``.

``d_i = h_l(q ⊕ r⁺)[-1] - h_l(q ⊕ r⁻)[-1]`` for every (correct, incorrect) pair ``i`` of
question ``g_i`` (ROC), then Grouped Mean Normalization with Continuous Soft Scaling
through the fused ``roast_vllm.kernels.grouped_css`` op (METHODS.md, ROAST steps 4-6)::

    grouped:    v = (1/G) Σ_g CSS(μ_g),   μ_g = Σ_{i∈g} w_i d_i / Σ_{i∈g} w_i
    ungrouped:  v = CSS(Σ_i w_i d_i / Σ_i w_i)
    CAA:        ungrouped with CSS "none" (the residual-stream mean difference)

Both are sums of per-question terms, so estimation streams (``estimate_from_rollouts``,
behind ``roast-vllm estimate``): rollouts -> pairs (``roast_vllm.methods.pairs``) -> jobs
of whole questions (``plan_jobs``) -> on each worker, capture and reduce
(``capture_reduce``: ``[L, dim]`` partial ``Σ_g CSS(μ_g)`` and ``G``, or ``Σ w·d`` and
``Σ w``) -> the driver adds the partials (``PartialSum``) and applies ``recss`` at the
end. No activation reaches the driver: its memory is O(layers x width) whatever the
number of pairs. ``Estimates`` runs many such estimates as one job set (several pair sets,
e.g. one per concept, times several variants sharing each text's capture).
``vector_from_activations`` is the all-in-memory reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from roast_vllm.kernels.grouped_css import MODES, css, grouped_css
from roast_vllm.runtime.jobs import POOLINGS
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
    provenance = dict(meta.pop("provenance", {}) or {})
    provenance.update({"n_pairs": int(diffs.shape[1]), "n_groups": int(torch.unique(groups).numel())})
    method = meta.pop("method", "roast")
    return _as_vector(v, layers, mode, grouped, recss, site, num_layers, method, provenance, **meta)


def _as_vector(
    v: torch.Tensor,
    layers: list[int],
    mode: str,
    grouped: bool,
    recss: bool,
    site: str,
    num_layers: int | None,
    method: str,
    provenance: dict[str, Any],
    **meta: Any,
) -> SteeringVector:
    """``v [len(layers), dim]`` -> ``SteeringVector``; ``recss`` is applied here, to the
    merged vector, and the reduction is recorded in the provenance."""
    if recss:
        v = css(v, mode)
    return SteeringVector(
        directions={l: v[i] for i, l in enumerate(layers)},
        site=site,
        num_layers=num_layers,
        method=method,
        provenance={**provenance, "css": mode, "grouped": grouped, "recss": recss},
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
    """Texts (and pairs) per capture-and-reduce job, whole questions only: a worker holds
    one job's activations (``plan_jobs``)."""
    pooling: str = "last"
    """A text's activation: ``last`` (its last token: ROC, METHODS.md step 4) or
    ``response_mean`` (the mean over its response tokens, as AxBench's DiffMean pools:
    a variant, not the paper's)."""


#: options that decide the pairs and the captures: estimates sharing them share one capture
SHARED = (
    "layers",
    "pooling",
    "capture_batch",
    "reread_weight",
    "gold_fallback",
    "wrong_fallback",
    "max_pairs_per_question",
    "seed",
)


def estimate_from_rollouts(
    questions,
    rollouts: list[dict],
    opts: EstimateOptions,
    engine,
    pool,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> SteeringVector:
    """Pairs -> streamed capture-and-reduce jobs -> ``SteeringVector`` (one estimate of
    :class:`Estimates`).

    No activation comes back to the driver: each job captures its questions' texts on a
    worker and returns ``[L, dim]`` partial sums (``capture_reduce``); the driver adds
    them (``PartialSum``). Driver memory is O(layers x width) whatever the number of
    pairs; a worker holds one job's activations (``plan_jobs``).
    """
    from roast_vllm.runtime.pool import open_pool

    est = Estimates({None: (questions, rollouts)}, {"v": opts}, engine)
    with open_pool(engine, pool) as wp:
        est.run(wp, progress=progress)
    vecs = est.vectors({None: provenance})["v"]
    if None not in vecs:
        raise ValueError(
            f"no (correct, incorrect) pair among {len(rollouts)} rollouts of {len(questions)} questions: "
            "every question's responses are all correct or all incorrect, and no fallback pair "
            "(gold / known-wrong answer) could be built"
        )
    return vecs[None]


class Estimates:
    """Several estimates as one job set: for every *set* (``tag -> (questions, rollouts)``,
    e.g. one concept's) and every *variant* (``name -> EstimateOptions``: site, CSS mode,
    grouping, recss), a ``SteeringVector``. Variants must agree on the fields in
    ``SHARED`` (pairs and captures); a job captures its texts once, at every site the
    variants use, and reduces them once per variant (``capture_reduce``), so V variants
    of S sets cost S sets' captures, in ``len(jobs)`` jobs the pool runs in any order.

    Use: ``est.jobs`` into a ``WorkerPool.run`` (with any other jobs: keys are
    ``(Estimates.KEY, index, tag, k)``), each result into ``est.add(key, result)``, then
    ``est.vectors()``; or ``est.run(pool)``.
    """

    KEY = "estimate"

    def __init__(self, sets: dict, variants: dict[str, EstimateOptions], engine, index: int = 0) -> None:
        from roast_vllm.engine.model_prep import default_model, model_dims
        from roast_vllm.methods.pairs import build_pairs

        if not variants:
            raise ValueError("no variants to estimate")
        opts = list(variants.values())
        for o in opts:
            if o.method not in ("roast", "caa"):
                raise ValueError(f"method={o.method!r}; use 'roast' or 'caa'")
            _site(o)
            if o.capture_batch < 1:
                raise ValueError(f"capture_batch must be >= 1, got {o.capture_batch}")
            if o.pooling not in POOLINGS:
                raise ValueError(f"pooling={o.pooling!r}; use one of {POOLINGS}")
            differ = [f for f in SHARED if getattr(o, f) != getattr(opts[0], f)]
            if differ:
                raise ValueError(f"variants of one Estimates must agree on {differ}: estimate them apart")
        self.variants, self.index = dict(variants), index
        model = engine.model or default_model()
        self.model, self.num_layers = str(model), model_dims(model)["num_layers"]
        o = opts[0]
        self.layers = o.layers if o.layers is not None else list(range(self.num_layers))
        bad = [l for l in self.layers if not 0 <= l < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {self.num_layers} layers")
        reductions = [(_site(v), *_reduction(v)[:2]) for v in opts]
        self.pairsets, self.jobs, self._jobs_of = {}, [], {}
        for tag, (questions, rollouts) in sets.items():
            ps = build_pairs(
                questions,
                rollouts,
                reread_weight=o.reread_weight,
                use_gold_fallback=o.gold_fallback,
                use_wrong_fallback=o.wrong_fallback,
                max_pairs_per_question=o.max_pairs_per_question,
                seed=o.seed,
            )
            self.pairsets[tag] = ps
            by_id = {q.qid: q for q in questions}
            planned = plan_jobs(ps, o.capture_batch)
            self._jobs_of[tag] = len(planned)
            self.jobs += [
                (
                    (self.KEY, index, tag, k),
                    CAPTURE_REDUCE,
                    (
                        [(by_id[qid], r) for qid, r in job.texts],
                        job.pairs,
                        self.layers,
                        reductions,
                        o.pooling,
                    ),
                )
                for k, job in enumerate(planned)
            ]
        self.totals = {
            (name, tag): PartialSum(_reduction(v)[1]) for name, v in variants.items() for tag in sets
        }

    @property
    def n_pairs(self) -> int:
        return sum(len(ps.pairs) for ps in self.pairsets.values())

    def owns(self, key) -> bool:
        return isinstance(key, tuple) and len(key) == 4 and key[:2] == (self.KEY, self.index)

    def add(self, key, parts: list[dict[str, Any]]) -> int:
        """One job's result (a partial per variant, in order); returns its pairs."""
        tag = key[2]
        for name, part in zip(self.variants, parts, strict=True):
            self.totals[name, tag].add(part)
        return parts[0]["n_pairs"]

    def run(self, pool, progress: bool = True) -> None:
        """Run the jobs on an open ``WorkerPool`` and add their results."""
        from tqdm import tqdm

        bar = tqdm(total=self.n_pairs, desc="capturing + reducing pairs", unit="pair", disable=not progress)
        for key, parts in pool.run(self.jobs):
            bar.update(self.add(key, parts))
        bar.close()

    def vectors(self, provenance: dict | None = None) -> dict[str, dict]:
        """``{variant: {tag: SteeringVector}}``; a set without pairs has no vector.
        ``provenance``: ``{tag: dict}`` recorded in that set's vectors."""
        out: dict[str, dict] = {name: {} for name in self.variants}
        for name, opts in self.variants.items():
            mode = _reduction(opts)[0]
            for tag, ps in self.pairsets.items():
                total = self.totals[name, tag]
                if not ps.pairs:
                    continue
                if total.n_pairs != len(ps.pairs):  # every pair reduced exactly once
                    raise RuntimeError(
                        f"roast-vllm: reduced {total.n_pairs} of {len(ps.pairs)} pairs (please report)"
                    )
                out[name][tag] = _vector(
                    total.result(mode),
                    ps,
                    self.layers,
                    opts,
                    self.num_layers,
                    self.model,
                    (provenance or {}).get(tag),
                    jobs=self._jobs_of[tag],
                    n_groups=total.n_groups,
                )
        return out


# ----------------------------------------------------------------- streaming
#: the worker job of streaming estimation (``WorkerPool.run`` takes ``module:function``)
CAPTURE_REDUCE = "roast_vllm.methods.estimate:capture_reduce"


@dataclass
class Job:
    """Whole questions' pairs, re-indexed into the job's own texts."""

    texts: list[tuple[str, str]]
    """``(qid, response)`` texts to capture, each once."""
    pairs: list[tuple[int, int, float, int]]
    """``(pos, neg, weight, group)``: indices into ``texts``, group local to the job."""


def plan_jobs(ps, batch: int) -> list[Job]:
    """Cut a ``PairSet`` into jobs of whole groups (a question's pairs never span jobs:
    its CSS needs its full mean), each with at most ``batch`` texts and ``batch`` pairs,
    except a single group larger than that, which is a job of its own. This bounds a
    worker's memory: ``[L, texts, dim]`` activations and ``[L, pairs, dim]`` differences
    of one job."""
    by_group: dict[int, list] = {}
    for p in ps.pairs:
        by_group.setdefault(p.group, []).append(p)
    jobs: list[Job] = []
    texts: dict[int, int] = {}  # global text index -> index in the job
    pairs: list[tuple[int, int, float, int]] = []
    n_groups = 0

    def flush():
        nonlocal texts, pairs, n_groups
        if pairs:
            order = sorted(texts, key=texts.get)
            jobs.append(Job(texts=[ps.texts[t] for t in order], pairs=pairs))
        texts, pairs, n_groups = {}, [], 0

    for group in sorted(by_group):
        members = by_group[group]
        new_texts = {t for p in members for t in (p.pos, p.neg)}
        if pairs and (len(texts) + len(new_texts) > batch or len(pairs) + len(members) > batch):
            flush()
        for p in members:
            ip = texts.setdefault(p.pos, len(texts))
            ineg = texts.setdefault(p.neg, len(texts))
            pairs.append((ip, ineg, float(p.weight), n_groups))
        n_groups += 1
    flush()
    return jobs


def reduce_pairs(
    acts: torch.Tensor,
    pairs: list[tuple[int, int, float, int]],
    mode: str,
    grouped: bool,
) -> dict[str, Any]:
    """One job's partial sums from its texts' activations ``acts [L, texts, dim]``.

    grouped:   ``sum = Σ_g CSS(μ_g)`` over the job's groups, ``count = G_job``
    ungrouped: ``sum = Σ_i w_i d_i``, ``count = Σ_i w_i`` (CSS comes after the total)

    ``d_i = acts[:, pos_i] - acts[:, neg_i]`` (ROC differences), reduced by
    ``roast_vllm.kernels.grouped_css``. Returns ``{"sum": [L, dim] fp32, "count",
    "n_pairs", "n_groups"}``.
    """
    pos = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=acts.device)
    neg = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=acts.device)
    w = torch.tensor([p[2] for p in pairs], dtype=torch.float32, device=acts.device)
    g = torch.tensor([p[3] for p in pairs], dtype=torch.long, device=acts.device)
    diffs = acts[:, pos] - acts[:, neg]  # [L, pairs, dim]
    n_groups = int(torch.unique(g).numel())
    if grouped:
        total = grouped_css(diffs, w, g, mode=mode, grouped=True, reduction="sum")
        count = float(n_groups)
    else:
        # the weighted mean times its weight: Σ w·d (one group, no CSS yet)
        wsum = float(w.sum())
        total = grouped_css(diffs, w, g, mode="none", grouped=False) * wsum
        count = wsum
    return {"sum": total.float().cpu(), "count": count, "n_pairs": len(pairs), "n_groups": n_groups}


def capture_reduce(
    w,
    items: list[tuple[Any, str]],
    pairs: list[tuple[int, int, float, int]],
    layers: list[int],
    reductions: list[tuple[str, str, bool]],
    pooling: str = "last",
) -> list[dict[str, Any]]:
    """Worker job: capture ``prompt(q) ⊕ response`` for the job's ``items`` once at every
    site of ``reductions`` (``w.capture_texts``, pooled by ``pooling``) and reduce its
    pairs once per ``(site, css mode, grouped)`` (``reduce_pairs``), in order."""
    sites = list(dict.fromkeys(site for site, _, _ in reductions))
    acts = w.capture_texts(items, layers, sites, pooling)
    return [reduce_pairs(acts[site], pairs, mode, grouped) for site, mode, grouped in reductions]


class PartialSum:
    """The driver's running total of job partials: ``[L, dim]`` fp64 plus counts."""

    def __init__(self, grouped: bool) -> None:
        self.grouped = grouped
        self.sum: torch.Tensor | None = None
        self.count = 0.0
        self.n_pairs = 0
        self.n_groups = 0

    def add(self, part: dict[str, Any]) -> None:
        s = part["sum"].to(torch.float64)  # fp64: the total does not depend on job order
        self.sum = s if self.sum is None else self.sum + s
        self.count += part["count"]
        self.n_pairs += part["n_pairs"]
        self.n_groups += part["n_groups"]

    def result(self, mode: str) -> torch.Tensor:
        """``[L, dim]`` fp32: grouped ``(1/G) Σ_g CSS(μ_g)``, ungrouped ``CSS(Σ w·d / Σ w)``
        (zero when every weight is zero)."""
        if self.sum is None:
            raise ValueError("no partial sums were added")
        if self.count == 0:
            return torch.zeros_like(self.sum, dtype=torch.float32)
        mean = (self.sum / self.count).to(torch.float32)
        return mean if self.grouped else css(mean, mode)


def _site(opts: EstimateOptions) -> str:
    site = "residual" if opts.method == "caa" else opts.site
    if site not in ("residual", "mlp_act"):
        raise ValueError(f"site={site!r}; use 'mlp_act' or 'residual'")
    return site


def _reduction(opts: EstimateOptions) -> tuple[str, bool, bool]:
    """``(css mode, grouped, recss)`` of a method: CAA is the plain pooled mean."""
    if opts.method == "caa":
        return "none", False, False
    return opts.css, opts.grouped, opts.recss


def _vector(
    v: torch.Tensor,
    ps,
    layers: list[int],
    opts: EstimateOptions,
    num_layers: int | None,
    model_id: str | None,
    provenance: dict[str, Any] | None,
    **stats: Any,
) -> SteeringVector:
    """The streamed ``v [len(layers), dim]`` -> ``SteeringVector`` with the run's provenance."""
    mode, grouped, recss = _reduction(opts)
    prov = {
        **(provenance or {}),
        "pairs": ps.stats,
        "options": asdict(opts),
        "n_pairs": len(ps.pairs),
        **stats,
    }
    return _as_vector(
        v, layers, mode, grouped, recss, _site(opts), num_layers, opts.method, prov, model_id=model_id
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
    """All in memory: ``acts [len(layers), len(ps.texts), dim]`` last-token activations of
    the pair texts -> ROC differences ``d = acts[pos] - acts[neg]`` -> ``estimate_vector``.
    The reference the streamed ``estimate_from_rollouts`` is tested against; it holds
    ``[L, pairs, dim]`` at once, so keep it to small sets."""
    if acts.shape[1] != len(ps.texts):
        raise ValueError(f"acts has {acts.shape[1]} texts, the pair set {len(ps.texts)}")
    pos = torch.tensor([p.pos for p in ps.pairs])
    neg = torch.tensor([p.neg for p in ps.pairs])
    diffs = acts[:, pos] - acts[:, neg]  # [L, pairs, dim]: ROC differences
    weights = torch.tensor([p.weight for p in ps.pairs], dtype=torch.float32)
    groups = torch.tensor([p.group for p in ps.pairs], dtype=torch.long)
    mode, grouped, recss = _reduction(opts)
    prov = {**(provenance or {}), "pairs": ps.stats, "options": asdict(opts)}
    return estimate_vector(
        diffs,
        weights,
        groups,
        layers,
        mode=mode,
        grouped=grouped,
        site=_site(opts),
        num_layers=num_layers,
        recss=recss,
        model_id=model_id,
        method=opts.method,
        provenance=prov,
    )
