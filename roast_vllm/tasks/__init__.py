"""Evaluation tasks: questions, prompts and answer verifiers.

A task turns a data file into ``Question`` objects (chat messages plus gold answers) and
labels a model response correct or incorrect. ROAST uses the verifier to sort rollouts
into positives and negatives; the evaluation uses it to score accuracy.

Adding a task: write one small module with a ``Task`` subclass and add it to
``_REGISTRY`` below.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: task name -> (module, class); modules load on first use.
_REGISTRY: dict[str, tuple[str, str]] = {
    "gsm8k": ("roast_vllm.tasks.gsm8k", "GSM8K"),
    "truthfulqa_mc": ("roast_vllm.tasks.truthfulqa", "TruthfulQAMC"),
    "prompts": ("roast_vllm.tasks.prompts", "Prompts"),
    "concept": ("roast_vllm.tasks.concept", "ConceptTask"),
}

TASKS: tuple[str, ...] = tuple(_REGISTRY)


class DataError(ValueError):
    """A task data file is empty or has a malformed line/row."""


@dataclass
class Question:
    """One question of a task, ready to prompt and to verify against."""

    qid: str
    """Stable id ``f"{task}-{row:05d}"`` (0-based row of the data file)."""
    question: str
    messages: list[dict]
    """Chat messages for the model's chat template."""
    gold: str
    """gsm8k: normalized gold number; truthfulqa_mc: gold letter."""
    gold_response: str
    """The gold answer formatted like a model response (ROAST's fallback positive)."""
    wrong_responses: list[str]
    """Known-wrong answers formatted like responses (ROAST's fallback negatives)."""
    choices: list[str] = field(default_factory=list)
    correct_answers: list[str] = field(default_factory=list)
    incorrect_answers: list[str] = field(default_factory=list)
    best_answer: str = ""


def chat_prompts(tok, prompts: list[str]) -> list[str]:
    """Plain user prompts wrapped in the tokenizer's chat template, ending with the
    assistant turn's start (as the model sees a question)."""
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


class Task:
    """Base class of a task: load questions, extract and verify answers."""

    name: str = ""
    default_max_tokens: int = 256
    has_verifier: bool = True
    """False for tasks whose responses are not graded (``correct`` is None)."""

    def load(self, path: str | Path, limit: int | None = None) -> list[Question]:
        """The first ``limit`` questions (all if None) of the data file at ``path``."""
        raise NotImplementedError

    def extract(self, response: str, q: Question | None = None) -> str | None:
        """The answer ``response`` gives, or None. ``q`` enables question-aware rules."""
        raise NotImplementedError

    def verify(self, q: Question, response: str) -> bool:
        """Whether ``response`` answers ``q`` correctly."""
        raise NotImplementedError

    def qid(self, row: int) -> str:
        return f"{self.name}-{row:05d}"


def get_task(name: str) -> Task:
    """A fresh instance of the task called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def split(questions: Sequence[Question], fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic disjoint split: ``(about fraction of questions, the rest)``.

    Membership depends only on ``seed`` and the qid (sha256), so a question lands in the
    same part whatever ``limit`` or subset it was loaded with. Input order is kept.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split fraction must be in [0, 1], got {fraction}")
    first: list = []
    rest: list = []
    for q in questions:
        digest = hashlib.sha256(f"{seed}:{q.qid}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        (first if u < fraction else rest).append(q)
    return first, rest


def data_hash(path: str | Path) -> str:
    """sha256 hex digest of the file's bytes (records which data a result came from)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_answers(text: str) -> list[str]:
    """TruthfulQA-style ``"a; b; c;"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [a.strip() for a in text.split(";") if a.strip()]


def _check(path: str | Path, limit: int | None) -> Path:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions or None, got {limit}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    return p


def read_jsonl(
    path: str | Path, fields: Sequence[str], limit: int | None = None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield ``(row, "file:line", record)`` for the first ``limit`` JSON lines.

    Blank lines are skipped and not counted as rows. Every record must be an object whose
    ``fields`` are non-empty strings.
    """
    p = _check(path, limit)
    row = 0
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and row >= limit:
                return
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for name in fields:
                if not isinstance(rec.get(name), str) or not rec[name].strip():
                    raise DataError(f"{where}: missing or empty field {name!r}")
            yield row, where, rec
            row += 1
    if row == 0:
        raise DataError(f"{p}: no records (empty file)")


def read_csv(
    path: str | Path, fields: Sequence[str], limit: int | None = None
) -> Iterator[tuple[int, str, dict[str, str]]]:
    """Yield ``(row, "file:line", record)`` for the first ``limit`` CSV rows after the header.

    The header must name every field in ``fields``, and each row must give them non-empty.
    """
    p = _check(path, limit)
    row = 0
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is None:
            raise DataError(f"{p}: no header and no rows (empty file)")
        missing = [name for name in fields if name not in header]
        if missing:
            raise DataError(f"{p}:1: header lacks column(s) {missing}; it has {header}")
        for rec in reader:
            if limit is not None and row >= limit:
                return
            where = f"{p}:{reader.line_num}"  # the row's last line (rows may span lines)
            for name in fields:
                if not (rec.get(name) or "").strip():
                    raise DataError(f"{where}: missing or empty field {name!r}")
            yield row, where, rec
            row += 1
    if row == 0:
        raise DataError(f"{p}: header but no rows (empty file)")


def select(
    task: str | Task,
    data: str | Path,
    part: str = "all",
    fraction: float = 0.5,
    seed: int = 0,
    limit: int | None = None,
) -> list[Question]:
    """Load ``data`` (first ``limit`` rows) and keep one part of the disjoint split:
    ``all``, ``a`` (about ``fraction`` of the questions: estimate and tune here) or ``b``
    (the rest: report here)."""
    t = get_task(task) if isinstance(task, str) else task
    qs = t.load(data, limit)
    if part == "all":
        return qs
    if part not in ("a", "b"):
        raise ValueError(f"split part must be 'all', 'a' or 'b', got {part!r}")
    a, b = split(qs, fraction, seed)
    return a if part == "a" else b
