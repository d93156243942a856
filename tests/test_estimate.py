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
