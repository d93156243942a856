"""Concept vectors for the concept-steering benchmark (``roast_vllm.tasks.concept``): ROAST
from the model's own rollouts and CAA from prompts, for every concept, on the workers.

**ROAST.** For concept ``c`` and each (part a) instruction ``i``: the model's own answers
to "write about c" (:func:`~roast_vllm.tasks.concept.concept_prompt`) that the judge finds
on-concept (calibrated concept score ``> t``, baseline: the unsteered greedy answer to
``i``) are the positives; its own answers to ``i`` that the judge finds off-concept
(``<= t``) are the negatives. Both are captured as responses to ``i`` (teacher-forced
after ``i``'s prompt), so a pair differs in its content, not its prompt, and estimated as
today (:class:`~roast_vllm.methods.estimate.Estimates`: CSS, grouped by instruction or not,
either site, each text at its last token as ROC takes it or, a variant, averaged over its
response tokens). ``t`` is the cut on the concept score that best
separates concept-prompt rollouts from instruction rollouts on the concepts given
(:func:`~roast_vllm.tasks.concept_judge.best_threshold`; part a's concepts when tuning).

**CAA.** The mean residual activation over the user-message tokens of concept-laden
prompts (:func:`~roast_vllm.tasks.concept.prompting_baseline`: the instruction with a
request to weave the concept in) minus that over the plain instructions' (Rimsky et al.'s
mean difference, pooled over tokens as AxBench's DiffMean; the last token alone is
dominated by the shared "weave in a topic" request: CAA vectors of different concepts
were 0.97 cosine-similar that way).

All rollouts (every concept's and every instruction's samples and the greedy baselines)
are one job set on the pool's workers; every concept's ROAST captures (each text captured
once for all ROAST variants that share a pooling) and CAA's prompt captures are a second
one (``concept_vectors``): the captures need the judge's labels of the rollouts.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from roast_vllm.tasks import Question
from roast_vllm.tasks.concept import Concept, Instruction, concept_prompt, prompting_baseline
from roast_vllm.vector import SteeringVector

#: the concept benchmark's vector families (``roast-vllm concept vectors --methods``):
#: name -> ``EstimateOptions`` fields of a ROAST estimate, or None for CAA from prompts
FAMILIES = {
    "roast": {"method": "roast", "site": "mlp_act", "grouped": True},
    "roast_ungrouped": {"method": "roast", "site": "mlp_act", "grouped": False},
    "roast_residual": {"method": "roast", "site": "residual", "grouped": True},
    "roast_residual_ungrouped": {"method": "roast", "site": "residual", "grouped": False},
    # token-mean pooling of each text (as CAA's prompts and AxBench's DiffMean pool)
    # instead of ROC's last token: a variant, not the paper's
    "roast_mean": {"method": "roast", "site": "mlp_act", "grouped": True, "pooling": "response_mean"},
    "roast_residual_mean": {
        "method": "roast",
        "site": "residual",
        "grouped": True,
        "pooling": "response_mean",
    },
    "caa": None,
}


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


def pair_sets(
    cs: list[Concept], ins: list[Instruction], labels: Labels
) -> dict[str, tuple[list[Question], list[dict]]]:
    """Each concept's verified pairs as an estimation set ``(questions, rollouts)``: one
    question per instruction with both on- and off-concept texts (``qid`` =
    ``"concept|instruction"``); a concept without any is left out."""
    text = {i.qid: i.text for i in ins}
    sets = {}
    for c in cs:
        questions, rollouts = [], []
        for iq, (pos, neg) in labels.pairs[c.name].items():
            if not pos or not neg:
                continue
            qid = f"{c.name}|{iq}"
            questions.append(_q(qid, text[iq]))
            rollouts += [{"qid": qid, "response": y, "correct": True} for y in pos]
            rollouts += [{"qid": qid, "response": y, "correct": False} for y in neg]
        if questions:
            sets[c.name] = (questions, rollouts)
    return sets


def concept_vectors(
    cs: list[Concept],
    ins: list[Instruction],
    labels: Labels,
    methods: dict[str, Any],
    engine,
    pool,
    caa_layers: list[int] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, SteeringVector]]:
    """Every concept's vector of every method, ``{method: {concept: SteeringVector}}``,
    from one job set on ``pool`` (an open ``WorkerPool``).

    ``methods``: name -> ``EstimateOptions`` (ROAST from the verified pairs; fallbacks are
    forced off: concept questions have no gold answers) or None (CAA from prompts,
    ``caa_layers``). ROAST methods that share pairs and captures (``estimate.SHARED``)
    share one capture per text (``Estimates``); every concept's capture-and-reduce jobs
    and CAA's prompt captures go to the workers together. A concept without a verified
    pair has no ROAST vector.
    """
    from tqdm import tqdm

    from roast_vllm.engine.model_prep import default_model, model_dims
    from roast_vllm.methods.estimate import SHARED, Estimates

    sets = pair_sets(cs, ins, labels)
    groups: dict[tuple, dict] = {}
    for name, opts in methods.items():
        if opts is not None:
            opts = replace(opts, gold_fallback=False, wrong_fallback=False)
            groups.setdefault(tuple(str(getattr(opts, f)) for f in SHARED), {})[name] = opts
    ests = [Estimates(sets, variants, engine, index=k) for k, variants in enumerate(groups.values())]
    jobs = [j for e in ests for j in e.jobs]
    caa = [name for name, opts in methods.items() if opts is None]
    model = engine.model or default_model()
    num_layers = model_dims(model)["num_layers"]
    layers = list(range(num_layers)) if caa_layers is None else list(caa_layers)
    if caa:
        jobs += caa_jobs(cs, ins, layers)
    means = {}
    for key, result in tqdm(
        pool.run(jobs), total=len(jobs), desc="concept vectors", unit="job", disable=not progress
    ):
        est = next((e for e in ests if e.owns(key)), None)
        if est is not None:
            est.add(key, result)
        else:
            means[key[1]] = result["sum"] / result["n"]
    out: dict[str, dict[str, SteeringVector]] = {}
    prov = {c: {"concept": c, "threshold": labels.threshold, "instructions": len(sets[c][0])} for c in sets}
    for e in ests:
        out.update(e.vectors(prov))
    for name in caa:
        out[name] = caa_from_means(cs, means, layers, num_layers, str(model), len(ins))
    return {name: out[name] for name in methods}


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


def caa_jobs(cs: list[Concept], ins: list[Instruction], layers: list[int]) -> list[tuple]:
    """CAA's prompt captures: the plain instructions and, per concept, the concept-laden
    ones (``prompting_baseline``); keys ``("caa", "plain" | concept name)``."""
    jobs = [(("caa", "plain"), CAPTURE_PROMPTS, (instruction_questions(ins), layers))]
    for c in cs:
        laden = [_q(f"{c.name}|{i.qid}", prompting_baseline(c, i.text)) for i in ins]
        jobs.append((("caa", c.name), CAPTURE_PROMPTS, (laden, layers)))
    return jobs


def caa_from_means(
    cs: list[Concept], means: dict[str, Any], layers: list[int], num_layers: int, model_id: str, prompts: int
) -> dict[str, SteeringVector]:
    """CAA per concept from ``caa_jobs``' means ``[len(layers), H]``: the concept-laden
    prompts' token-mean residual minus the plain instructions'."""
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
                "prompts": prompts,
            },
        )
    return out
