"""Fusion Steering (``../shared/METHODS.md``): prompt-specific injection at every layer.

For one prompt with reference vectors ``r [L, H]`` (the reference text's residual stream
after each layer, averaged over its answer-and-explanation positions) and one coefficient
per layer ``c_l = alpha_seg(l) * gamma_seg(l)`` (only the product matters), at layer ``l``
and position ``p``, with ``x_l(p)`` the layer's output *before* its own injection::

    cached   (a serving engine's; this module's reference of it)
             m_l(p) = (1 / (p + 1)) * sum_{q <= p} x_l(q)       running mean, prompt and
             h_l(p) = x_l(p) + c_l * (r_l - m_l(p))              generated positions alike
    uncached (the authors': every step re-reads the whole sequence, no KV cache)
             m_l    = mean over all T positions of x_l
             h_l(p) = x_l(p) + c_l * (r_l - m_l)                 at every position

Cached, position ``p``'s delta is fixed once ``p`` is computed (a KV cache keeps it);
uncached, every step moves the mean and so every earlier position's delta too. The two
agree at ``c = 0`` and for a one-token sequence.

``skip_first`` (an option METHODS.md leaves open): position 0 is neither counted in
``m_l`` nor injected. Its residual stream is the model's attention sink, far larger than
the rest, so with it ``r_l - m_l`` carries ``-x_l(0) / (p + 1)``.

Here: the coefficients (full-layer or segmented by thirds), the prompts of METHODS.md,
the overlap metric and search objective, and the transformers forward-hook reference of
both semantics that the engine is checked against. Sums run in fp32.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from roast_vllm.engine.spec import segment_of
from roast_vllm.methods.hf import (
    decoder_layers,
    forward_hooks,
    greedy_reference,
    output_tensor,
    with_output_tensor,
)

SEMANTICS = ("cached", "uncached")
REFS_FORMAT = "roast_vllm.fusion_references/1"
EXPLANATION_MARKER = "Explanation:"


# ------------------------------------------------------------------ coefficients
def coefficients(
    alpha: float | Sequence[float], gamma: float | Sequence[float], num_layers: int
) -> list[float]:
    """``c_l`` for each layer: full-layer (``alpha``, ``gamma`` numbers) or segmented
    (3 each: early / middle / late thirds, ``spec.segment_of``). ``[num_layers]``."""
    a = [float(alpha)] * 3 if isinstance(alpha, (int, float)) else [float(x) for x in alpha]
    g = [float(gamma)] * 3 if isinstance(gamma, (int, float)) else [float(x) for x in gamma]
    if len(a) != 3 or len(g) != 3:
        raise ValueError(
            f"alpha and gamma must be numbers or 3 numbers each (thirds), got {alpha!r}, {gamma!r}"
        )
    if not all(math.isfinite(x) for x in a + g):
        raise ValueError(f"alpha and gamma must be finite, got {alpha!r}, {gamma!r}")
    return [a[segment_of(l, num_layers)] * g[segment_of(l, num_layers)] for l in range(num_layers)]


# ------------------------------------------------------------------ prompts and scores
def explanation_prompt(question: str, ground_truth: str) -> str:
    """What the model completes to explain the ground truth (METHODS.md, step 1)."""
    return f"Question: {question}\nAnswer: {ground_truth}\n{EXPLANATION_MARKER}"


def extract_explanation(text: str) -> str:
    """The text after an explanation marker if the model wrote one, else all of it."""
    _, sep, after = text.partition(EXPLANATION_MARKER)
    return (after if sep else text).strip()


def reference_text(question: str, ground_truth: str, explanation: str) -> tuple[str, str]:
    """``(prefix, answer_and_explanation)``: the reference is their concatenation, and its
    vectors average the residual stream over the second part's positions only."""
    return f"Question: {question}\nAnswer and explanation:\n", f"{ground_truth}\n{explanation}"


def generation_prompt(question: str) -> str:
    """The prompt a steered request answers."""
    return f"Question: {question}\nAnswer and explanation:"


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation removed (``"U.S.-born"`` -> us, born)."""
    return _WORD.findall(text.lower().replace(".", "").replace("'", ""))


def overlap(output: str, ground_truth: str) -> float:
    """Fraction of the ground truth's word tokens found among the output's (0 if the
    ground truth has none)."""
    gt = words(ground_truth)
    if not gt:
        return 0.0
    seen = set(words(output))
    return sum(w in seen for w in gt) / len(gt)


def objective(overlap_value: float, ppl: float) -> float:
    """The per-prompt search objective ``0.7 * overlap - 0.3 * min(PPL / 100, 1)``; a
    non-finite PPL counts as the worst fluency."""
    fluency_penalty = min(ppl / 100.0, 1.0) if math.isfinite(ppl) else 1.0
    return 0.7 * overlap_value - 0.3 * fluency_penalty


def perplexity(token_logprobs: Sequence[float]) -> float:
    """``exp(-mean log p)`` of the generated tokens under the model that wrote them."""
    if not token_logprobs:
        return float("inf")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


# ------------------------------------------------------------------ transformers reference
@contextmanager
def fusion_hooks(
    model, refs: torch.Tensor, coeffs: Sequence[float], semantics: str = "cached", skip_first: bool = False
):
    """Forward hooks on every decoder layer applying Fusion Steering to batch row 0.

    ``refs [L, H]``, ``coeffs [L]``. ``cached``: the hooks keep each layer's running sum
    and count across calls, so feed the sequence once (prompt in one call or in chunks,
    then one token per call with a KV cache); within a call, position ``p`` uses the mean
    up to ``p``. ``uncached``: every call is the whole sequence and uses its full mean.
    ``skip_first``: position 0 is left out of the mean and not injected."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}; use one of {SEMANTICS}")
    layers = decoder_layers(model)
    if refs.shape[0] != len(layers) or len(coeffs) != len(layers):
        raise ValueError(
            f"refs [L, H] and coeffs [L] need L = {len(layers)}, got {tuple(refs.shape)}, {len(coeffs)}"
        )
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def make_hook(l):
        def hook(_mod, _inp, out):
            h = output_tensor(out)
            x = h[0].float()  # [T, H], before this layer's injection
            T = x.shape[0]
            start = counts.get(l, 0) if semantics == "cached" else 0  # absolute position of x[0]
            pos = torch.arange(start, start + T)
            use = (pos > 0) if skip_first else torch.ones(T, dtype=torch.bool)
            xs = x * use[:, None]
            if semantics == "cached":
                prev = sums.get(l)
                csum = torch.cumsum(xs, 0) + (prev if prev is not None else 0.0)
                # positions counted up to p: 0..p, or 1..p without the first
                cnt = (pos + (0 if skip_first else 1)).clamp_min(1).to(torch.float32)
                m = csum / cnt[:, None]
                sums[l] = csum[-1]
                counts[l] = start + T
            else:
                m = xs.sum(0, keepdim=True) / max(int(use.sum()), 1)
            delta = coeffs[l] * (refs[l].float() - m) * use[:, None]
            h = h.clone()
            h[0] = (x + delta).to(h.dtype)
            return with_output_tensor(out, h)

        return hook

    with forward_hooks((layers[l], make_hook(l)) for l in range(len(layers))):
        yield


@torch.no_grad()
def fusion_greedy_hf(
    model,
    prompt_ids: list[int],
    refs: torch.Tensor,
    coeffs: Sequence[float],
    max_new_tokens: int,
    semantics: str = "cached",
    prefill_chunk: int | None = None,
    skip_first: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding under Fusion Steering. ``cached``: the prompt in chunks of
    ``prefill_chunk`` tokens (None: one call), then one token per step with a KV cache;
    ``uncached``: every step re-reads the whole sequence without a cache;
    ``skip_first``: see :func:`fusion_hooks`. Returns
    ``(token_ids, logprobs [steps, vocab])``."""
    ids = list(prompt_ids)
    out, lps = [], []
    with fusion_hooks(model, refs, coeffs, semantics, skip_first):
        if semantics == "cached":
            from transformers import DynamicCache

            cache = DynamicCache()
            step = prefill_chunk or len(ids)
            for s in range(0, len(ids), step):
                logits = model(
                    torch.tensor([ids[s : s + step]]), past_key_values=cache, use_cache=True
                ).logits
            for i in range(max_new_tokens):
                lp = torch.log_softmax(logits[0, -1].float(), -1)
                t = int(lp.argmax())
                out.append(t)
                lps.append(lp)
                if i + 1 < max_new_tokens:
                    logits = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits
        else:  # plain greedy decoding re-reads the whole sequence every step
            return greedy_reference(model, prompt_ids, max_new_tokens)
    return out, torch.stack(lps)


def reference_tokens(tok, prefix: str, answer: str) -> tuple[list[int], int]:
    """``(token ids of prefix + answer, first answer position)``: the reference vectors
    average the positions from there on (the tokens past the prefix's own tokens)."""
    n_prefix = len(tok(prefix).input_ids)
    ids = list(tok(prefix + answer).input_ids)
    if len(ids) <= n_prefix:
        raise ValueError("the answer adds no tokens to the prefix")
    return ids, n_prefix


@torch.no_grad()
def mean_residual_hf(model, ids: list[int], start: int) -> torch.Tensor:
    """``[L, H]`` fp32: the residual stream after each layer averaged over positions
    ``start ..`` of ``ids`` (the transformers reference of the engine's mean capture)."""
    got: dict[int, torch.Tensor] = {}
    layers = decoder_layers(model)

    def make(l):
        def hook(_mod, _inp, out):
            got[l] = output_tensor(out)[0, start:].float().mean(0)

        return hook

    with forward_hooks((layers[l], make(l)) for l in range(len(layers))):
        model(torch.tensor([ids]), use_cache=False)
    return torch.stack([got[l] for l in range(len(layers))])


def reference_vectors_hf(model, tok, prefix: str, answer: str) -> torch.Tensor:
    """``r [L, H]`` fp32: the residual stream after each layer averaged over the positions
    of ``answer`` in ``prefix + answer``."""
    return mean_residual_hf(model, *reference_tokens(tok, prefix, answer))


def reference_vectors(llm, token_ids: Sequence[Sequence[int]], starts: Sequence[int], **kw) -> torch.Tensor:
    """``[N, L, H]`` fp32: :func:`reference_vectors_hf` computed in the engine (an eager
    ``roast_vllm.LLM``), every sequence a one-token capture request averaging its
    positions ``starts[i] ..`` over every layer, batched like any other requests."""
    from roast_vllm.engine.capture import capture_activations

    L = llm.roast_dims["num_layers"]
    got = capture_activations(llm, token_ids, list(range(L)), ("residual",), starts=starts, **kw)
    return got["residual"].transpose(0, 1).contiguous()


# ------------------------------------------------------------------ in the engine
def build_references(
    llm,
    items: Sequence[tuple[str, str, str]],
    explain_tokens: int = 64,
    provenance: dict | None = None,
    progress: bool = True,
) -> ReferenceSet:
    """METHODS.md's references in the engine (an eager ``roast_vllm.LLM``): for each
    ``(qid, question, ground_truth)`` the model explains the ground truth (greedy, all
    questions in one batch), then the reference text ``prefix + ground truth + explanation``
    is captured, every layer's residual stream averaged over the answer positions."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=explain_tokens, temperature=0.0)
    outs = llm.generate([explanation_prompt(q, gt) for _, q, gt in items], sp, use_tqdm=progress)
    seqs, starts, explanations = [], [], {}
    for (qid, q, gt), o in zip(items, outs):
        explanations[qid] = extract_explanation(o.outputs[0].text)
        ids, start = reference_tokens(tok, *reference_text(q, gt, explanations[qid]))
        seqs.append(ids)
        starts.append(start)
    vectors = reference_vectors(llm, seqs, starts, progress=progress)
    prov = {
        "explain_tokens": explain_tokens,
        "prompts": {
            "explain": explanation_prompt("{question}", "{ground_truth}"),
            "reference": "".join(reference_text("{question}", "{ground_truth}", "{explanation}")),
            "generate": generation_prompt("{question}"),
        },
        "explanations": explanations,
        **(provenance or {}),
    }
    return ReferenceSet([qid for qid, _, _ in items], vectors, prov)


def references_job(w, items: list[tuple[str, str, str]], explain_tokens: int) -> dict:
    """An ``EngineWorker`` job (``"roast_vllm.methods.fusion:references_job"``): one shard's
    references, as plain data."""
    refs = build_references(w.llm, items, explain_tokens, progress=False)
    return {"ids": refs.ids, "vectors": refs.vectors, "explanations": refs.provenance["explanations"]}


def fusion_extra(reference: str, coeffs: float | Sequence[float], skip_first: bool = False) -> dict:
    """A Fusion request's ``extra_args``: ``reference`` a registered vector name,
    ``coeffs`` one number (full-layer), 3 (thirds) or one per layer."""
    e = {"steer_vector": reference, "steer_mode": "fusion"}
    e["steer_scale"] = [float(c) for c in coeffs] if isinstance(coeffs, Sequence) else float(coeffs)
    if skip_first:
        e["steer_skip_first"] = True
    return e


def score_output(output, ground_truth: str) -> dict:
    """Overlap, PPL (the served model's own log-probs of its tokens; needs ``logprobs=0``
    or more) and the search objective of one vLLM output."""
    o = output.outputs[0]
    lps = [o.logprobs[i][t].logprob for i, t in enumerate(o.token_ids)] if o.logprobs else []
    ov = overlap(o.text, ground_truth)
    ppl = perplexity(lps)
    return {
        "overlap": ov,
        "ppl": ppl,
        "objective": objective(ov, ppl),
        "text": o.text,
        "tokens": len(o.token_ids),
    }


# ------------------------------------------------------------------ reference files
@dataclass
class ReferenceSet:
    """One run's reference vectors: ``vectors [Q, L, H]`` fp32, question ``ids [Q]``
    (unique strings) and the run's provenance (model, data hash, prompts, seeds). Stored as
    one safetensors file (a ``vectors`` tensor, the rest as JSON metadata; no pickle).

    ``register(llm, name)`` makes question ``q``'s reference the vector ``"name/q"``, which a
    Fusion request names as its ``steer_vector``."""

    ids: list[str]
    vectors: torch.Tensor
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.vectors
        if not isinstance(v, torch.Tensor) or v.dim() != 3 or not v.is_floating_point():
            raise ValueError("reference vectors must be a float tensor [questions, layers, hidden]")
        self.vectors = v = v.detach().to("cpu", torch.float32).contiguous()
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != v.shape[0]:
            raise ValueError(f"{len(self.ids)} question ids for {v.shape[0]} reference vectors")
        if len(set(self.ids)) != len(self.ids) or any(not i or "/" in i for i in self.ids):
            raise ValueError("question ids must be unique non-empty strings without '/'")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("reference vectors hold nan or inf")

    def vector(self, qid: str):
        """Question ``qid``'s reference as a ``SteeringVector`` (every layer, residual)."""
        from roast_vllm.vector import SteeringVector

        i = self.ids.index(qid)
        return SteeringVector(
            directions=dict(enumerate(self.vectors[i])),
            num_layers=self.vectors.shape[1],
            method="fusion",
            model_id=self.provenance.get("model"),
            # the set's provenance without the other questions' explanations (a set of Q
            # questions would otherwise register Q vectors carrying all Q explanations)
            provenance={
                "reference_set": {k: v for k, v in self.provenance.items() if k != "explanations"},
                "question": qid,
                "explanation": self.provenance.get("explanations", {}).get(qid),
            },
        )

    def register(self, llm, name: str) -> list[str]:
        """Register every question's reference with ``llm`` as ``"name/<id>"``; returns the
        names."""
        import roast_vllm

        if not name or "/" in name:
            raise ValueError(f"reference set name must be non-empty without '/', got {name!r}")
        names = []
        for q in self.ids:
            roast_vllm.register_vector(llm, f"{name}/{q}", self.vector(q))
            names.append(f"{name}/{q}")
        return names

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": REFS_FORMAT, "ids": json.dumps(self.ids), "provenance": json.dumps(self.provenance)}
        save_file({"vectors": self.vectors}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceSet:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != REFS_FORMAT or "vectors" not in f.keys():
                    raise ValueError(
                        f"{path}: not a Fusion reference file (format {meta.get('format')!r}; "
                        f"make one with `roast-vllm fusion references`)"
                    )
                vectors = f.get_tensor("vectors")
            ids, prov = json.loads(meta["ids"]), json.loads(meta.get("provenance", "{}"))
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable Fusion reference file ({e})") from None
        return cls(ids, vectors, prov)
