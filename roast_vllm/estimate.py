"""ROAST estimation, the reduction step: pair differences -> ``SteeringVector``.

``d_i = h_l(q ⊕ r⁺)[-1] - h_l(q ⊕ r⁻)[-1]`` for every (correct, incorrect) pair ``i`` of
question ``g_i`` (ROC), then Grouped Mean Normalization with Continuous Soft Scaling
through the fused ``roast_vllm.kernels.grouped_css`` op (METHODS.md, ROAST steps 4-6).
Rollouts, verification and activation capture feed this (ROAST issue).
"""

from __future__ import annotations

from typing import Any

import torch

from roast_vllm.kernels.grouped_css import MODES, grouped_css
from roast_vllm.vector import SteeringVector


def estimate_vector(
    diffs: torch.Tensor,
    weights: torch.Tensor,
    groups: torch.Tensor,
    layers: list[int],
    *,
    mode: str = "max_norm",
    grouped: bool = True,
    site: str = "residual",
    num_layers: int | None = None,
    recss: bool = False,
    **meta: Any,
) -> SteeringVector:
    """``diffs [len(layers), N, H]`` pair differences for the given ``layers``.

    ``recss``: re-apply CSS to the merged vector (the authors do this when combining
    shards; METHODS.md step 6).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if diffs.shape[0] != len(layers):
        raise ValueError(f"diffs has {diffs.shape[0]} layers but {len(layers)} layer ids were given")
    v = grouped_css(diffs, weights, groups, mode=mode, grouped=grouped)
    if recss:
        from roast_vllm.kernels.grouped_css import css

        v = css(v, mode)
    provenance = dict(meta.pop("provenance", {}) or {})
    provenance.update(
        {
            "css": mode,
            "grouped": grouped,
            "recss": recss,
            "n_pairs": int(diffs.shape[1]),
            "n_groups": int(torch.unique(groups).numel()),
        }
    )
    return SteeringVector(
        directions={l: v[i] for i, l in enumerate(layers)},
        site=site,
        num_layers=num_layers,
        method=meta.pop("method", "roast"),
        provenance=provenance,
        **meta,
    )
