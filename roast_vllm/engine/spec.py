"""Per-request steering selection: the flat ``SamplingParams.extra_args`` keys.

The same keys arrive through ``vllm serve`` as ``vllm_xargs`` (whose values are
str/int/float or lists of them), so parsing accepts strings for numbers and
``"3,4,5"`` for layer lists.

=================  ======================================================  ===========
key                meaning                                                 default
=================  ======================================================  ===========
steer_vector       name of a registered vector                             (required)
steer_scale        float multiplier, ``|scale| <= MAX_SCALE``; or one per  1.0
                   layer segment: 3 floats (early / middle / late thirds
                   of the model's layers, as Fusion Steering's segmented
                   form) or one float per model layer (``"1,0.5,2"``)
steer_layers       list of layer ints                                      vector's own
steer_positions    all | prompt | generated | last_prompt_and_generated    all
steer_start        int: steer absolute positions >= this one (overrides    (unset)
                   steer_positions; for scoring a continuation that is
                   part of the prompt, e.g. ``len(question) - 1``)
steer_mode         ``add`` (``h += scale_l * v_l``) or ``fusion`` (Fusion     add
                   Steering: ``h += c_l * (r_l - m_l)``, ``steer_vector``
                   the request's reference ``r``, ``steer_scale`` its
                   coefficients ``c``, ``m_l`` the running mean of the
                   request's own stream; every position, residual site)
steer_skip_first   fusion only: leave position 0 (the attention sink) out  false
                   of the mean and uninjected
steer_vectors      several registered vectors in one request, each with    (unset)
                   its own scale and layers: ``[{"name": "a", "scale":
                   0.5}, {"name": "b", "scale": -0.3, "layers": [3, 4]}]``
                   or the compact ``"a:0.5,b:-0.3@3-4"`` (also as a list
                   of such strings, or a JSON string); replaces
                   steer_vector / steer_scale / steer_layers; the scope
                   keys apply to the whole combination
=================  ======================================================  ===========

A multi-vector request adds ``sum_i scale_i * v_i[l]`` at each layer ``l`` (a term adds
only on its own layers; vectors of both sites may be combined). The whole combination is
one steering configuration: it fills one slot, and requests with the same combination
share it. A one-entry ``steer_vectors`` is exactly the ``steer_vector`` request. The
compact form is ``name[:scale][@layers]`` joined by commas, ``layers`` as ``3-5+9`` (ranges
joined by ``+``); names holding ``,:@`` need the list-of-objects form.

Keys starting with ``roast_`` are internal: ``roast_vector_digest`` is stamped by the
front end (which version of the named vector the request steers with; a client's value is
overwritten), ``roast_capture`` asks for an activation capture and is accepted only by
engines started with capture on (offline ``roast_vllm.LLM``; servers opt in);
``roast_capture_from = k`` makes it the mean over prompt positions ``k ..``. Any other
``roast_*`` or ``steer_*`` key is refused.

Every value is bounded here, so nothing a client sends can overflow a tensor write in the
engine: ``|steer_scale| <= MAX_SCALE``, layers and positions below ``MAX_INDEX``, names at
most ``MAX_NAME_LEN`` characters. The model-dependent bounds (layer count, maximum model
length, largest value the dtype may add) are checked by :func:`check_against`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

POSITIONS = ("all", "prompt", "generated", "last_prompt_and_generated")
KEYS = (
    "steer_vector",
    "steer_scale",
    "steer_layers",
    "steer_positions",
    "steer_start",
    "steer_mode",
    "steer_skip_first",
    "steer_vectors",
)
MODES = ("add", "fusion")
DIGEST_KEY = "roast_vector_digest"  # stamped by the front end; never taken from a client
CAPTURE_KEY = "roast_capture"  # capture id of an activation-capture request (opt-in)
CAPTURE_FROM_KEY = "roast_capture_from"  # capture the mean over prompt positions >= this
INTERNAL_KEYS = (DIGEST_KEY, CAPTURE_KEY, CAPTURE_FROM_KEY)

#: Largest ``|steer_scale|``. Representable in every float dtype a table is kept in (fp32);
#: far beyond any useful steering (vectors are O(1) per element).
MAX_SCALE = 1.0e4
#: Layers and positions are below this (int32 range: every index tensor can hold them).
MAX_INDEX = 2**31 - 1
MAX_NAME_LEN = 256
_NO_LIMIT = 1 << 62
_DIGEST_RE = re.compile(r"^[0-9a-f]{16}$")
#: Most vectors one request may combine.
MAX_TERMS = 16


class SteeringRequestError(ValueError):
    """A request's steer_* arguments are invalid (the message names the key)."""


#: Most entries of a per-layer ``steer_scale`` (a model has far fewer layers).
MAX_SCALES = 4096


def segment_of(layer: int, num_layers: int) -> int:
    """Third (0 early, 1 middle, 2 late) that ``layer`` of ``num_layers`` falls in:
    ``min(3 * layer // num_layers, 2)``; 30 layers: 0-9, 10-19, 20-29."""
    return min(3 * layer // num_layers, 2)


@dataclass(frozen=True)
class SteerTerm:
    """One vector of a multi-vector request: ``scale * v_l`` on ``layers`` (None: every
    layer the vector has)."""

    vector: str
    scale: float = 1.0
    layers: tuple[int, ...] | None = None

    def compact(self) -> str:
        """``name:scale[@layers]``, the form :func:`parse_steer_args` reads back."""
        s = f"{self.vector}:{self.scale!r}"
        return s if self.layers is None else s + "@" + "+".join(map(str, self.layers))


@dataclass(frozen=True)
class SteerSpec:
    """One request's steering choice (validated).

    ``scale``: one float for every layer, or a tuple: 3 entries (one per third of the
    model's layers, :func:`segment_of`) or one per model layer. Layer ``l`` adds
    ``layer_scales(L)[l] * v_l``."""

    vector: str
    scale: float | tuple[float, ...] = 1.0
    layers: tuple[int, ...] | None = None  # None: every layer the vector has
    positions: str = "all"
    start: int | None = None  # steer positions >= start (overrides ``positions``)
    digest: str | None = None  # the vector version (front-end stamp); None: the current one
    mode: str = "add"  # "add" or "fusion" (Fusion Steering, methods/fusion.py)
    skip_first: bool = False  # fusion: position 0 neither counted in the mean nor injected
    #: A multi-vector request's vectors (``steer_vectors``, 2 or more). Then ``vector`` is
    #: the combination's compact form (for messages), ``scale`` 1.0, ``layers`` None, and
    #: ``digest`` one digest per term joined by commas.
    terms: tuple[SteerTerm, ...] = ()

    def term_specs(self) -> list[SteerSpec]:
        """A combination's terms, each as the single-vector request it adds (the
        combination's scope)."""
        return [SteerSpec(t.vector, t.scale, t.layers, self.positions, self.start) for t in self.terms]

    @property
    def digests(self) -> tuple[str, ...] | None:
        """The pinned version of each vector (one per term; one for a single vector)."""
        return None if self.digest is None else tuple(self.digest.split(","))

    @property
    def max_abs_scale(self) -> float:
        return max(abs(x) for x in self.scale) if isinstance(self.scale, tuple) else abs(self.scale)

    def layer_scales(self, num_layers: int) -> list[float]:
        """The scale of each of ``num_layers`` layers. A tuple of neither 3 nor
        ``num_layers`` entries is refused (``SteeringRequestError``)."""
        if not isinstance(self.scale, tuple):
            return [float(self.scale)] * num_layers
        if len(self.scale) == num_layers:
            return list(self.scale)
        if len(self.scale) == 3:
            return [self.scale[segment_of(l, num_layers)] for l in range(num_layers)]
        raise SteeringRequestError(
            f"steer_scale has {len(self.scale)} entries; give one number, 3 (early / middle / "
            f"late thirds of the layers) or one per layer ({num_layers})"
        )

    @property
    def slot_key(self) -> tuple:
        """What fills a row of the steering table; requests that share it share a slot.
        The digest, not the name: two versions of one name are two configurations.
        Position scope is per request (a row property), so it is not part of the key. A
        combination's key holds every term's scale and layers."""
        return (self.digest or self.vector, self.scale, self.layers, self.mode, self._term_key)

    @property
    def _term_key(self) -> tuple:
        return tuple((t.scale, t.layers) for t in self.terms)

    def cache_salt(self, prompt_len: int) -> str:
        """Prefix-cache salt: KV computed under this steering must only be reused by
        requests with the same steering *of the same absolute positions* (scopes are
        relative to the prompt length, and vLLM caches full blocks of generated tokens
        too: a chat's turn 2 holds turn 1's reply in its prompt). See README, "Prefix
        caching"."""
        lo, hi = self.token_range(prompt_len)
        key = [self.digest or self.vector, repr(self.scale), self.layers, lo, None if hi >= _NO_LIMIT else hi]
        if self.mode != "add":
            key.append(self.mode)  # Fusion KV is not an additive request's (add keeps its salts)
        if self.terms:
            key.append([[t.scale, t.layers] for t in self.terms])
        return "roast:" + json.dumps(key, separators=(",", ":"))

    def token_range(self, prompt_len: int) -> tuple[int, int]:
        """``[lo, hi)`` of absolute token positions that are steered."""
        if self.mode == "fusion":
            return (1 if self.skip_first else 0), _NO_LIMIT
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
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SteeringRequestError(f"{key} must be a number, got {v!r:.80}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise SteeringRequestError(f"{key} must be a number, got {v!r:.80}") from None
    if not math.isfinite(f):
        raise SteeringRequestError(f"{key} must be finite, got {v!r:.80}")
    if abs(f) > MAX_SCALE:
        raise SteeringRequestError(f"{key}={f:g} is out of range: |{key}| must be <= {MAX_SCALE:g}")
    return f


def _as_scale(v: Any) -> float | tuple[float, ...]:
    """``steer_scale``: a number (or numeric string), or a list / ``"a,b,c"`` string of
    2..``MAX_SCALES`` numbers (one per third or per layer; checked against the model in
    :func:`check_against`). A one-entry list is that number."""
    if isinstance(v, str) and "," in v:
        v = [p for p in v.replace(" ", "").split(",")]
    if not isinstance(v, (list, tuple)):
        return _as_float("steer_scale", v)
    if not v or len(v) > MAX_SCALES:
        raise SteeringRequestError(
            f"steer_scale has {len(v)} entries; give one number, 3 (early / middle / late "
            "thirds of the layers) or one per layer"
        )
    out = tuple(_as_float("steer_scale", x) for x in v)
    return out[0] if len(out) == 1 else out


def _as_index(key: str, v: Any, what: str) -> int:
    """A non-negative int below ``MAX_INDEX`` from an int, an integral float or a numeric
    string; anything else (bool, inf, 1e400, "99999999999999999999") is refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SteeringRequestError(f"{key} {what} must be non-negative ints, got {v!r:.80}")
    try:
        if isinstance(v, str):
            v = v.strip()
            i = int(v) if len(v) <= 12 else MAX_INDEX + 1  # no 10k-digit int parsing
        elif isinstance(v, float):
            if not math.isfinite(v) or v != int(v):
                raise ValueError
            i = int(v)
        else:
            i = v
    except (TypeError, ValueError, OverflowError):
        raise SteeringRequestError(f"{key} {what} must be non-negative ints, got {v!r:.80}") from None
    if i < 0:
        raise SteeringRequestError(f"{key} {what} must be >= 0, got {i}")
    if i >= MAX_INDEX:
        raise SteeringRequestError(f"{key} {what} must be < {MAX_INDEX}, got {v!r:.80}")
    return i


def _as_layers(v: Any) -> tuple[int, ...]:
    if isinstance(v, str):
        parts = [p for p in v.replace(" ", "").split(",") if p]
    elif isinstance(v, (list, tuple)):
        parts = list(v)
    else:
        raise SteeringRequestError(
            f"steer_layers must be a list of layer indices (or '3,4,5'), got {v!r:.80}"
        )
    if len(parts) > 4096:
        raise SteeringRequestError(f"steer_layers has {len(parts)} entries; a model has far fewer layers")
    out = {_as_index("steer_layers", p, "entries") for p in parts}
    if not out:
        raise SteeringRequestError("steer_layers is empty; omit it to steer every layer of the vector")
    return tuple(sorted(out))


def _as_compact_layers(where: str, v: str) -> tuple[int, ...]:
    """``"3-5+9"`` -> ``(3, 4, 5, 9)``."""
    out: list[int] = []
    for part in v.split("+"):
        lo, sep, hi = part.partition("-")
        a = _as_index(where, lo, "entries")
        b = _as_index(where, hi, "entries") if sep else a
        if b < a or b - a >= 4096:
            raise SteeringRequestError(f"{where}: layer range {part!r} must be 'lo-hi' with lo <= hi")
        out.extend(range(a, b + 1))
    return _as_layers(out)


def _as_term(i: int, v: Any) -> SteerTerm:
    """One entry of ``steer_vectors``: ``{"name", "scale", "layers"}`` or
    ``"name[:scale][@layers]"``."""
    where = f"steer_vectors[{i}]"
    if isinstance(v, str):
        text, at, lay = v.strip().rpartition("@") if "@" in v else (v.strip(), "", "")
        name, colon, num = text.rpartition(":") if ":" in text else (text, "", "")
        scale = _as_float(f"{where} scale", num) if colon else 1.0
        layers = _as_compact_layers(where, lay) if at else None
    elif isinstance(v, dict):
        unknown = sorted(set(map(str, v)) - {"name", "scale", "layers"})
        if unknown:
            raise SteeringRequestError(f"{where}: unknown keys {unknown}; give name, scale, layers")
        name = v.get("name")
        scale = _as_float(f"{where} scale", v.get("scale", 1.0))
        try:
            layers = _as_layers(v["layers"]) if v.get("layers") is not None else None
        except SteeringRequestError as e:
            raise SteeringRequestError(f"{where}: {e}") from None
    else:
        raise SteeringRequestError(
            f'{where} must be {{"name": ..., "scale": ..., "layers": [...]}} or "name:scale", got {v!r:.80}'
        )
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise SteeringRequestError(
            f"{where}: the vector name must be a str of 1..{MAX_NAME_LEN} chars, got {name!r:.80}"
        )
    return SteerTerm(name, scale, layers)


def _as_terms(v: Any) -> tuple[SteerTerm, ...]:
    """``steer_vectors``: a list of entries, a compact ``"a:0.5,b:-0.3@3-5"`` string, or a
    JSON string of the list form (HTTP ``vllm_xargs`` values cannot be objects)."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            try:
                v = json.loads(text)
            except json.JSONDecodeError as e:
                raise SteeringRequestError(f"steer_vectors is not valid JSON: {e}") from None
        else:
            v = [p for p in text.split(",") if p.strip()]
    if not isinstance(v, (list, tuple)) or not v or len(v) > MAX_TERMS:
        raise SteeringRequestError(
            f"steer_vectors must list 1..{MAX_TERMS} vectors, e.g. "
            f'[{{"name": "a", "scale": 0.5}}, {{"name": "b", "scale": -0.3}}] or "a:0.5,b:-0.3"; '
            f"got {v!r:.80}"
        )
    return tuple(_as_term(i, x) for i, x in enumerate(v))


def parse_steer_args(extra_args: Any) -> SteerSpec | None:
    """Return the request's ``SteerSpec`` or ``None`` when it has no steer keys.

    Total: any value (of any type) gives a ``SteerSpec`` with bounded fields, ``None``, or
    a ``SteeringRequestError`` whose message names the offending key and says how to fix
    it. Internal ``roast_*`` keys are checked by :func:`check_internal_keys`.
    """
    if not extra_args:
        return None
    if not isinstance(extra_args, dict):
        raise SteeringRequestError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    present = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("steer_")}
    if not present:
        return None
    unknown = sorted(set(present) - set(KEYS))
    if unknown:
        raise SteeringRequestError(f"unknown steering keys {unknown}; valid keys are {list(KEYS)}")
    terms: tuple[SteerTerm, ...] = ()
    if "steer_vectors" in present:
        clash = sorted(
            k
            for k in ("steer_vector", "steer_scale", "steer_layers", "steer_mode", "steer_skip_first")
            if k in present
        )
        if clash:
            raise SteeringRequestError(
                f"give steer_vectors or {clash[0]}, not both: each entry of steer_vectors has "
                "its own name, scale and layers (combinations are additive only)"
            )
        terms = _as_terms(present["steer_vectors"])
        if len(terms) == 1:  # the single-vector request, same slot and cache salt
            t = terms[0]
            present = {**present, "steer_vector": t.vector, "steer_scale": t.scale}
            if t.layers is not None:
                present["steer_layers"] = list(t.layers)
            terms = ()
        else:
            present = {**present, "steer_vector": ",".join(t.compact() for t in terms)}
    name = present.get("steer_vector")
    if name is None:
        raise SteeringRequestError(
            f"steering keys {sorted(present)} given without steer_vector (or steer_vectors); "
            "name a registered vector"
        )
    if not terms and (not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN):
        raise SteeringRequestError(
            f"steer_vector must be a vector name (str of 1..{MAX_NAME_LEN} chars), got {name!r:.80}"
        )
    scale = _as_scale(present.get("steer_scale", 1.0))
    layers = _as_layers(present["steer_layers"]) if "steer_layers" in present else None
    positions = present.get("steer_positions", "all")
    if not isinstance(positions, str) or positions not in POSITIONS:
        raise SteeringRequestError(f"steer_positions={positions!r:.80} is not one of {list(POSITIONS)}")
    start = None
    if "steer_start" in present:
        start = _as_index("steer_start", present["steer_start"], "(a position)")
        if "steer_positions" in present:
            raise SteeringRequestError("give steer_positions or steer_start, not both")
    mode = present.get("steer_mode", "add")
    if not isinstance(mode, str) or mode not in MODES:
        raise SteeringRequestError(f"steer_mode={mode!r:.80} is not one of {list(MODES)}")
    skip_first = _as_bool("steer_skip_first", present.get("steer_skip_first", False))
    if mode == "fusion":
        scoped = sorted(k for k in ("steer_positions", "steer_start") if k in present)
        if scoped:
            raise SteeringRequestError(
                f"{scoped[0]} does not apply to steer_mode='fusion': Fusion Steering injects at "
                "every position (use steer_skip_first to leave out position 0)"
            )
    elif "steer_skip_first" in present:
        raise SteeringRequestError("steer_skip_first applies to steer_mode='fusion' only")
    digest = extra_args.get(DIGEST_KEY)
    if digest is not None and not (
        isinstance(digest, str)
        and len(parts := digest.split(",")) == max(len(terms), 1)
        and all(_DIGEST_RE.match(p) for p in parts)
    ):
        raise SteeringRequestError(f"{DIGEST_KEY} is set by roast-vllm's front end; do not send it")
    return SteerSpec(
        vector=name,
        scale=scale,
        layers=layers,
        positions=positions,
        start=start,
        digest=digest,
        mode=mode,
        skip_first=skip_first,
        terms=terms,
    )


def _as_bool(key: str, v: Any) -> bool:
    """A bool, 0/1 or "true"/"false" (vllm_xargs sends strings)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise SteeringRequestError(f"{key} must be true or false, got {v!r:.80}")


def check_internal_keys(extra_args: Any, *, capture_allowed: bool) -> None:
    """Refuse ``roast_*`` keys a client may not set (the message names the key)."""
    if not isinstance(extra_args, dict):
        return
    for k, v in extra_args.items():
        if not (isinstance(k, str) and k.startswith("roast_")):
            continue
        if k == DIGEST_KEY:
            if "steer_vector" not in extra_args and "steer_vectors" not in extra_args:
                raise SteeringRequestError(f"{DIGEST_KEY} is set by roast-vllm's front end; do not send it")
        elif k == CAPTURE_KEY:
            if not capture_allowed:
                raise SteeringRequestError(
                    f"{CAPTURE_KEY} (activation capture) is off on this engine; start it with the "
                    "roast config's allow_capture=True to use it"
                )
            if not isinstance(v, str) or not v or len(v) > MAX_NAME_LEN:
                raise SteeringRequestError(
                    f"{CAPTURE_KEY} must be a non-empty string id of at most {MAX_NAME_LEN} chars, "
                    f"got {v!r:.80}"
                )
        elif k == CAPTURE_FROM_KEY:
            if CAPTURE_KEY not in extra_args:
                raise SteeringRequestError(f"{CAPTURE_FROM_KEY} needs {CAPTURE_KEY} (a capture id)")
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_INDEX:
                raise SteeringRequestError(
                    f"{CAPTURE_FROM_KEY} must be a prompt position (int >= 0), got {v!r:.80}"
                )
        else:
            raise SteeringRequestError(f"unknown internal key {k!r}; roast_* keys are reserved")


@dataclass(frozen=True)
class VectorInfo:
    """What the front end needs to know of a registered vector to validate requests."""

    layers: tuple[int, ...]
    dim: int
    site: str
    digest: str = ""
    max_abs: float = 0.0  # largest |element| over all layers


#: Largest value steering may add to one activation, ``|scale| * max|v|``, by model dtype:
#: fp16 saturates at 65504 (a residual stream with +4096 still adds and normalizes
#: without overflow); other dtypes are bounded where steering stops meaning anything.
MAX_DELTA = {"float16": 4096.0}
MAX_DELTA_DEFAULT = 1.0e6


def max_delta(dtype: str | None) -> float:
    return MAX_DELTA.get(str(dtype or "").replace("torch.", ""), MAX_DELTA_DEFAULT)


def check_against(
    spec: SteerSpec,
    vectors: dict[str, VectorInfo],
    num_layers: int | None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    fusion: bool = True,
) -> None:
    """Check a spec against the registered vectors (name known, layers in range and
    present in the vector, start below the model's maximum length, bounded delta; Fusion
    only where the engine has it, on a residual reference). A combination: every term as
    its own request, and the sum of the terms' largest additions within the bound."""
    if spec.terms:
        total = 0.0
        for i, (t, one) in enumerate(zip(spec.terms, spec.term_specs())):
            try:
                check_against(one, vectors, num_layers, max_model_len, dtype, fusion)
            except SteeringRequestError as e:
                raise SteeringRequestError(f"steer_vectors[{i}] ({t.vector!r}): {e}") from None
            total += abs(t.scale) * vectors[t.vector].max_abs
        if total > max_delta(dtype):
            raise SteeringRequestError(
                f"steer_vectors {spec.vector!r} together would add up to {total:.3g} to an "
                f"activation; the limit for this model's dtype is {max_delta(dtype):g}"
            )
        return
    info = vectors.get(spec.vector)
    if info is None:
        known = sorted(vectors) or "none registered yet"
        raise SteeringRequestError(
            f"steer_vector: unknown steering vector {spec.vector!r}; registered: {known}. "
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
                f"steer_layers {missing}: vector {spec.vector!r} has no direction there; "
                f"it has layers {list(info.layers)}"
            )
    if isinstance(spec.scale, tuple) and num_layers is not None:
        spec.layer_scales(num_layers)  # 3 or num_layers entries, else a clear error
    if spec.start is not None and max_model_len is not None and spec.start >= max_model_len:
        raise SteeringRequestError(
            f"steer_start={spec.start} is beyond the model's maximum length {max_model_len}: "
            "nothing would be steered"
        )
    if spec.mode == "fusion":
        if not fusion:
            raise SteeringRequestError(
                "steer_mode='fusion': Fusion Steering is off on this engine; start it with the "
                "roast config's fusion=True (the default)"
            )
        if info.site != "residual":
            raise SteeringRequestError(
                f"steer_mode='fusion' needs a residual-stream reference; {spec.vector!r} is a "
                f"{info.site} vector"
            )
    limit = max_delta(dtype)
    if spec.max_abs_scale * info.max_abs > limit:
        raise SteeringRequestError(
            f"steer_scale={spec.max_abs_scale:g} too large for vector {spec.vector!r}: it would "
            f"add {spec.max_abs_scale * info.max_abs:.3g} to an activation (largest |element| "
            f"{info.max_abs:.3g}); the limit for this model's dtype is {limit:g}"
        )
