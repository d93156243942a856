"""``prompts``: plain prompts for bulk rollouts, with no verifier.

Data: JSON lines with a ``prompt`` field (optional ``id``, used as the question id). Every
response's ``correct`` is None: the rollout is the product (distillation data, steered
samples, throughput runs).
"""

from __future__ import annotations

from pathlib import Path

from roast_vllm.tasks import Question, Task, read_jsonl


class Prompts(Task):
    name = "prompts"
    default_max_tokens = 256
    has_verifier = False

    def load(self, path: str | Path, limit: int | None = None) -> list[Question]:
        out = []
        for row, _, rec in read_jsonl(path, ("prompt",), limit):
            qid = str(rec.get("id", self.qid(row)))
            text = rec["prompt"]
            out.append(Question(qid, text, [{"role": "user", "content": text}], "", "", []))
        if len({q.qid for q in out}) != len(out):
            raise ValueError(f"{path}: duplicate 'id' values; ids must be unique")
        return out

    def extract(self, response: str, q: Question | None = None) -> str | None:
        return None

    def verify(self, q: Question, response: str) -> bool | None:
        return None
