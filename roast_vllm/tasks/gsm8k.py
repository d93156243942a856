"""GSM8K: grade-school math; a response is correct when its final number equals the gold.

Data: JSON lines ``{"question", "answer"}``; the answer is a worked solution with
``<<a*b=c>>`` calculator annotations, ending with ``#### <number>``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from roast_vllm.tasks import DataError, Question, Task, read_jsonl

INSTRUCTION = "Solve the problem step by step. End your answer with a line of the form '#### <number>'."

#: A number as written in prose: optional sign (not after a word character, so the "-"
#: of "5-3" is an operator), optional "$", thousands commas, optional decimals. A
#: trailing sentence period is not part of it ("18." -> 18).
_NUMBER = re.compile(r"(?<![\w.])(-)?\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_MARK = "####"


def normalize_number(text: str) -> str | None:
    """Canonical string of the first number in ``text``: ``"$1,234.50"`` -> ``"1234.5"``,
    ``"72.0"`` -> ``"72"``; None when there is no number."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    sign, digits, frac = m.group(1) or "", m.group(2).replace(",", ""), m.group(3) or ""
    try:
        d = Decimal(sign + digits + frac)
    except InvalidOperation:  # pragma: no cover - the regex only admits valid numbers
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def last_number(text: str) -> str | None:
    """Canonical string of the last number in ``text`` (None if there is none)."""
    matches = list(_NUMBER.finditer(text))
    return normalize_number(matches[-1].group(0)) if matches else None


def _equal(a: str, b: str) -> bool:
    return abs(Decimal(a) - Decimal(b)) <= Decimal("1e-6")


class GSM8K(Task):
    """Free-form math answers, verified by the final number."""

    name = "gsm8k"
    default_max_tokens = 256

    def load(self, path: str | Path, limit: int | None = None) -> list[Question]:
        out = []
        for row, where, rec in read_jsonl(path, ("question", "answer"), limit):
            answer = rec["answer"]
            if _MARK not in answer:
                raise DataError(f"{where}: field 'answer' has no '#### <number>' line")
            gold = normalize_number(answer.rsplit(_MARK, 1)[1])
            if gold is None:
                raise DataError(f"{where}: no number after '####' in field 'answer'")
            question = rec["question"].strip()
            out.append(
                Question(
                    qid=self.qid(row),
                    question=question,
                    messages=[{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}],
                    gold=gold,
                    gold_response=_ANNOTATION.sub("", answer).strip(),
                    wrong_responses=[],
                )
            )
        return out

    def extract(self, response: str, q: Question | None = None) -> str | None:
        """The first number after the last ``####``; failing that, the last number."""
        if _MARK in response:
            found = normalize_number(response.rsplit(_MARK, 1)[1])
            if found is not None:
                return found
        return last_number(response)

    def verify(self, q: Question, response: str) -> bool:
        found = self.extract(response, q)
        return found is not None and _equal(found, q.gold)
