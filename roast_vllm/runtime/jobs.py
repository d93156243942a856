"""The jobs an ``EngineWorker`` runs (``WorkerPool.run(..., fn="<name>", args)``).

Each takes the worker first and returns plain data, so it runs the same in-process and on
a Ray actor. Prompts are token ids built by ``prompt_ids`` (the model's chat template),
the same for rollouts, capture and evaluation, so ``q ⊕ r`` is teacher-forced exactly as
the model saw ``q``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from roast_vllm.tasks import Question, get_task


def prompt_ids(tok, q: Question) -> list[int]:
    """Chat-template token ids of the question, ending with the assistant turn's start."""
    text = tok.apply_chat_template(q.messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def response_ids(tok, response: str) -> list[int]:
    return tok(response, add_special_tokens=False).input_ids


def sample_seed(seed: int, qid: str, j: int) -> int:
    """Per-sample seed: the same sample whatever shard, worker or batch it runs in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{qid}:{j}".encode()).digest()[:4], "big")


def _steer_args(steer: dict[str, Any] | None, prompt_len: int | None = None) -> dict[str, Any] | None:
    if not steer:
        return None
    out = {k: v for k, v in steer.items() if v is not None}
    if prompt_len is not None:  # scoring: the continuation is part of the prompt
        out.pop("steer_positions", None)
        out["steer_start"] = max(prompt_len - 1, 0)
    return out


def sample(
    w,
    task: str,
    questions: list[Question],
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
    steer: dict[str, Any] | None = None,
) -> list[dict]:
    """``n`` sampled responses per question, verified (optionally steered: ``steer`` holds
    ``steer_*`` request keys). One record per response."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t = get_task(task)
    prompts, params, keys = [], [], []
    for q in questions:
        ids = prompt_ids(w.tok, q)
        for j in range(n):
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    n=1,
                    temperature=temperature,
                    top_p=top_p,
                    max_tokens=max_tokens,
                    seed=sample_seed(seed, q.qid, j),
                    extra_args=_steer_args(steer),
                )
            )
            keys.append((q, j))
    outs = w.llm.generate(prompts, params, use_tqdm=False)
    records = []
    for (q, j), o in zip(keys, outs):
        c = o.outputs[0]
        answer = t.extract(c.text, q)
        records.append(
            {
                "qid": q.qid,
                "sample": j,
                "prompt": q.messages[-1]["content"],
                "response": c.text,
                "answer": answer,
                "gold": q.gold,
                "correct": bool(t.verify(q, c.text)) if t.has_verifier else None,
                "prompt_tokens": len(o.prompt_token_ids),
                "completion_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
                "seed": sample_seed(seed, q.qid, j),
            }
        )
    return records


def capture(
    w, seqs: list[list[int]], layers: list[int], sites: list[str], starts: list[int] | None = None
) -> dict:
    """Last-token activations of ``seqs`` (with ``starts``: each sequence's mean over its
    positions ``starts[i] ..``): ``{site: Tensor[len(layers), N, dim]}``."""
    from roast_vllm.engine.capture import capture_activations

    return capture_activations(w.llm, seqs, layers, sites, progress=False, starts=starts)


#: how a text's activation is taken: its last token (ROC) or the mean over its response
POOLINGS = ("last", "response_mean")


def capture_texts(
    w, items: list[tuple[Question, str]], layers: list[int], sites: list[str], pooling: str = "last"
) -> dict:
    """Capture ``prompt(q) ⊕ response`` for each ``(q, response)``, pooled as ``pooling``
    says (``POOLINGS``): the worker's own ``capture_texts`` (an engine's, or a stand-in's)."""
    return w.capture_texts(items, layers, sites, pooling)


def greedy(
    w, task: str, questions: list[Question], max_tokens: int, steer: dict[str, Any] | None = None
) -> list[dict]:
    """Greedy answer per question, verified (optionally steered)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t = get_task(task)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=_steer_args(steer))
    outs = w.llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids(w.tok, q)) for q in questions], sp, use_tqdm=False
    )
    res = []
    for q, o in zip(questions, outs):
        text = o.outputs[0].text
        res.append(
            {"qid": q.qid, "response": text, "answer": t.extract(text, q), "correct": bool(t.verify(q, text))}
        )
    return res


def loglik(
    w, items: list[tuple[Question, list[str]]], steer: dict[str, Any] | None = None
) -> list[list[float]]:
    """Sum of log p(answer | question) for each answer of each ``(question, answers)``.

    The context is the question alone in the chat template (no options), the answer is the
    assistant's reply; steering (if any) starts at the context's last token, as it would
    when the model generates the answer.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params, spans = [], [], []
    for q, answers in items:
        ctx = prompt_ids(
            w.tok, Question(q.qid, q.question, [{"role": "user", "content": q.question}], "", "", [])
        )
        for a in answers:
            ids = ctx + response_ids(w.tok, a)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=_steer_args(steer, len(ctx)))
            )
            spans.append((len(ctx), len(ids)))
    outs = w.llm.generate(prompts, params, use_tqdm=False)
    flat = []
    for (lo, hi), o in zip(spans, outs):
        lps = o.prompt_logprobs
        ids = o.prompt_token_ids
        flat.append(sum(lps[i][ids[i]].logprob for i in range(lo, hi)) if hi > lo else -math.inf)
    out, k = [], 0
    for _, answers in items:
        out.append(flat[k : k + len(answers)])
        k += len(answers)
    return out
