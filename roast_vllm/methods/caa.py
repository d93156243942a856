"""CAA from prompt files (Rimsky et al.): the mean difference of residual-stream
activations between prompts that show a behaviour and prompts that show its opposite.

``v_l = mean_i h_l(p_i) - mean_j h_l(n_j)`` per layer ``l``, each prompt's activation
pooled over its tokens (``reduce="mean"``) or taken at its last token (``"last"``),
captured with transformers (``roast_vllm.methods.hf``). CAA over ROAST's rollout pairs
(``--method caa`` of ``roast-vllm estimate``) lives in ``roast_vllm.methods.estimate``.
"""

from __future__ import annotations

from typing import Any

from roast_vllm.vector import SteeringVector


def caa_from_prompts(
    positive: list[str],
    negative: list[str],
    *,
    model: str | None = None,
    layers: list[int] | None = None,
    reduce: str = "mean",
    chat: bool = False,
    normalize: bool = False,
    provenance: dict[str, Any] | None = None,
) -> SteeringVector:
    """Residual-stream CAA vector ``{layer: [hidden]}`` (fp32) of ``model`` (default: the
    embedded SmolLM2) at ``layers`` (default: all); ``chat`` wraps each prompt in the chat
    template; ``normalize`` makes each layer's direction unit-norm."""
    import torch

    from roast_vllm.engine.model_prep import default_model, model_dims
    from roast_vllm.methods.hf import capture_residual, load_hf
    from roast_vllm.tasks import chat_prompts

    if not positive or not negative:
        raise ValueError("CAA needs at least one positive and one negative prompt")
    model = model or default_model()
    dims = model_dims(model)
    layers = layers or list(range(dims["num_layers"]))
    bad = [l for l in layers if not 0 <= l < dims["num_layers"]]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {dims['num_layers']} layers")
    hf, tok = load_hf(model, dtype=torch.float32)
    if chat:
        positive, negative = chat_prompts(tok, positive), chat_prompts(tok, negative)
    hp = capture_residual(hf, tok, positive, layers, reduce=reduce)
    hn = capture_residual(hf, tok, negative, layers, reduce=reduce)
    diff = hp.mean(1) - hn.mean(1)  # [layers, hidden]
    if normalize:
        diff = diff / diff.norm(dim=-1, keepdim=True)
    return SteeringVector(
        directions={l: diff[i] for i, l in enumerate(layers)},
        model_id=str(model),
        num_layers=dims["num_layers"],
        method="caa",
        provenance={
            **(provenance or {}),
            "n_positive": len(positive),
            "n_negative": len(negative),
            "reduce": reduce,
            "chat_template": bool(chat),
            **({"normalized": True} if normalize else {}),
        },
    )
