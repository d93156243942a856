"""``roast-vllm eval``: greedy accuracy with a 95% interval, and TruthfulQA MC1/MC2.

For each strength ``scale`` in the sweep (0 = the unsteered baseline) every question is
answered greedily (steered at ``layers`` from the last prompt token on, ROAST's default
scope) and verified. ``truthfulqa_mc`` also gets MC1 (the best answer has the highest
log-likelihood among best + incorrect answers) and MC2 (normalized probability mass of
the correct answers), both from teacher-forced log-likelihoods under the same steering.

Intervals: Wilson score interval for accuracy and MC1 (proportions); mean +- 1.96 SE for
MC2 (a mean of per-question values).
"""

from __future__ import annotations

import math
from typing import Any

from roast_vllm.tasks import Question, get_task

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def mean_ci(xs: list[float], z: float = Z95) -> list[float]:
    n = len(xs)
    if n < 2:
        return [min(xs or [0.0]), max(xs or [1.0])]
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return [m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)]


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (binomial(n, 1/2), ties dropped): McNemar's exact test
    on discordant pairs, or wins / losses of paired per-unit differences."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def mc_scores(ll_true: list[float], ll_false: list[float], best_index: int = 0) -> tuple[float, float]:
    """``(mc1, mc2)`` of one question from answer log-likelihoods. MC1: the best answer
    (``ll_true[best_index]``) beats every incorrect one; MC2: sum p(true) / sum p(all)."""
    mc1 = float(ll_true[best_index] > max(ll_false))
    m = max(ll_true + ll_false)
    pt = sum(math.exp(x - m) for x in ll_true)
    pf = sum(math.exp(x - m) for x in ll_false)
    return mc1, pt / (pt + pf)


def _chunks(xs: list, size: int) -> list[list]:
    return [xs[i : i + size] for i in range(0, len(xs), size)]


def evaluate(
    task: str,
    questions: list[Question],
    pool,
    scales: list[float],
    vector_name: str | None = None,
    layers: list[int] | None = None,
    positions: str = "last_prompt_and_generated",
    max_tokens: int | None = None,
    mc: bool = True,
    chunk: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One result dict per scale (``pool`` is an open ``WorkerPool`` with the vector
    registered under ``vector_name``)."""
    from tqdm import tqdm

    t = get_task(task)
    max_tokens = max_tokens or t.default_max_tokens
    by_id = {q.qid: q for q in questions}
    results = []
    for scale in scales:
        steer = None
        if vector_name is not None and scale != 0:
            steer = {"steer_vector": vector_name, "steer_scale": float(scale), "steer_positions": positions}
            if layers is not None:
                steer["steer_layers"] = list(layers)
        bar = tqdm(total=len(questions), desc=f"eval {task} scale={scale:g}", unit="q", disable=not progress)
        answers: dict[str, dict] = {}
        jobs = [(i, "greedy", (task, c, max_tokens, steer)) for i, c in enumerate(_chunks(questions, chunk))]
        for _, res in pool.run(jobs):
            for r in res:
                answers[r["qid"]] = r
            bar.update(len(res))
        bar.close()
        k = sum(r["correct"] for r in answers.values())
        n = len(answers)
        out: dict[str, Any] = {
            "scale": float(scale),
            "n": n,
            "accuracy": k / n,
            "ci95": wilson(k, n),
            "answered": sum(r["answer"] is not None for r in answers.values()) / n,
        }
        if mc and task == "truthfulqa_mc":
            trues = [
                [q.best_answer, *(c for c in q.correct_answers if c != q.best_answer)] for q in questions
            ]
            items = [(q, [*tr, *q.incorrect_answers]) for q, tr in zip(questions, trues)]
            mc1s, mc2s = [], []
            jobs = [(i, "loglik", (c, steer)) for i, c in enumerate(_chunks(items, chunk))]
            lls: dict[int, list] = {}
            bar = tqdm(total=len(items), desc=f"MC1/MC2 scale={scale:g}", unit="q", disable=not progress)
            for i, res in pool.run(jobs):
                lls[i] = res
                bar.update(len(res))
            bar.close()
            flat = [x for i in sorted(lls) for x in lls[i]]
            for tr, ll in zip(trues, flat):
                mc1, mc2 = mc_scores(ll[: len(tr)], ll[len(tr) :], 0)  # best answer first
                mc1s.append(mc1)
                mc2s.append(mc2)
            out["mc1"] = sum(mc1s) / n
            out["mc1_ci95"] = wilson(int(sum(mc1s)), n)
            out["mc2"] = sum(mc2s) / n
            out["mc2_ci95"] = mean_ci(mc2s)
        out["per_question"] = [
            {"qid": qid, "correct": answers[qid]["correct"], "answer": answers[qid]["answer"]}
            for qid in by_id
        ]
        results.append(out)
    return results
