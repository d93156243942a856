"""``RoastConfig``: the engine-side steering configuration.

Given as ``additional_config={"roast": {...}}`` (``--additional-config`` for
``vllm serve``); ``roast_vllm.LLM`` fills it in for you.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from roast_vllm import envs

CONFIG_KEY = "roast"


@dataclass
class RoastConfig:
    max_steering_slots: int = 64
    """How many distinct steering configurations (vector, scale, layers) may be in one
    running batch. Requests beyond that wait in the queue for a slot; they are never run
    unsteered. Memory: ``layers * (slots + 1) * hidden`` elements of the model dtype."""

    vectors: dict[str, str] = field(default_factory=dict)
    """``{name: path to a .safetensors SteeringVector}`` loaded by every worker at start
    (the server-side way to make vectors available)."""

    mlp_act_site: bool = True
    """Allow vectors at the ``mlp_act`` site (ROAST's default: SiLU(gate) before the
    multiply by up). Costs ``layers * (slots + 1) * intermediate`` fp32 and one fused
    multiply-add per layer in compiled graphs; switch off for the residual stream only."""

    fusion: bool = True
    """Accept Fusion Steering requests (``steer_mode="fusion"``). Costs a running sum per
    layer and batch row, ``layers * (max_num_seqs + 1) * hidden`` fp32 (SmolLM2-135M at
    256 rows: 18 MB; a 64-layer, 5120-wide model: 337 MB), and one op call per layer in
    compiled graphs that returns at once when no Fusion request is in the step."""

    allow_capture: bool = False
    """Accept ``roast_capture`` requests (activation capture for ROAST estimation; eager
    engines only). ``roast_vllm.LLM`` turns it on (the offline caller is the one who pops
    the captures); servers leave it off unless started with ``--allow-capture``, so an
    HTTP client cannot make workers hold activations."""

    vector_dirs: list[str] = field(default_factory=list)
    """Server folders the registry API may load vectors from (``POST
    /v1/steering/vectors`` with ``{"name", "path"}``); a path outside all of them (after
    resolving links) is refused. Empty: only uploads register vectors."""

    max_capture_mib: int = 1024
    """Captured activations a worker holds until they are popped; beyond this the oldest
    captures are dropped (with an error in the log) instead of growing without bound."""

    num_layers: int | None = None
    """The model's layer count, recorded by ``roast_vllm`` so a front end that has no
    model (the API server process) can check ``steer_layers`` ranges at submission."""

    max_model_len: int | None = None
    """The engine's maximum model length, recorded for the front end: ``steer_start``
    must be below it."""

    model_dtype: str | None = None
    """The engine's model dtype (e.g. ``bfloat16``), recorded for the front end: it bounds
    how much a scaled vector may add to an activation (``spec.MAX_DELTA``)."""

    hidden_size: int | None = None
    """The model's hidden size, recorded for the front end: the registry API checks an
    uploaded residual vector's width before any worker sees it."""

    mlp_size: int | None = None
    """The model's MLP width (0 when ``mlp_act_site`` is off), recorded for the front end
    (the width of ``mlp_act`` vectors)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_steering_slots, bool) or not isinstance(self.max_steering_slots, int):
            raise ValueError(f"max_steering_slots must be an int, got {self.max_steering_slots!r}")
        if self.max_steering_slots < 1:
            raise ValueError(f"max_steering_slots must be >= 1, got {self.max_steering_slots}")
        if not isinstance(self.vectors, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.vectors.items()
        ):
            raise ValueError(f"roast 'vectors' must map names to file paths, got {self.vectors!r}")
        if not isinstance(self.vector_dirs, list) or not all(isinstance(d, str) for d in self.vector_dirs):
            raise ValueError(f"roast 'vector_dirs' must be a list of folder paths, got {self.vector_dirs!r}")
        if isinstance(self.max_capture_mib, bool) or not isinstance(self.max_capture_mib, int):
            raise ValueError(f"max_capture_mib must be an int, got {self.max_capture_mib!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RoastConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown roast config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> RoastConfig | None:
        extra = getattr(vllm_config, "additional_config", None) or {}
        if CONFIG_KEY not in extra:
            return None
        return cls.from_dict(extra[CONFIG_KEY])

    @classmethod
    def from_env(cls) -> RoastConfig | None:
        raw = envs.get("ROAST_VLLM_CONFIG")
        if not raw:
            return None
        try:
            return cls.from_dict(json.loads(raw))
        except json.JSONDecodeError as e:
            raise ValueError(f"ROAST_VLLM_CONFIG is not valid JSON: {e}") from e
