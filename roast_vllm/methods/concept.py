"""Concept vectors for the concept-steering benchmark (``roast_vllm.tasks.concept``): ROAST
from the model's own rollouts and CAA from prompts, for every concept, on the workers.

**ROAST.** For concept ``c`` and each (part a) instruction ``i``: the model's own answers
to "write about c" (:func:`~roast_vllm.tasks.concept.concept_prompt`) that the judge finds
on-concept (calibrated concept score ``> t``, baseline: the unsteered greedy answer to
``i``) are the positives; its own answers to ``i`` that the judge finds off-concept
(``<= t``) are the negatives. Both are captured as responses to ``i`` (teacher-forced
after ``i``'s prompt), so a pair differs in its content, not its prompt, and estimated as
today (:func:`~roast_vllm.methods.estimate.estimate_from_rollouts`: CSS, grouped by
instruction or not, either site). ``t`` is the cut on the concept score that best
separates concept-prompt rollouts from instruction rollouts on the concepts given
(:func:`~roast_vllm.tasks.concept_judge.best_threshold`; part a's concepts when tuning).

**CAA.** The mean residual activation over the user-message tokens of concept-laden
prompts (:func:`~roast_vllm.tasks.concept.prompting_baseline`: the instruction with a
request to weave the concept in) minus that over the plain instructions' (Rimsky et al.'s
mean difference, pooled over tokens as AxBench's DiffMean; the last token alone is
dominated by the shared "weave in a topic" request: CAA vectors of different concepts
were 0.97 cosine-similar that way).

All rollouts (every concept's and every instruction's samples and the greedy baselines)
are one job set on the pool's workers; each concept's ROAST capture is a job set of its
own on the same pool; CAA's prompt captures are one job set.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from roast_vllm.tasks import Question
from roast_vllm.tasks.concept import Concept, Instruction, concept_prompt, prompting_baseline
from roast_vllm.vector import SteeringVector


def _q(qid: str, text: str) -> Question:
    return Question(qid, text, [{"role": "user", "content": text}], "", "", [])


def concept_questions(cs: list[Concept]) -> list[Question]:
    return [_q(c.qid, concept_prompt(c)) for c in cs]


def instruction_questions(ins: list[Instruction]) -> list[Question]:
    return [_q(i.qid, i.text) for i in ins]


@dataclass
class Rollouts:
    """Samples per concept prompt and per instruction, and each instruction's greedy
    unsteered answer (the judge's baseline)."""

    concept: dict[str, list[str]]  # concept name -> responses to "write about it"
    instruction: dict[str, list[str]]  # instruction qid -> responses
    baseline: dict[str, str]  # instruction qid -> greedy unsteered answer


def sample_rollouts(
    cs: list[Concept],
    ins: list[Instruction],
    pool,
    n: int = 4,
    temperature: float = 0.8,
    top_p: float = 0.9,
    max_tokens: int = 64,
    seed: int = 42,
    shard: int = 16,
) -> Rollouts:
    """One job set on ``pool`` (an open ``WorkerPool``): sampled answers to every concept
    prompt and instruction, greedy answers to every instruction."""
    cq, iq = concept_questions(cs), instruction_questions(ins)
    jobs: list[tuple[Any, str, tuple]] = []
    for k in range(0, len(cq), shard):
        jobs.append(
            (("c", k), "sample", ("concept", cq[k : k + shard], n, temperature, top_p, max_tokens, seed))
        )
    for k in range(0, len(iq), shard):
        jobs.append(
            (("i", k), "sample", ("concept", iq[k : k + shard], n, temperature, top_p, max_tokens, seed))
        )
        jobs.append((("g", k), "greedy", ("concept", iq[k : k + shard], max_tokens)))
    by_name = {c.qid: c.name for c in cs}
    out = Rollouts({c.name: [] for c in cs}, {i.qid: [] for i in ins}, {})
    for (kind, _), records in pool.run(jobs):
        for r in records:
            if kind == "c":
                out.concept[by_name[r["qid"]]].append(r["response"])
            elif kind == "i":
                out.instruction[r["qid"]].append(r["response"])
            else:
                out.baseline[r["qid"]] = r["response"]
    return out


@dataclass
class Labels:
    """The judge's verdict on the rollouts (ROAST's verifier)."""

    threshold: float
    balanced_accuracy: float
    #: ``{concept: {instruction qid: (on-concept responses, off-concept responses)}}``
    pairs: dict[str, dict[str, tuple[list[str], list[str]]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def label_rollouts(
    judge,
    cs: list[Concept],
    ins: list[Instruction],
    ro: Rollouts,
    tune: Collection[str] | None = None,
) -> Labels:
    """Score every concept rollout and instruction rollout against every (concept,
    instruction) pair's baseline with ``judge`` (a ``ConceptJudge``: its calibrated concept
    score), choose the threshold on the concepts named in ``tune`` (default: all), and
    keep the verified texts per pair. Each text and description is embedded once."""
    from roast_vllm.tasks.concept_judge import best_threshold, concept_score

    texts = list(
        dict.fromkeys(
            [*(y for v in ro.concept.values() for y in v), *(y for v in ro.instruction.values() for y in v)]
            + list(ro.baseline.values())
        )
    )
    row = {t: k for k, t in enumerate(texts)}
    sims = judge.judge.embed(texts) @ judge.judge.embed([c.description for c in cs]).T  # [texts, concepts]
    on_scores: dict[tuple[str, str], list[float]] = {}
    off_scores: dict[tuple[str, str], list[float]] = {}
    for j, c in enumerate(cs):
        for i in ins:
            base = float(sims[row[ro.baseline[i.qid]], j])
            on_scores[c.name, i.qid] = [
                concept_score(float(sims[row[y], j]), base) for y in ro.concept[c.name]
            ]
            off_scores[c.name, i.qid] = [
                concept_score(float(sims[row[y], j]), base) for y in ro.instruction[i.qid]
            ]
    chosen = set(tune) if tune is not None else {c.name for c in cs}
    threshold, _ = best_threshold(
        [s for (c, _), v in on_scores.items() if c in chosen for s in v],
        [s for (c, _), v in off_scores.items() if c in chosen for s in v],
    )
    on = [s > threshold for v in on_scores.values() for s in v]
    off = [s <= threshold for v in off_scores.values() for s in v]
    lab = Labels(threshold, 0.5 * (sum(on) / max(len(on), 1) + sum(off) / max(len(off), 1)))
    kept_on = kept_off = 0
    for c in cs:
        lab.pairs[c.name] = {}
        for i in ins:
            pos = [y for y, s in zip(ro.concept[c.name], on_scores[c.name, i.qid]) if s > threshold]
            neg = [y for y, s in zip(ro.instruction[i.qid], off_scores[c.name, i.qid]) if s <= threshold]
            lab.pairs[c.name][i.qid] = (pos, neg)
            kept_on += len(pos)
            kept_off += len(neg)
    lab.counts = {"on_kept": kept_on, "on_total": len(on), "off_kept": kept_off, "off_total": len(off)}
    return lab


def roast_vectors(
    cs: list[Concept], ins: list[Instruction], labels: Labels, opts, engine, pool, progress: bool = False
) -> dict[str, SteeringVector]:
    """One ROAST (or, with ``opts.method="caa"``, mean-difference) vector per concept from
    its verified pairs; a concept without a pair is left out (and says so in the result's
    absence). ``opts``: ``EstimateOptions`` (fallbacks are forced off: concept questions
    have no gold answers)."""
    from tqdm import tqdm

    from roast_vllm.methods.estimate import estimate_from_rollouts

    opts = replace(opts, gold_fallback=False, wrong_fallback=False)
    text = {i.qid: i.text for i in ins}
    out = {}
    label = f"{opts.method} {opts.site}{'' if opts.grouped else ' ungrouped'} vectors"
    for c in tqdm(cs, desc=label, unit="concept", disable=not progress):
        questions, rollouts = [], []
        for iq, (pos, neg) in labels.pairs[c.name].items():
            if not pos or not neg:
                continue
            qid = f"{c.name}|{iq}"
            questions.append(_q(qid, text[iq]))
            rollouts += [{"qid": qid, "response": y, "correct": True} for y in pos]
            rollouts += [{"qid": qid, "response": y, "correct": False} for y in neg]
        if not questions:
            continue
        prov = {"concept": c.name, "threshold": labels.threshold, "instructions": len(questions)}
        out[c.name] = estimate_from_rollouts(
            questions, rollouts, opts, engine, pool, provenance=prov, progress=progress
        )
    return out


def capture_prompts(w, questions: list[Question], layers: list[int]) -> dict:
    """Job: the sum over ``questions`` of each prompt's residual stream averaged over its
    user-message positions onward (after the chat template's shared header),
    ``{"sum": [len(layers), H] fp32, "n": N}`` (nothing per prompt leaves the worker)."""
    from roast_vllm.engine.capture import capture_activations
    from roast_vllm.runtime.jobs import prompt_ids

    seqs = [prompt_ids(w.tok, q) for q in questions]
    # the header: the tokens every chat prompt starts with (system prompt, user turn start)
    probe = prompt_ids(w.tok, _q("", "\u2588"))
    starts = []
    for ids in seqs:
        k = 0
        while k < min(len(ids), len(probe)) - 1 and ids[k] == probe[k]:
            k += 1
        starts.append(k)
    acts = capture_activations(w.llm, seqs, layers, ["residual"], starts=starts, progress=False)["residual"]
    return {"sum": acts.float().sum(1), "n": len(questions)}


CAPTURE_PROMPTS = "roast_vllm.methods.concept:capture_prompts"


def caa_vectors(
    cs: list[Concept],
    ins: list[Instruction],
    pool,
    num_layers: int,
    layers: list[int] | None = None,
    model_id: str = "",
) -> dict[str, SteeringVector]:
    """CAA per concept: mean last-prompt-token residual of ``prompting_baseline(c, i)``
    over the instructions minus that of the plain instructions. One job set."""
    layers = list(range(num_layers)) if layers is None else list(layers)
    jobs = [("plain", CAPTURE_PROMPTS, (instruction_questions(ins), layers))]
    for c in cs:
        laden = [_q(f"{c.name}|{i.qid}", prompting_baseline(c, i.text)) for i in ins]
        jobs.append((c.name, CAPTURE_PROMPTS, (laden, layers)))
    means = {k: r["sum"] / r["n"] for k, r in pool.run(jobs)}
    out = {}
    for c in cs:
        diff = means[c.name] - means["plain"]
        out[c.name] = SteeringVector(
            directions={l: diff[j].clone() for j, l in enumerate(layers)},
            num_layers=num_layers,
            model_id=model_id,
            method="caa",
            provenance={
                "concept": c.name,
                "source": "concept-laden prompts - plain instructions",
                "prompts": len(ins),
            },
        )
    return out
