"""ROAST reduction on a synthetic case whose answer is known analytically."""

import torch

from roast_vllm.estimate import estimate_vector


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
    from roast_vllm.estimate import EstimateOptions, vector_from_activations
    from roast_vllm.pairs import build_pairs

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
