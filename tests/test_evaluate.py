"""Evaluation statistics: intervals and MC1/MC2 from log-likelihoods."""

import math

import pytest

from roast_vllm.tasks.evaluate import mc_scores, mean_ci, wilson


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [(5, 10, 0.2366, 0.7634), (0, 20, 0.0, 0.1611), (20, 20, 0.8389, 1.0), (81, 263, 0.2553, 0.3662)],
    ids=["half", "none-correct", "all-correct", "typical"],
)
def test_wilson_interval(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_mean_ci_covers_the_mean_and_shrinks_with_n():
    a = mean_ci([0.2, 0.4, 0.6, 0.8])
    b = mean_ci([0.2, 0.4, 0.6, 0.8] * 25)
    assert a[0] < 0.5 < a[1] and b[0] < 0.5 < b[1]
    assert b[1] - b[0] < (a[1] - a[0]) / 4


def test_mc_scores():
    # best answer most likely -> MC1 = 1; MC2 = normalized true mass
    mc1, mc2 = mc_scores([-1.0, -3.0], [-2.0, -4.0])
    assert mc1 == 1.0
    e = math.exp
    assert mc2 == pytest.approx((e(-1) + e(-3)) / (e(-1) + e(-3) + e(-2) + e(-4)))
    # an incorrect answer beats the best one -> MC1 = 0 even if another true answer is top
    mc1, _ = mc_scores([-5.0, -0.5], [-1.0])
    assert mc1 == 0.0
    # numerically safe for very negative log-likelihoods
    mc1, mc2 = mc_scores([-1000.0], [-1001.0])
    assert mc1 == 1.0 and mc2 == pytest.approx(1 / (1 + e(-1)))
