"""Python entry points: ``roast_vllm.LLM(...)`` and ``register_vector(llm, name, vector)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from roast_vllm.engine import registry
from roast_vllm.engine.config import CONFIG_KEY, RoastConfig
from roast_vllm.engine.model_prep import default_model, model_dims
from roast_vllm.engine.models import steered_arch
from roast_vllm.vector import SteeringVector

#: vLLM features steering refuses at engine start, and why (README, "What is supported").
UNSUPPORTED = {
    "speculative_config": "speculative decoding: vLLM runs no custom logits processors with it, "
    "and the steering tracker is one",
    "runner=pooling": "pooling models: vLLM runs no custom logits processors for them, and "
    "steering pooled outputs is not supported",
    "convert": "pooling conversions (--convert embed/classify/reward): vLLM runs no custom "
    "logits processors for pooling models",
    "pipeline_parallel_size": "pipeline parallelism: not tested with steering (tensor parallelism is)",
    "kv_transfer_config": "KV connectors / KV offloading: an external KV store may key blocks "
    "without the steering salt, and steered KV could be served to other requests",
}


def check_supported(vllm_kwargs: dict[str, Any]) -> None:
    """Refuse, before any engine starts, the vLLM options steering does not support."""
    if vllm_kwargs.get("speculative_config"):
        raise ValueError(f"roast-vllm does not support {UNSUPPORTED['speculative_config']}")
    if vllm_kwargs.get("runner") == "pooling":
        raise ValueError(f"roast-vllm does not support {UNSUPPORTED['runner=pooling']}")
    if vllm_kwargs.get("convert") not in (None, "auto", "none"):
        raise ValueError(f"roast-vllm does not support {UNSUPPORTED['convert']}")
    if int(vllm_kwargs.get("pipeline_parallel_size") or 1) > 1:
        raise ValueError(f"roast-vllm does not support {UNSUPPORTED['pipeline_parallel_size']}")
    if vllm_kwargs.get("kv_transfer_config") or vllm_kwargs.get("kv_offloading_size"):
        raise ValueError(f"roast-vllm does not support {UNSUPPORTED['kv_transfer_config']}")


def steering_engine_kwargs(
    model: str,
    max_steering_slots: int = 64,
    vectors: dict[str, str] | None = None,
    mlp_act_site: bool = True,
    allow_capture: bool = False,
    fusion: bool = True,
    **vllm_kwargs: Any,
) -> dict[str, Any]:
    """The vLLM engine arguments that switch steering on for ``model`` (merged with the
    caller's own ``vllm_kwargs``). ``roast-vllm serve`` turns the same dict into flags."""
    check_supported(vllm_kwargs)
    dims = model_dims(model)
    archs = (vllm_kwargs.get("hf_overrides") or {}).get("architectures") or dims["architectures"]
    if not archs:
        raise ValueError(f"{model}: config.json names no architecture")
    cfg = RoastConfig(
        max_steering_slots=max_steering_slots,
        vectors=dict(vectors or {}),
        num_layers=dims["num_layers"],
        mlp_act_site=mlp_act_site,
        allow_capture=allow_capture,
        fusion=fusion,
        max_model_len=vllm_kwargs.get("max_model_len") or dims.get("max_position_embeddings"),
        model_dtype=model_dtype(dims, vllm_kwargs.get("dtype")),
        hidden_size=dims.get("hidden_size"),
        mlp_size=(dims.get("intermediate_size") or 0) if mlp_act_site else 0,
    )
    kw = dict(vllm_kwargs)
    kw["model"] = model
    kw["hf_overrides"] = {**(kw.get("hf_overrides") or {}), "architectures": [steered_arch(archs[0])]}
    from roast_vllm.engine.tracker import QUALNAME as TRACKER

    kw["logits_processors"] = [*(kw.get("logits_processors") or []), TRACKER]
    if kw.get("scheduler_cls"):
        raise ValueError("roast-vllm needs its own scheduler_cls; a custom one cannot be combined")
    from roast_vllm.engine.scheduler import QUALNAME
    from roast_vllm.engine.worker import QUALNAME as WORKER

    # One class for both: it follows the engine's resolved async-scheduling setting.
    kw["scheduler_cls"] = QUALNAME
    if kw.get("worker_extension_cls"):
        raise ValueError("roast-vllm needs its own worker_extension_cls; a custom one cannot be combined")
    kw["worker_extension_cls"] = WORKER
    kw["additional_config"] = {**(kw.get("additional_config") or {}), CONFIG_KEY: cfg.to_dict()}
    return kw


def model_dtype(dims: dict, dtype: Any) -> str | None:
    """The dtype the engine will run in, as far as the front end can tell (it bounds what
    a scaled vector may add, ``spec.MAX_DELTA``): the given one, else the config's."""
    if dtype in (None, "auto"):
        dtype = dims.get("torch_dtype")
    if dtype is None:
        return None
    return {"half": "float16", "float": "float32"}.get(str(dtype), str(dtype).replace("torch.", ""))


def site_dim(dims: dict, site: str) -> int:
    """Activation size at ``site``: hidden size for the residual stream, MLP width for
    ``mlp_act``."""
    return dims["intermediate_size"] if site == "mlp_act" else dims["hidden_size"]


def LLM(
    model: str | None = None,
    *,
    max_steering_slots: int = 64,
    vectors: dict[str, str | Path] | None = None,
    mlp_act_site: bool = True,
    allow_capture: bool = True,
    fusion: bool = True,
    **vllm_kwargs: Any,
):
    """A ``vllm.LLM`` with per-request steering switched on.

    Args:
        model: local HF model folder (default: the embedded SmolLM2-135M-Instruct).
        max_steering_slots: distinct (vector, scale, layers) configurations per batch.
        mlp_act_site: allow ``mlp_act`` vectors (ROAST's site); False steers only the
            residual stream and saves the ``mlp_act`` table and its per-layer op.
        vectors: ``{name: file}`` to register at start (more later with
            :func:`register_vector`).
        allow_capture: accept ``roast_capture`` requests (activation capture, eager
            engines; ``roast_vllm.engine.capture``). On by default offline, off on servers.
        fusion: accept Fusion Steering requests (``steer_mode="fusion"``; the running
            sums cost ``layers * (max_num_seqs + 1) * hidden`` fp32).
        **vllm_kwargs: anything ``vllm.LLM`` takes. Without ``dtype``, CPU engines use
            bf16 only where the CPU computes it natively, else fp32 (GPUs: vLLM's auto).

    Requests pick steering with ``SamplingParams(extra_args={"steer_vector": name, ...})``.
    """
    import vllm

    # Steering follows the persistent batch through the V1 model runner's logits-processor
    # updates; keep vLLM on that runner (it is the only one on CPU anyway).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    model = model or default_model()
    if vllm_kwargs.get("dtype") is None:
        # CPU: bf16 only where the CPU has it natively (AVX-512 BF16 / AMX); elsewhere vLLM's
        # auto pick of bf16 runs matmuls ~5x slower than fp32. GPUs keep vLLM's auto.
        from roast_vllm.engine.args import default_dtype

        dtype = default_dtype()
        if dtype is not None:
            vllm_kwargs["dtype"] = dtype
    vecs = {name: SteeringVector.load(p) for name, p in (vectors or {}).items()}
    dims = model_dims(model)
    for v in vecs.values():
        v.validate_for(dims["num_layers"], site_dim(dims, v.site))
    kw = steering_engine_kwargs(
        model,
        max_steering_slots,
        {n: str(Path(p).resolve()) for n, p in (vectors or {}).items()},
        mlp_act_site,
        allow_capture,
        fusion,
        **vllm_kwargs,
    )
    registry.reset()
    llm = vllm.LLM(**kw)
    mc = llm.llm_engine.model_config
    # the front end's registry, with the engine's resolved length and dtype
    registry.set_model(dims["num_layers"], mc.max_model_len, str(mc.dtype), allow_capture, fusion)
    for name, v in vecs.items():
        registry.add(name, v)
    llm.roast_dims = dims
    return llm


def register_vector(llm, name: str, vector: SteeringVector | str | Path) -> None:
    """Make ``vector`` available as ``name`` to every worker of ``llm``.

    Re-registering a name makes the new vector current for requests submitted from now
    on; requests already submitted (running, preempted or queued) keep the version they
    were validated against. Prefix-cache salts carry the version's digest, so KV computed
    with the old version is never reused by requests on the new one (no cache reset needed:
    ``reset_prefix_cache`` cannot free blocks that running requests hold).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"vector name must be a non-empty string, got {name!r}")
    if not isinstance(vector, SteeringVector):
        vector = SteeringVector.load(vector)
    dims = getattr(llm, "roast_dims", None)
    if dims is None:
        raise ValueError("this engine has no steering; create it with roast_vllm.LLM(...)")
    vector.validate_for(dims["num_layers"], site_dim(dims, vector.site))
    # Workers first: a request is stamped with the new digest only once every worker has it.
    llm.collective_rpc("roast_register_vector", args=(name, vector.to_bytes()))
    registry.add(name, vector)


def shutdown(llm) -> None:
    """Stop an engine's processes now (before starting another on a small machine)."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already gone
        pass
    del llm
    gc.collect()
