"""``concept``: concept steering, as steering methods are compared today (AxBench, Wu et
al. 2025): steer generation toward a concept while the model answers an unrelated
instruction; judge concept presence, instruction relevance and fluency.

* **Concepts**: ``roast_vllm/data/concepts.json``, 40 concepts written for this project,
  each a name and a one-sentence description (what the judge compares outputs with).
* **Instructions**: real questions from the project's data files, unrelated to the
  concepts — GSM8K word problems and TruthfulQA questions, alternating — asked as they are.
* **Splits**: disjoint by concept *and* by instruction (``part="a"`` to estimate and tune,
  ``"b"`` to report); membership hashes the concept name / instruction id with the seed
  (:func:`roast_vllm.tasks.split`), so it does not depend on ``limit``.

A :class:`Question` of this task is one concept x instruction pair: its chat messages ask
the instruction, ``gold`` is the concept's name, and the concept rides in ``choices``
(``[name, description]``). The task has no built-in verifier: the judge
(:mod:`roast_vllm.tasks.concept_judge`) grades outputs; ROAST's rollouts are labelled by the
judge's concept score thresholded on part a.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from roast_vllm.tasks import Question, Task, read_csv, read_jsonl, split

CONCEPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "concepts.json"
GSM8K_FILE = "gsm8k_train.jsonl"
TRUTHFULQA_FILE = "truthfulqa_dev.csv"


@dataclass(frozen=True)
class Concept:
    name: str
    description: str

    @property
    def qid(self) -> str:
        return f"concept-{self.name}"


@dataclass(frozen=True)
class Instruction:
    qid: str  # "gsm8k-00012" / "truthfulqa-00007": source and row
    text: str


def concepts(part: str = "all", seed: int = 0, path: str | Path = CONCEPTS_FILE) -> list[Concept]:
    """The concepts (file order), or one part of their disjoint split."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    out = [Concept(c["name"], c["description"]) for c in raw]
    if len({c.name for c in out}) != len(out):
        raise ValueError(f"{path}: concept names must be unique")
    return _part(out, part, seed)


def instructions(
    data_dir: str | Path | None = None, part: str = "all", limit: int | None = None, seed: int = 0
) -> list[Instruction]:
    """GSM8K and TruthfulQA questions, alternating (the first ``limit`` of the merged list,
    all if None), or one part of their disjoint split."""
    from roast_vllm.envs import data_dir as default_dir

    d = Path(data_dir) if data_dir is not None else default_dir()
    n = None if limit is None else limit  # each source gives at most ``limit``
    gsm = [
        Instruction(f"gsm8k-{row:05d}", rec["question"].strip())
        for row, _, rec in read_jsonl(d / GSM8K_FILE, ("question",), n)
    ]
    tqa = [
        Instruction(f"truthfulqa-{row:05d}", rec["Question"].strip())
        for row, _, rec in read_csv(d / TRUTHFULQA_FILE, ("Question",), n)
    ]
    merged = [x for pair in zip(gsm, tqa) for x in pair] + gsm[len(tqa) :] + tqa[len(gsm) :]
    if limit is not None:
        merged = merged[:limit]
    return _part(merged, part, seed)


def _part(items: list, part: str, seed: int) -> list:
    if part == "all":
        return items
    if part not in ("a", "b"):
        raise ValueError(f"split part must be 'all', 'a' or 'b', got {part!r}")
    a, b = split(items, 0.5, seed)  # by .qid: the concept's name, the instruction's source row
    return a if part == "a" else b


def pairs(cs: list[Concept], ins: list[Instruction]) -> list[Question]:
    """Every concept x instruction as a :class:`Question` (see the module docstring)."""
    return [
        Question(
            qid=f"{c.name}|{i.qid}",
            question=i.text,
            messages=[{"role": "user", "content": i.text}],
            gold=c.name,
            gold_response="",
            wrong_responses=[],
            choices=[c.name, c.description],
        )
        for c in cs
        for i in ins
    ]


def concept_prompt(c: Concept) -> str:
    """Asking the model to write about the concept (ROAST's on-concept rollouts)."""
    return f"Write a short paragraph about {c.name}: {c.description[0].lower()}{c.description[1:]}"


def prompting_baseline(c: Concept, instruction: str) -> str:
    """The instruction with a request to weave the concept in (AxBench's prompting
    baseline, the bar a steering vector is measured against)."""
    return f"{instruction}\n\nIn your answer, weave in the topic of {c.name} ({c.description[0].lower()}{c.description[1:]})"


class ConceptTask(Task):
    """``roast-vllm eval --task concept``: concept x instruction pairs from the data folder
    (``load(path)`` takes that folder; ``limit`` bounds the instructions)."""

    name = "concept"
    default_max_tokens = 64
    has_verifier = False

    def load(self, path: str | Path, limit: int | None = None) -> list[Question]:
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        return pairs(concepts(), instructions(folder, limit=limit))

    def extract(self, response: str, q: Question | None = None) -> str | None:
        return None

    def verify(self, q: Question, response: str) -> bool | None:
        return None
