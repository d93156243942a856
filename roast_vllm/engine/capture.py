"""Activation capture in vLLM: teacher-forced prefill of ``q ⊕ r``, last-token activations
(or their mean over a span of positions: Fusion Steering's reference vectors).

Each sequence runs as a one-token request tagged ``extra_args["roast_capture"] = id``; the
steered model records its last prompt token's activations at the chosen layers and sites
(``residual``: the stream after the layer; ``mlp_act``: SiLU(gate_proj x)), and
``roast_pop_captures`` hands them back. Batches go through vLLM's scheduler like any other
requests (continuous batching, prefix caching). Needs an eager engine (``enforce_eager=True``):
the compiled graph has no capture path, by design, so that serving pays nothing for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import torch

from roast_vllm.engine.spec import CAPTURE_FROM_KEY
from roast_vllm.engine.tracker import CAPTURE_KEY
from roast_vllm.vector import SITES


def capture_activations(
    llm,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    sites: Sequence[str] = SITES,
    batch_size: int = 256,
    progress: bool = True,
    starts: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``{site: Tensor[len(layers), N, dim]}`` float32, the activation of each sequence's
    last token (``N = len(token_ids)``), for a ``roast_vllm.LLM(..., enforce_eager=True)``.
    With ``starts``: sequence ``i``'s mean over its positions ``starts[i] ..`` (through the
    last), summed in the engine step by step (prefill chunks too)."""
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sites = tuple(sites)
    if any(s not in SITES for s in sites) or not sites:
        raise ValueError(f"sites={sites}; choose from {SITES}")
    info = llm.collective_rpc("roast_info")[0]
    if not info:
        raise ValueError("this engine has no steering model; create it with roast_vllm.LLM(...)")
    if info["compiled"]:
        raise ValueError(
            "activation capture needs an eager engine: create it with roast_vllm.LLM(..., enforce_eager=True)"
        )
    if "mlp_act" in sites and not info["mlp_size"]:
        raise ValueError("this engine was started with mlp_act_site=False; it cannot capture mlp_act")
    empty = [i for i, ids in enumerate(token_ids) if len(ids) == 0]
    if empty:
        raise ValueError(f"sequences {empty[:5]} are empty; every capture needs at least one token")
    if starts is not None:
        if len(starts) != len(token_ids):
            raise ValueError(f"starts has {len(starts)} entries for {len(token_ids)} sequences")
        bad = [i for i, (s, t) in enumerate(zip(starts, token_ids)) if not 0 <= int(s) < len(t)]
        if bad:
            raise ValueError(f"starts of sequences {bad[:5]} are not positions of their sequence")
    llm.collective_rpc("roast_set_capture", args=(list(layers), list(sites)))
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    run = uuid.uuid4().hex[:8]
    bar = tqdm(total=len(token_ids), desc="capturing activations", unit="seq", disable=not progress)
    for b in range(0, len(token_ids), batch_size):
        chunk = token_ids[b : b + batch_size]
        ids = [f"{run}-{b + i}" for i in range(len(chunk))]
        extras = [{CAPTURE_KEY: c} for c in ids]
        if starts is not None:
            for e, st in zip(extras, starts[b : b + batch_size]):
                e[CAPTURE_FROM_KEY] = int(st)
        params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args=e) for e in extras]
        llm.generate([TokensPrompt(prompt_token_ids=list(t)) for t in chunk], params, use_tqdm=False)
        ranks = [_load(p) for p in llm.collective_rpc("roast_pop_captures", args=(ids,))]
        for c in ids:
            for s in sites:
                parts = [r[f"{c}/{s}"] for r in ranks if f"{c}/{s}" in r]
                if not parts:
                    raise RuntimeError(f"roast-vllm: capture {c} returned no {s} activations (please report)")
                # residual: identical on every rank; mlp_act: each rank's column slice
                out[s].append(torch.cat(parts, -1) if s == "mlp_act" else parts[0])
        bar.update(len(chunk))
    bar.close()
    return {s: torch.stack(v, 1) for s, v in out.items()}


def _load(payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(payload)
