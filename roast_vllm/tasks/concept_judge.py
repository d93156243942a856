"""The concept-steering judge: concept presence, instruction relevance, fluency, and their
harmonic mean (AxBench's aggregate), each calibrated against the same instruction's
*unsteered* answer, so 0 / 1 mean the same thing for every instruction and concept.

With ``e(.)`` the unit embeddings of all-MiniLM-L6-v2 (:class:`EmbeddingJudge`, not the
steered model), ``d`` the concept's description, ``I`` the instruction, ``y`` the judged
output and ``y0`` the unsteered model's answer to ``I``:

* **concept** ``= clip((cos(y, d) - cos(y0, d)) / (1 - cos(y0, d)), 0, 1)``: the share of
  the way from the plain answer's similarity to a perfect match that ``y`` covers. 0: no
  closer to the concept than the plain answer; 1: the description itself.
* **relevance** ``= clip(cos(y, I) / cos(y0, I), 0, 1)``: how much of the plain answer's
  similarity to the instruction ``y`` keeps (1 when ``cos(y0, I) <= 0`` and ``y`` is at
  least as close).
* **fluency** ``= min(1, exp(lp(y) - lp(y0))) * min(1, v(y) / v(y0))``, ``lp`` the mean
  per-token log-likelihood under the unsteered served model (computed by the caller, who
  has the engine): the per-token likelihood ratio to the plain answer, capped at 1; ``v``
  the share of distinct word bigrams among a text's word bigrams (:func:`variety`). The
  likelihood alone rewards degenerate loops: "the cosmos, the cosmos, the cosmos, ..." is
  *more* predictable to the plain model than its own answer (0.8 on the first sweep, where
  such loops were CAA's best setting); its bigram variety is 0.04.
* **aggregate** ``= 3 / (1/concept + 1/relevance + 1/fluency)`` (0 if any is 0).

The same concept score, thresholded (:func:`best_threshold` on part a), labels ROAST's
rollouts: a rollout is on-concept when its concept score is above the threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from roast_vllm.tasks.judge import EmbeddingJudge


def concept_score(sim: float, base_sim: float) -> float:
    """``clip((sim - base_sim) / (1 - base_sim), 0, 1)`` (see the module)."""
    room = 1.0 - base_sim
    if room <= 1e-6:
        return 0.0
    return min(max((sim - base_sim) / room, 0.0), 1.0)


def relevance_score(sim: float, base_sim: float) -> float:
    if base_sim <= 1e-6:
        return 1.0 if sim >= base_sim else 0.0
    return min(max(sim / base_sim, 0.0), 1.0)


def variety(text: str) -> float:
    """The share of distinct word bigrams among ``text``'s word bigrams (lower-cased
    ``\\w+`` words); 1.0 for fewer than three words (too short to loop)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < 3:
        return 1.0
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams)


def fluency_score(lp: float, base_lp: float, var: float = 1.0, base_var: float = 1.0) -> float:
    """``min(1, exp(lp - base_lp)) * min(1, var / base_var)``: mean per-token
    log-likelihoods (nats) and :func:`variety` of the output and of the plain answer."""
    if not (math.isfinite(lp) and math.isfinite(base_lp)):
        return 0.0
    return min(1.0, math.exp(lp - base_lp)) * (min(1.0, var / base_var) if base_var > 0 else 1.0)


def harmonic(*xs: float) -> float:
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


class ConceptJudge:
    """Grades outputs of concept-steered requests (see the module for the formulas)."""

    def __init__(self, judge: EmbeddingJudge | None = None) -> None:
        self.judge = judge or EmbeddingJudge()

    def _sims(self, *pairs: tuple[Sequence[str], Sequence[str]]) -> list[list[float]]:
        """For each ``(texts, refs)``: the row-wise cosine similarity of ``texts[i]`` with
        ``refs[i]``. Every distinct text of all pairs is embedded once, in one batch."""
        uniq = list(dict.fromkeys(t for texts, refs in pairs for t in (*texts, *refs)))
        index = {t: i for i, t in enumerate(uniq)}
        e = self.judge.embed(uniq)
        out = []
        for texts, refs in pairs:
            a, b = e[[index[t] for t in texts]], e[[index[t] for t in refs]]
            out.append([float(x) for x in (a * b).sum(-1)])
        return out

    def concept(
        self, outputs: Sequence[str], descriptions: Sequence[str], baselines: Sequence[str]
    ) -> list[float]:
        """Calibrated concept score of each output (``baselines[i]``: the unsteered answer
        to output ``i``'s instruction)."""
        _same_length(outputs, descriptions, baselines)
        s, b = self._sims((outputs, descriptions), (baselines, descriptions))
        return [concept_score(x, y) for x, y in zip(s, b)]

    def relevance(
        self, outputs: Sequence[str], instructions: Sequence[str], baselines: Sequence[str]
    ) -> list[float]:
        _same_length(outputs, instructions, baselines)
        s, b = self._sims((outputs, instructions), (baselines, instructions))
        return [relevance_score(x, y) for x, y in zip(s, b)]

    def grade(
        self,
        outputs: Sequence[str],
        descriptions: Sequence[str],
        instructions: Sequence[str],
        baselines: Sequence[str],
        lps: Sequence[float],
        base_lps: Sequence[float],
    ) -> list[dict]:
        """Per output: ``concept_score``, ``relevance``, ``fluency``, ``aggregate``
        (harmonic mean) and ``concept_raw`` (the uncalibrated ``cos(y, d)``)."""
        _same_length(outputs, descriptions, instructions, baselines, lps, base_lps)
        raw, base_c, rel, base_r = self._sims(
            (outputs, descriptions),
            (baselines, descriptions),
            (outputs, instructions),
            (baselines, instructions),
        )
        out = []
        for i in range(len(outputs)):
            c, r = concept_score(raw[i], base_c[i]), relevance_score(rel[i], base_r[i])
            f = fluency_score(lps[i], base_lps[i], variety(outputs[i]), variety(baselines[i]))
            out.append(
                {
                    "concept_score": c,
                    "relevance": r,
                    "fluency": f,
                    "aggregate": harmonic(c, r, f),
                    "concept_raw": raw[i],
                }
            )
        return out


def best_threshold(on: Sequence[float], off: Sequence[float]) -> tuple[float, float]:
    """``(threshold, balanced accuracy)``: the cut between on-concept and off-concept
    scores (part a) that maximizes balanced accuracy; a score ``> threshold`` is on."""
    if not on or not off:
        raise ValueError("best_threshold needs scores of both on-concept and off-concept texts")
    cands = sorted(set(on) | set(off))
    cuts = [cands[0] - 1e-9] + [(a + b) / 2 for a, b in zip(cands, cands[1:])] + [cands[-1]]
    best = (cuts[0], -1.0)
    for t in cuts:
        acc = 0.5 * (sum(x > t for x in on) / len(on) + sum(x <= t for x in off) / len(off))
        if acc > best[1]:
            best = (t, acc)
    return best


def _same_length(*seqs) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"one entry per output expected, got lengths {[len(s) for s in seqs]}")
