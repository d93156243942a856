"""The front end's view of registered vectors, for submission-time validation.

vLLM calls ``validate_params`` in the process that accepts requests (the ``vllm.LLM``
process, or the API server), without any config. ``roast_vllm.LLM`` and
``register_vector`` fill this registry; a server reads ``ROAST_VLLM_CONFIG``
(``roast-vllm serve`` sets it). A process with no registry refuses steered requests: it
could not check them, and the engine must never receive a request it cannot apply.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from roast_vllm.engine.spec import SteeringRequestError, SteerSpec, VectorInfo, check_against

_lock = threading.Lock()
_vectors: dict[str, VectorInfo] = {}
_described: dict[str, dict] = {}  # name -> what GET /v1/steering/vectors lists
_env_loaded = False


@dataclass
class ModelInfo:
    num_layers: int | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    allow_capture: bool = False
    fusion: bool = True
    hidden_size: int | None = None
    mlp_size: int | None = None  # 0: the mlp_act site is off
    vector_dirs: tuple[str, ...] = ()


_model: ModelInfo | None = None


def set_model(
    num_layers: int | None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    allow_capture: bool = False,
    fusion: bool = True,
    hidden_size: int | None = None,
    mlp_size: int | None = None,
    vector_dirs: tuple[str, ...] = (),
) -> None:
    global _model, _env_loaded
    _env_loaded = True  # the caller's model info wins over ROAST_VLLM_CONFIG (read it first: reset())
    _model = ModelInfo(
        num_layers,
        max_model_len,
        None if dtype is None else str(dtype),
        allow_capture,
        fusion,
        hidden_size,
        mlp_size,
        tuple(vector_dirs),
    )


def add(name: str, vector, source: str = "api") -> VectorInfo:
    info = VectorInfo(
        tuple(vector.layers), vector.hidden_size, vector.site, vector.digest(), vector.max_abs()
    )
    desc = {
        "name": name,
        "site": vector.site,
        "layers": list(vector.layers),
        "dims": vector.hidden_size,
        "num_layers": vector.num_layers,
        "method": vector.method,
        "model_id": vector.model_id,
        "provenance": vector.provenance,
        "digest": info.digest,
        "max_abs": info.max_abs,
        "source": source,
    }
    with _lock:
        _vectors[name] = info
        _described[name] = desc
    return info


def remove(name: str) -> bool:
    """Forget ``name`` (requests already validated keep their pinned version)."""
    _load_env_once()
    with _lock:
        _described.pop(name, None)
        return _vectors.pop(name, None) is not None


def describe(name: str | None = None) -> list[dict]:
    """What the registry API lists: every vector, or ``name``'s (empty if unknown)."""
    _load_env_once()
    with _lock:
        if name is not None:
            return [dict(_described[name])] if name in _described else []
        return [dict(_described[n]) for n in sorted(_described)]


def model() -> ModelInfo | None:
    _load_env_once()
    return _model


def names() -> list[str]:
    _load_env_once()
    return sorted(_vectors)


def known() -> bool:
    """True if this process has a steering registry (a roast engine or server config)."""
    _load_env_once()
    return _model is not None or bool(_vectors)


def capture_allowed() -> bool:
    _load_env_once()
    return _model is not None and _model.allow_capture


def _load_env_once() -> None:
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    from roast_vllm.engine.config import RoastConfig
    from roast_vllm.vector import SteeringVector

    cfg = RoastConfig.from_env()
    if cfg is None:
        return
    set_model(
        cfg.num_layers,
        cfg.max_model_len,
        cfg.model_dtype,
        cfg.allow_capture,
        cfg.fusion,
        cfg.hidden_size,
        cfg.mlp_size,
        tuple(cfg.vector_dirs),
    )
    for name, path in cfg.vectors.items():
        add(name, SteeringVector.load(path), source=f"config: {path}")


def check(spec: SteerSpec) -> str:
    """Validate ``spec`` against the registry; returns the digest of the vector version
    the request is pinned to (a combination: one per vector, joined by commas)."""
    if not known():
        raise SteeringRequestError(
            "steer_vector: this process has no roast-vllm registry, so steering cannot be "
            "checked; create the engine with roast_vllm.LLM(...) or serve with `roast-vllm "
            "serve` (which sets ROAST_VLLM_CONFIG)"
        )
    m = _model or ModelInfo()
    # under the lock, without copying: per-request cost is independent of how many vectors
    # are registered (Fusion Steering registers one per prompt)
    with _lock:
        check_against(spec, _vectors, m.num_layers, m.max_model_len, m.dtype, m.fusion)
        if spec.terms:
            return ",".join(_vectors[t.vector].digest for t in spec.terms)
        return _vectors[spec.vector].digest


def reset() -> None:
    """Forget everything (tests, or a new engine in the same process)."""
    global _model, _env_loaded
    with _lock:
        _vectors.clear()
        _described.clear()
        _model = None
        _env_loaded = False
