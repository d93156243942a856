"""ROAST pairing: (correct, incorrect) response pairs per question, with fallbacks.

Implements METHODS.md, ROAST steps 2-3. Each question's rollouts split into ``k``
correct and ``m`` incorrect responses (duplicates removed) and give all ``k*m`` pairs,
which form the question's *group*. No correct rollout: the gold answer, formatted like a
response, is the single positive, with weight ``reread_weight``. No incorrect rollout:
the task's known-wrong answers are the negatives if it has any, else the question is
skipped. The texts to capture are deduplicated per question.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from roast_vllm.tasks import Question


@dataclass(frozen=True)
class Pair:
    group: int
    """Index of the question's group (0..G-1, in order of first appearance)."""
    pos: int
    """Index into ``PairSet.texts`` of the positive response."""
    neg: int
    """Index into ``PairSet.texts`` of the negative response."""
    weight: float


@dataclass
class PairSet:
    texts: list[tuple[str, str]]
    """Unique ``(qid, response)`` texts to capture activations for."""
    pairs: list[Pair]
    qids: list[str]
    """qid of each group."""
    stats: dict[str, int] = field(default_factory=dict)


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _by_qid(rollouts: Sequence[dict]) -> dict[str, list[tuple[str, bool]]]:
    out: dict[str, list[tuple[str, bool]]] = {}
    for i, r in enumerate(rollouts):
        missing = [k for k in ("qid", "response", "correct") if k not in r]
        if missing:
            raise ValueError(f"rollout {i} lacks key(s) {missing}; it has {sorted(r)}")
        if r["correct"] not in (True, False):
            raise ValueError(f"rollout {i}: 'correct' must be a bool, got {r['correct']!r}")
        out.setdefault(str(r["qid"]), []).append((str(r["response"]), bool(r["correct"])))
    return out


def build_pairs(
    questions: Sequence[Question],
    rollouts: Sequence[dict],
    *,
    reread_weight: float = 1.0,
    use_gold_fallback: bool = True,
    use_wrong_fallback: bool = True,
    max_pairs_per_question: int | None = None,
    seed: int = 0,
) -> PairSet:
    """Pair each question's correct and incorrect rollouts (``{"qid", "response", "correct"}``).

    Groups follow ``questions`` order. With ``max_pairs_per_question``, a question with more
    pairs keeps a random subset seeded by ``(seed, qid)``, in pair order. Raises ValueError
    when no question yields a pair.
    """
    if reread_weight <= 0:
        raise ValueError(f"reread_weight must be > 0, got {reread_weight}")
    if max_pairs_per_question is not None and max_pairs_per_question < 1:
        raise ValueError(f"max_pairs_per_question must be >= 1 or None, got {max_pairs_per_question}")
    by_qid = _by_qid(rollouts)
    known = {q.qid for q in questions}
    if len(known) != len(questions):
        raise ValueError("questions contain duplicate qids")
    stats = dict.fromkeys(
        (
            "questions",
            "used",
            "skipped_no_rollouts",
            "skipped_no_positive",
            "skipped_no_negative",
            "gold_fallback",
            "wrong_fallback",
            "duplicates_removed",
            "pairs_dropped",
            "pairs",
            "texts",
        ),
        0,
    )
    stats["questions"] = len(questions)
    stats["rollouts_unmatched"] = sum(len(v) for k, v in by_qid.items() if k not in known)
    texts: dict[tuple[str, str], int] = {}
    pairs: list[Pair] = []
    qids: list[str] = []
    for q in questions:
        rs = by_qid.get(q.qid)
        if not rs:
            stats["skipped_no_rollouts"] += 1
            continue
        pos = _unique([t for t, ok in rs if ok])
        neg = _unique([t for t, ok in rs if not ok])
        dups = len(rs) - len(pos) - len(neg)
        weight, gold_fb, wrong_fb = 1.0, False, False
        if not pos:
            if not (use_gold_fallback and q.gold_response):
                stats["skipped_no_positive"] += 1
                continue
            pos, weight, gold_fb = [q.gold_response], reread_weight, True
        if not neg:
            if not (use_wrong_fallback and q.wrong_responses):
                stats["skipped_no_negative"] += 1
                continue
            neg, wrong_fb = _unique(q.wrong_responses), True
        combos = [(p, n) for p in pos for n in neg]
        if max_pairs_per_question is not None and len(combos) > max_pairs_per_question:
            keep = random.Random(f"{seed}:{q.qid}").sample(range(len(combos)), max_pairs_per_question)
            stats["pairs_dropped"] += len(combos) - max_pairs_per_question
            combos = [combos[i] for i in sorted(keep)]
        group = len(qids)
        qids.append(q.qid)
        for p, n in combos:
            ip = texts.setdefault((q.qid, p), len(texts))
            ineg = texts.setdefault((q.qid, n), len(texts))
            pairs.append(Pair(group=group, pos=ip, neg=ineg, weight=weight))
        stats["used"] += 1
        stats["gold_fallback"] += gold_fb
        stats["wrong_fallback"] += wrong_fb
        stats["duplicates_removed"] += dups
    stats["pairs"] = len(pairs)
    stats["texts"] = len(texts)
    if not pairs:
        raise ValueError(
            f"no ROAST pairs from {stats['questions']} questions: "
            f"{stats['skipped_no_rollouts']} had no rollouts "
            f"({stats['rollouts_unmatched']} rollouts matched no question's qid); "
            f"{stats['skipped_no_positive']} had no correct response "
            f"(gold fallback {'on' if use_gold_fallback else 'off'}); "
            f"{stats['skipped_no_negative']} had no incorrect response "
            f"(wrong fallback {'on' if use_wrong_fallback else 'off'}; tasks without known-wrong "
            "answers, such as gsm8k, skip questions the model always solves)"
        )
    return PairSet(texts=list(texts), pairs=pairs, qids=qids, stats=stats)
