"""Per-request steering selection: the flat ``SamplingParams.extra_args`` keys.

The same keys arrive through ``vllm serve`` as ``vllm_xargs`` (whose values are
str/int/float or lists of them), so parsing accepts strings for numbers and
``"3,4,5"`` for layer lists.

=================  ======================================================  ===========
key                meaning                                                 default
=================  ======================================================  ===========
steer_vector       name of a registered vector                             (required)
steer_scale        float multiplier                                        1.0
steer_layers       list of layer ints                                      vector's own
steer_positions    all | prompt | generated | last_prompt_and_generated    all
steer_start        int: steer absolute positions >= this one (overrides    (unset)
                   steer_positions; for scoring a continuation that is
                   part of the prompt, e.g. ``len(question) - 1``)
=================  ======================================================  ===========
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

POSITIONS = ("all", "prompt", "generated", "last_prompt_and_generated")
KEYS = ("steer_vector", "steer_scale", "steer_layers", "steer_positions", "steer_start")
_NO_LIMIT = 1 << 62


class SteeringRequestError(ValueError):
    """A request's steer_* arguments are invalid."""


@dataclass(frozen=True)
class SteerSpec:
    """One request's steering choice (validated)."""

    vector: str
    scale: float = 1.0
    layers: tuple[int, ...] | None = None  # None: every layer the vector has
    positions: str = "all"
    start: int | None = None  # steer positions >= start (overrides ``positions``)

    @property
    def slot_key(self) -> tuple:
        """What fills a row of the steering table; requests that share it share a slot.
        Position scope is per request (a row property), so it is not part of the key."""
        return (self.vector, self.scale, self.layers)

    def cache_salt(self) -> str:
        """Prefix-cache salt: KV computed under this steering must only be reused by
        requests with the same steering (see README, "Prefix caching")."""
        return "roast:" + json.dumps(
            [self.vector, repr(self.scale), self.layers, self.positions, self.start], separators=(",", ":")
        )

    def token_range(self, prompt_len: int) -> tuple[int, int]:
        """``[lo, hi)`` of absolute token positions that are steered."""
        if self.start is not None:
            return self.start, _NO_LIMIT
        if self.positions == "all":
            return 0, _NO_LIMIT
        if self.positions == "prompt":
            return 0, prompt_len
        if self.positions == "generated":
            return prompt_len, _NO_LIMIT
        return max(prompt_len - 1, 0), _NO_LIMIT  # last_prompt_and_generated


def _as_float(key: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise SteeringRequestError(f"{key} must be a number, got {v!r}") from None
    if isinstance(v, bool):
        raise SteeringRequestError(f"{key} must be a number, got {v!r}")
    if not math.isfinite(f):
        raise SteeringRequestError(f"{key} must be finite, got {v!r}")
    return f


def _as_layers(v: Any) -> tuple[int, ...]:
    if isinstance(v, str):
        parts = [p for p in v.replace(" ", "").split(",") if p]
    elif isinstance(v, (list, tuple)):
        parts = list(v)
    else:
        raise SteeringRequestError(f"steer_layers must be a list of layer indices (or '3,4,5'), got {v!r}")
    out = []
    for p in parts:
        if isinstance(p, bool):
            raise SteeringRequestError(f"steer_layers entries must be ints, got {p!r}")
        try:
            i = int(p)
        except (TypeError, ValueError):
            raise SteeringRequestError(f"steer_layers entries must be ints, got {p!r}") from None
        if isinstance(p, float) and p != i:
            raise SteeringRequestError(f"steer_layers entries must be ints, got {p!r}")
        if i < 0:
            raise SteeringRequestError(f"steer_layers entries must be >= 0, got {i}")
        out.append(i)
    if not out:
        raise SteeringRequestError("steer_layers is empty; omit it to steer every layer of the vector")
    return tuple(sorted(set(out)))


def parse_steer_args(extra_args: dict[str, Any] | None) -> SteerSpec | None:
    """Return the request's ``SteerSpec`` or ``None`` when it has no steer keys.

    Raises ``SteeringRequestError`` with what is wrong and how to fix it.
    """
    if not extra_args:
        return None
    present = {k: v for k, v in extra_args.items() if k.startswith("steer_")}
    if not present:
        return None
    unknown = sorted(set(present) - set(KEYS))
    if unknown:
        raise SteeringRequestError(f"unknown steering keys {unknown}; valid keys are {list(KEYS)}")
    name = present.get("steer_vector")
    if name is None:
        raise SteeringRequestError(
            f"steering keys {sorted(present)} given without steer_vector; name a registered vector"
        )
    if not isinstance(name, str) or not name:
        raise SteeringRequestError(f"steer_vector must be a vector name (str), got {name!r}")
    scale = _as_float("steer_scale", present.get("steer_scale", 1.0))
    layers = _as_layers(present["steer_layers"]) if "steer_layers" in present else None
    positions = present.get("steer_positions", "all")
    if positions not in POSITIONS:
        raise SteeringRequestError(f"steer_positions={positions!r} is not one of {list(POSITIONS)}")
    start = None
    if "steer_start" in present:
        v = present["steer_start"]
        try:
            start = int(v)
        except (TypeError, ValueError):
            raise SteeringRequestError(f"steer_start must be a non-negative int, got {v!r}") from None
        if isinstance(v, bool) or (isinstance(v, float) and v != start) or start < 0:
            raise SteeringRequestError(f"steer_start must be a non-negative int, got {v!r}")
        if "steer_positions" in present:
            raise SteeringRequestError("give steer_positions or steer_start, not both")
    return SteerSpec(vector=name, scale=scale, layers=layers, positions=positions, start=start)


@dataclass(frozen=True)
class VectorInfo:
    """What the front end needs to know of a registered vector to validate requests."""

    layers: tuple[int, ...]
    dim: int
    site: str


def check_against(spec: SteerSpec, vectors: dict[str, VectorInfo], num_layers: int | None) -> None:
    """Check a spec against the registered vectors (name known, layers in range)."""
    info = vectors.get(spec.vector)
    if info is None:
        known = sorted(vectors) or "none registered yet"
        raise SteeringRequestError(
            f"unknown steering vector {spec.vector!r}; registered: {known}. "
            "Register it with roast_vllm.register_vector(llm, name, vector) or list it in "
            "the server's roast config"
        )
    if spec.layers is not None:
        if num_layers is not None:
            bad = [l for l in spec.layers if l >= num_layers]
            if bad:
                raise SteeringRequestError(
                    f"steer_layers {bad} out of range: the model has {num_layers} layers "
                    f"(0..{num_layers - 1})"
                )
        missing = [l for l in spec.layers if l not in info.layers]
        if missing:
            raise SteeringRequestError(
                f"vector {spec.vector!r} has no direction for layers {missing}; "
                f"it has layers {list(info.layers)}"
            )
