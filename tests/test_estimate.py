"""ROAST reduction on a synthetic case whose answer is known analytically."""

import dataclasses

import pytest
import torch

from roast_vllm.methods.estimate import estimate_vector


def test_known_direction_despite_one_loud_question():
    # Nine questions have 2 pairs each along e0; one "loud" question has 50 pairs, 100x
    # larger, along e0 + 0.9 e5. With grouping and max_norm each question casts one vote
    # of max-norm 1, so the answer is the plain mean of the ten votes; without grouping the
    # loud question dominates.
    H = 16
    e0 = torch.zeros(H)
    e0[0] = 1.0
    loud = torch.zeros(H)
    loud[5] = 1.0
    diffs, groups = [], []
    for q in range(10):
        n = 50 if q == 0 else 2
        scale = 100.0 if q == 0 else 1.0
        direction = e0 + (0.9 * loud if q == 0 else 0.0)
        for _ in range(n):
            diffs.append(scale * direction)
            groups.append(q)
    D = torch.stack(diffs)[None]  # [1, N, H]
    w = torch.ones(D.shape[1])
    g = torch.tensor(groups)
    v = estimate_vector(D, w, g, layers=[3], num_layers=30)
    # grouped: 9 questions vote e0 (max_norm -> e0), the loud one votes e0 + 0.9 loud
    want = (9 * e0 + (e0 + 0.9 * loud)) / 10
    torch.testing.assert_close(v.directions[3], want)
    assert v.method == "roast" and v.provenance["n_groups"] == 10 and v.provenance["grouped"]
    u = estimate_vector(D, w, g, layers=[3], grouped=False).directions[3]
    assert u[5] > 0.8  # the loud question dominates the ungrouped estimate


def _q(qid, wrong=()):
    from roast_vllm.tasks import Question

    return Question(qid, qid, [{"role": "user", "content": qid}], "A", f"gold-{qid}", list(wrong))


def test_pairs_to_vector_matches_closed_form():
    """Rollouts -> pairs -> activations -> vector, on activations built so that every
    correct response reads ``base_q + u_q`` and every incorrect one ``base_q - u_q``: each
    pair difference of question q is ``2 u_q`` (gold fallback: ``u_q - (base_q - u_q)``
    with the gold text placed at ``base_q + u_q`` too), so the answers are known."""
    from roast_vllm.methods.estimate import EstimateOptions, vector_from_activations
    from roast_vllm.methods.pairs import build_pairs

    H = 8
    torch.manual_seed(0)
    qs = [_q("q0"), _q("q1"), _q("q2", wrong=["B. no"])]
    u = {"q0": torch.randn(H), "q1": 10 * torch.randn(H), "q2": torch.randn(H)}
    base = {q.qid: torch.randn(H) for q in qs}
    rollouts = [
        {"qid": "q0", "response": "a", "correct": True},
        {"qid": "q0", "response": "b", "correct": True},
        {"qid": "q0", "response": "c", "correct": False},
        {"qid": "q1", "response": "x", "correct": False},  # no correct: gold fallback
        {"qid": "q1", "response": "y", "correct": False},
        {"qid": "q2", "response": "B. yes", "correct": True},  # no incorrect: known-wrong fallback
    ]
    ps = build_pairs(qs, rollouts, reread_weight=0.5)
    assert (
        ps.stats["pairs"] == 2 + 2 + 1 and ps.stats["gold_fallback"] == 1 and ps.stats["wrong_fallback"] == 1
    )
    assert [p.weight for p in ps.pairs if ps.qids[p.group] == "q1"] == [0.5, 0.5]
    correct = {(r["qid"], r["response"]) for r in rollouts if r["correct"]} | {("q1", "gold-q1")}
    acts = torch.stack([base[q] + (u[q] if (q, r) in correct else -u[q]) for q, r in ps.texts])[
        None
    ]  # [1 layer, texts, H]
    grouped = vector_from_activations(ps, acts, [4], EstimateOptions(css="max_norm"))
    want = torch.stack([(2 * u[k]) / (2 * u[k]).abs().max() for k in ("q0", "q1", "q2")]).mean(0)
    torch.testing.assert_close(grouped.directions[4], want)
    assert grouped.site == "mlp_act" and grouped.provenance["pairs"]["pairs"] == 5

    # ungrouped: the weighted mean over all pairs, then CSS; q1's weight is 2 * 0.5 = 1
    flat = vector_from_activations(ps, acts, [4], EstimateOptions(css="l2", grouped=False))
    mu = (2 * (2 * u["q0"]) + 1.0 * (2 * u["q1"]) + 2 * u["q2"]) / 4.0
    torch.testing.assert_close(flat.directions[4], mu / mu.norm())

    # CAA: plain weighted mean difference at the residual stream, no CSS
    caa = vector_from_activations(ps, acts, [4], EstimateOptions(method="caa"))
    torch.testing.assert_close(caa.directions[4], mu)
    assert caa.site == "residual" and caa.method == "caa"


# ------------------------------------------------------------------ streaming
def _synthetic_set(n_questions: int, seed: int = 0):
    """Questions with uneven rollouts: k correct and m incorrect each (1..5), some with
    only correct ones (known-wrong fallback), some with only incorrect ones (gold
    fallback, weight 0.5), one repeated response (deduplicated)."""
    import random

    rng = random.Random(seed)
    qs, rollouts = [], []
    for i in range(n_questions):
        qs.append(_q(f"q{i}", wrong=[f"wrong-{i}"]))
        k, m = rng.randint(0, 5), rng.randint(0, 5)
        if k + m == 0:
            k = 1
        rollouts += [{"qid": f"q{i}", "response": f"right {i}.{j}", "correct": True} for j in range(k)]
        rollouts += [{"qid": f"q{i}", "response": f"wrong {i}.{j}", "correct": False} for j in range(m)]
    rollouts.append(dict(rollouts[0]))
    return qs, rollouts


def _in_memory(qs, rollouts, opts, model_dir):
    """The all-in-memory reference: every text's activations at once."""
    from roast_vllm.methods.estimate import vector_from_activations
    from roast_vllm.methods.pairs import build_pairs
    from roast_vllm.runtime.pool import EngineOptions
    from roast_vllm.runtime.synthetic import SyntheticWorker

    ps = build_pairs(qs, rollouts, reread_weight=opts.reread_weight, seed=opts.seed)
    by_id = {q.qid: q for q in qs}
    site = "residual" if opts.method == "caa" else opts.site
    acts = SyntheticWorker(EngineOptions(model=model_dir)).capture_texts(
        [(by_id[qid], r) for qid, r in ps.texts], opts.layers, [site]
    )[site]
    return vector_from_activations(ps, acts, opts.layers, opts, num_layers=30)


def _streamed(qs, rollouts, opts, model_dir):
    from roast_vllm.methods.estimate import estimate_from_rollouts
    from roast_vllm.runtime.pool import EngineOptions, PoolOptions, WorkerPool
    from roast_vllm.runtime.synthetic import SyntheticWorker

    eng = EngineOptions(model=model_dir)
    with WorkerPool(eng, PoolOptions(workers=0), worker_cls=SyntheticWorker) as wp:
        return estimate_from_rollouts(qs, rollouts, opts, eng, wp, progress=False)


STREAM_CASES = {
    "roast-mlp_act-grouped-max_norm": dict(method="roast", site="mlp_act", css="max_norm"),
    "roast-residual-grouped-softmax-recss": dict(method="roast", site="residual", css="softmax", recss=True),
    "roast-residual-ungrouped-l2": dict(method="roast", site="residual", css="l2", grouped=False),
    "roast-mlp_act-ungrouped-max_norm-recss": dict(method="roast", site="mlp_act", grouped=False, recss=True),
    "caa": dict(method="caa"),
}


@pytest.mark.parametrize("case", list(STREAM_CASES), ids=list(STREAM_CASES))
def test_streamed_estimate_equals_all_in_memory(case, model_dir):
    """Capture-and-reduce jobs of whole questions, partials added on the driver, give the
    all-in-memory vector (fp32 tolerance), over many jobs (batch 7 texts/pairs) with a
    question larger than a batch; the other grouping is far off (a near miss)."""
    from roast_vllm.methods.estimate import EstimateOptions

    qs, rollouts = _synthetic_set(40)
    rollouts += [{"qid": "q3", "response": f"extra {j}", "correct": j % 2 == 0} for j in range(12)]
    opts = EstimateOptions(layers=[0, 5, 29], capture_batch=7, reread_weight=0.5, **STREAM_CASES[case])
    got = _streamed(qs, rollouts, opts, model_dir)
    want = _in_memory(qs, rollouts, opts, model_dir)
    assert got.layers == want.layers and got.site == want.site and got.method == want.method
    assert got.provenance["jobs"] > 10 and got.provenance["n_pairs"] == want.provenance["n_pairs"]
    assert got.provenance["n_groups"] == want.provenance["n_groups"]
    for l in opts.layers:
        torch.testing.assert_close(got.directions[l], want.directions[l], rtol=1e-5, atol=1e-6)
    if opts.method == "roast":
        other = _in_memory(qs, rollouts, dataclasses.replace(opts, grouped=not opts.grouped), model_dir)
        rel = [
            float((other.directions[l] - want.directions[l]).norm() / want.directions[l].norm())
            for l in opts.layers
        ]
        assert min(rel) > 1e-2


def test_jobs_hold_whole_questions_within_the_batch(model_dir):
    from roast_vllm.methods.estimate import plan_jobs
    from roast_vllm.methods.pairs import build_pairs

    qs, rollouts = _synthetic_set(60, seed=1)
    rollouts += [{"qid": "q7", "response": f"extra {j}", "correct": j % 2 == 0} for j in range(12)]
    ps = build_pairs(qs, rollouts)
    jobs = plan_jobs(ps, 9)
    seen = []
    for job in jobs:
        groups = sorted({p[3] for p in job.pairs})
        assert groups == list(range(len(groups)))  # local group ids
        job_qids = [t[0] for t in job.texts]
        assert len(job.texts) == len(set(job.texts))
        assert all(0 <= p[0] < len(job.texts) and 0 <= p[1] < len(job.texts) for p in job.pairs)
        if len(groups) > 1:  # only a lone question may exceed the batch
            assert len(job.texts) <= 9 and len(job.pairs) <= 9
        seen += list(dict.fromkeys(job_qids))
    assert sorted(seen) == sorted(ps.qids) and len(seen) == len(set(seen))  # each question once
    assert sum(len(j.pairs) for j in jobs) == len(ps.pairs)
    assert max(len(j.pairs) for j in jobs) > 9  # q7's 36 pairs: one job of its own


def test_partial_sums_do_not_depend_on_job_order(model_dir):
    import random

    from roast_vllm.methods.estimate import PartialSum, plan_jobs, reduce_pairs
    from roast_vllm.methods.pairs import build_pairs
    from roast_vllm.runtime.pool import EngineOptions
    from roast_vllm.runtime.synthetic import SyntheticWorker

    qs, rollouts = _synthetic_set(50, seed=2)
    ps = build_pairs(qs, rollouts)
    by_id = {q.qid: q for q in qs}
    w = SyntheticWorker(EngineOptions(model=model_dir))
    parts = [
        reduce_pairs(
            w.capture_texts([(by_id[q], r) for q, r in j.texts], [3, 4], ["residual"])["residual"],
            j.pairs,
            "l2",
            True,
        )
        for j in plan_jobs(ps, 8)
    ]
    results = []
    for seed in range(3):
        random.Random(seed).shuffle(parts)
        total = PartialSum(grouped=True)
        for p in parts:
            total.add(p)
        results.append(total.result("l2"))
    assert all(torch.equal(results[0], r) for r in results[1:])


class _CountingWorker:
    """A ``SyntheticWorker`` that counts its captures (texts, sites) per call."""

    calls: list = []

    @classmethod
    def make(cls):
        from roast_vllm.runtime.synthetic import SyntheticWorker

        class Counting(SyntheticWorker):
            def capture_texts(self, items, layers, sites, pooling="last"):
                cls.calls.append((len(items), tuple(sites), pooling))
                return super().capture_texts(items, layers, sites, pooling)

        return Counting


def test_one_job_set_for_many_sets_and_variants(model_dir):
    """``Estimates``: three sets (say, concepts) x three variants in one job set give each
    (set, variant) the vector ``estimate_from_rollouts`` gives it alone, with each text
    captured once for all variants (both sites in one capture)."""
    from roast_vllm.methods.estimate import EstimateOptions, Estimates
    from roast_vllm.runtime.pool import EngineOptions, PoolOptions, WorkerPool

    sets = {}
    for k in range(3):
        qs, rollouts = _synthetic_set(12, seed=10 + k)
        for q in qs:  # distinct question ids per set
            q.qid = f"s{k}-{q.qid}"
        for r in rollouts:
            r["qid"] = f"s{k}-{r['qid']}"
        sets[f"set{k}"] = (qs, rollouts)
    variants = {
        "mlp": EstimateOptions(layers=[0, 5, 29], capture_batch=9),
        "mlp_ungrouped": EstimateOptions(layers=[0, 5, 29], capture_batch=9, grouped=False),
        "residual_l2": EstimateOptions(layers=[0, 5, 29], capture_batch=9, site="residual", css="l2"),
    }
    eng = EngineOptions(model=model_dir)
    _CountingWorker.calls.clear()
    with WorkerPool(eng, PoolOptions(workers=0), worker_cls=_CountingWorker.make()) as wp:
        est = Estimates(sets, variants, eng)
        est.run(wp, progress=False)
    calls = list(_CountingWorker.calls)
    got = est.vectors({t: {"tag": t} for t in sets})
    assert len(calls) == len(est.jobs) and all(c[1] == ("mlp_act", "residual") for c in calls)
    assert sum(c[0] for c in calls) == sum(len(ps.texts) for ps in est.pairsets.values())
    for name, opts in variants.items():
        for tag, (qs, rollouts) in sets.items():
            want = _streamed(qs, rollouts, opts, model_dir)
            v = got[name][tag]
            assert v.site == want.site and v.provenance["tag"] == tag
            for l in opts.layers:
                torch.testing.assert_close(v.directions[l], want.directions[l], rtol=1e-5, atol=1e-6)
    # the sets are told apart (a job's result goes to its own set's total)
    assert float((got["mlp"]["set0"].directions[5] - got["mlp"]["set1"].directions[5]).norm()) > 1e-2


def test_variants_of_one_job_set_must_share_pairs_and_captures(model_dir):
    from roast_vllm.methods.estimate import EstimateOptions, Estimates
    from roast_vllm.runtime.pool import EngineOptions

    qs, rollouts = _synthetic_set(4)
    eng = EngineOptions(model=model_dir)
    with pytest.raises(ValueError, match=r"agree on \['pooling'\]"):
        Estimates(
            {0: (qs, rollouts)}, {"a": EstimateOptions(), "b": EstimateOptions(pooling="response_mean")}, eng
        )
    with pytest.raises(ValueError, match="pooling='first'"):
        Estimates({0: (qs, rollouts)}, {"a": EstimateOptions(pooling="first")}, eng)


def test_response_mean_pooling_is_another_capture(model_dir):
    """``pooling="response_mean"`` reaches the worker's capture (synthetic stand-in: its
    pseudo-activations depend on the pooling), so the vector differs from ROC's."""
    from roast_vllm.methods.estimate import EstimateOptions

    qs, rollouts = _synthetic_set(10)
    last = _streamed(qs, rollouts, EstimateOptions(layers=[3]), model_dir)
    mean = _streamed(qs, rollouts, EstimateOptions(layers=[3], pooling="response_mean"), model_dir)
    assert mean.provenance["options"]["pooling"] == "response_mean"
    assert float((mean.directions[3] - last.directions[3]).norm()) > 1e-2 * float(last.directions[3].norm())
