"""ROAST pairing: k*m pairs per question, gold/wrong fallbacks, skips, dedup, subsets."""

from __future__ import annotations

import pytest

from roast_vllm.methods.pairs import Pair, build_pairs
from roast_vllm.tasks import Question


def question(qid: str, wrong: list[str] | None = None) -> Question:
    return Question(
        qid=qid,
        question=f"question {qid}",
        messages=[{"role": "user", "content": f"question {qid}"}],
        gold="1",
        gold_response=f"gold {qid}",
        wrong_responses=wrong or [],
    )


def rollouts(qid: str, correct: list[str], incorrect: list[str]) -> list[dict]:
    return [{"qid": qid, "response": r, "correct": True} for r in correct] + [
        {"qid": qid, "response": r, "correct": False} for r in incorrect
    ]


def resolved(ps, pair: Pair) -> tuple[str, str, str, float]:
    """(qid, positive text, negative text, weight) of a pair."""
    (qid, pos), (qid2, neg) = ps.texts[pair.pos], ps.texts[pair.neg]
    assert qid == qid2 == ps.qids[pair.group]
    return qid, pos, neg, pair.weight


@pytest.mark.parametrize("k, m", [(1, 1), (2, 3), (5, 1), (8, 7)], ids=lambda v: str(v))
def test_all_k_times_m_pairs(k, m):
    correct = [f"c{i}" for i in range(k)]
    incorrect = [f"w{i}" for i in range(m)]
    ps = build_pairs([question("q")], rollouts("q", correct, incorrect))
    assert len(ps.pairs) == k * m == ps.stats["pairs"]
    assert {(p, n) for _, p, n, _ in (resolved(ps, x) for x in ps.pairs)} == {
        (c, w) for c in correct for w in incorrect
    }
    assert all(x.weight == 1.0 and x.group == 0 for x in ps.pairs)
    assert len(ps.texts) == k + m and ps.qids == ["q"]


def test_groups_follow_question_order_and_texts_are_per_question():
    qs = [question("a"), question("b"), question("c")]
    rs = rollouts("c", ["same"], ["bad"]) + rollouts("a", ["same"], ["bad"])
    ps = build_pairs(qs, rs)
    assert ps.qids == ["a", "c"]
    assert [x.group for x in ps.pairs] == [0, 1]
    assert ps.texts == [("a", "same"), ("a", "bad"), ("c", "same"), ("c", "bad")]
    assert ps.stats["questions"] == 3 and ps.stats["used"] == 2 and ps.stats["skipped_no_rollouts"] == 1


def test_gold_fallback_uses_reread_weight():
    ps = build_pairs([question("q")], rollouts("q", [], ["w1", "w2"]), reread_weight=0.5)
    assert [resolved(ps, x) for x in ps.pairs] == [("q", "gold q", "w1", 0.5), ("q", "gold q", "w2", 0.5)]
    assert ps.stats["gold_fallback"] == 1 and ps.stats["wrong_fallback"] == 0


def test_gold_fallback_off_skips():
    qs = [question("q"), question("r")]
    rs = rollouts("q", [], ["w"]) + rollouts("r", ["c"], ["w"])
    ps = build_pairs(qs, rs, use_gold_fallback=False)
    assert ps.qids == ["r"] and ps.stats["skipped_no_positive"] == 1


def test_wrong_fallback_for_all_correct_question():
    q = question("q", wrong=["A. wrong", "B. wrong", "A. wrong"])
    ps = build_pairs([q], rollouts("q", ["c1", "c2"], []))
    assert [resolved(ps, x)[1:3] for x in ps.pairs] == [
        ("c1", "A. wrong"),
        ("c1", "B. wrong"),
        ("c2", "A. wrong"),
        ("c2", "B. wrong"),
    ]
    assert ps.stats["wrong_fallback"] == 1 and ps.stats["gold_fallback"] == 0


def test_all_correct_without_known_wrong_is_skipped():
    qs = [question("q"), question("r", wrong=["x"])]
    ps = build_pairs(qs, rollouts("q", ["c"], []) + rollouts("r", ["c"], []))
    assert ps.qids == ["r"] and ps.stats["skipped_no_negative"] == 1
    ps = build_pairs(qs[1:] + qs[:1], rollouts("r", ["c"], ["w"]), use_wrong_fallback=False)
    assert ps.qids == ["r"]
    with pytest.raises(ValueError, match="1 had no incorrect response"):
        build_pairs(qs, rollouts("r", ["c"], []), use_wrong_fallback=False)


def test_identical_responses_are_deduplicated():
    ps = build_pairs([question("q")], rollouts("q", ["c", "c", "d"], ["w", "w", "w"]))
    assert len(ps.pairs) == 2 and len(ps.texts) == 3
    assert ps.stats["duplicates_removed"] == 3


def test_max_pairs_subset_is_deterministic():
    qs = [question("q"), question("r")]
    rs = rollouts("q", [f"c{i}" for i in range(4)], [f"w{i}" for i in range(5)])
    rs += rollouts("r", ["c"], ["w"])
    a = build_pairs(qs, rs, max_pairs_per_question=6, seed=3)
    b = build_pairs(qs, rs, max_pairs_per_question=6, seed=3)
    alone = build_pairs(qs[:1], rs, max_pairs_per_question=6, seed=3)
    other = build_pairs(qs, rs, max_pairs_per_question=6, seed=4)
    pick = lambda ps: [resolved(ps, x) for x in ps.pairs if ps.qids[x.group] == "q"]  # noqa: E731
    assert len(pick(a)) == 6 and pick(a) == pick(b) == pick(alone)
    assert pick(a) != pick(other)
    assert len(set(pick(a))) == 6 and a.stats["pairs_dropped"] == 14
    assert a.stats["pairs"] == 7
    assert {t for t in a.texts if t[0] == "q"} == {(q, s) for q, p, n, _ in pick(a) for s in (p, n)}


def test_no_pairs_error_explains_counts():
    with pytest.raises(
        ValueError, match=r"no ROAST pairs from 2 questions: 1 had no rollouts.*1 had no incorrect"
    ):
        build_pairs([question("q"), question("r")], rollouts("q", ["c"], []))
    with pytest.raises(ValueError, match="2 rollouts matched no question"):
        build_pairs([question("q")], rollouts("other", ["c"], ["w"]))


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param({"qid": "q", "response": "r"}, "lacks key", id="missing-key"),
        pytest.param({"qid": "q", "response": "r", "correct": "yes"}, "must be a bool", id="non-bool"),
    ],
)
def test_malformed_rollout(bad, message):
    with pytest.raises(ValueError, match=message):
        build_pairs([question("q")], [bad])


def test_argument_checks():
    rs = rollouts("q", ["c"], ["w"])
    with pytest.raises(ValueError, match="reread_weight"):
        build_pairs([question("q")], rs, reread_weight=0)
    with pytest.raises(ValueError, match="max_pairs_per_question"):
        build_pairs([question("q")], rs, max_pairs_per_question=0)
    with pytest.raises(ValueError, match="duplicate qids"):
        build_pairs([question("q"), question("q")], rs)
