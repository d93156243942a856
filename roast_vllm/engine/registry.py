"""The front end's view of registered vectors, for submission-time validation.

vLLM calls ``validate_params`` in the process that accepts requests (the ``vllm.LLM``
process, or the API server), without any config. ``roast_vllm.LLM`` and
``register_vector`` fill this registry; a server reads ``ROAST_VLLM_CONFIG``
(``roast-vllm serve`` sets it).
"""

from __future__ import annotations

import threading

from roast_vllm.engine.spec import SteerSpec, VectorInfo, check_against

_lock = threading.Lock()
_vectors: dict[str, VectorInfo] = {}
_num_layers: int | None = None
_env_loaded = False


def set_model(num_layers: int) -> None:
    global _num_layers
    _num_layers = num_layers


def add(name: str, vector) -> None:
    with _lock:
        _vectors[name] = VectorInfo(tuple(vector.layers), vector.hidden_size, vector.site)


def names() -> list[str]:
    _load_env_once()
    return sorted(_vectors)


def known() -> bool:
    """True if this process has any steering registry (else only syntax is checked)."""
    _load_env_once()
    return bool(_vectors) or _num_layers is not None


def _load_env_once() -> None:
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    from roast_vllm.config import RoastConfig
    from roast_vllm.vector import SteeringVector

    cfg = RoastConfig.from_env()
    if cfg is None:
        return
    if cfg.num_layers is not None:
        set_model(cfg.num_layers)
    for name, path in cfg.vectors.items():
        add(name, SteeringVector.load(path))


def check(spec: SteerSpec) -> None:
    if not known():
        return
    with _lock:
        check_against(spec, dict(_vectors), _num_layers)


def reset() -> None:
    """Forget everything (tests, or a new engine in the same process)."""
    global _num_layers, _env_loaded
    with _lock:
        _vectors.clear()
        _num_layers = None
        _env_loaded = False
