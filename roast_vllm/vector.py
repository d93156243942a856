"""``SteeringVector``: per-layer directions for one activation site, with arithmetic and
pickle-free safetensors I/O.

A vector holds ``directions = {layer: Tensor[dim]}`` (float32, CPU). For the residual
stream ``dim`` is the model's hidden size; ROAST's ``mlp_act`` site has ``dim`` equal to
the MLP intermediate size. Steering adds ``scale * directions[l]`` at layer ``l``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Activation sites a vector can target. ``residual``: the residual stream after a
#: decoder layer. ``mlp_act``: SiLU(gate_proj x), before the multiply by up_proj.
SITES = ("residual", "mlp_act")

_META_KEY = "roast_vllm"
_FORMAT_VERSION = 1


class SteeringVectorError(ValueError):
    """A steering vector is malformed or does not fit the model it is used with."""


@dataclass
class SteeringVector:
    """Per-layer steering directions for one site.

    Example::

        v = SteeringVector(directions={10: torch.randn(576)}, method="caa")
        w = 2.5 * v - v           # arithmetic keeps metadata of the left operand
        v.save("happy.safetensors"); SteeringVector.load("happy.safetensors")
    """

    directions: dict[int, torch.Tensor]
    """``{layer index: Tensor[dim]}``; stored as contiguous float32 on CPU."""
    site: str = "residual"
    """Where the vector is added: ``residual`` or ``mlp_act`` (see ``SITES``)."""
    model_id: str | None = None
    """The model the vector was estimated on (a path or a hub-style name), if known."""
    hidden_size: int | None = None
    """Vector dimension; inferred from the directions when not given."""
    num_layers: int | None = None
    """Layer count of the model the vector was made for; checked against the layers."""
    method: str | None = None
    """How it was made: ``caa``, ``roast``, ``fusion``, ``random``, ..."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serializable record of data, options and seeds."""

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise SteeringVectorError(f"unknown site {self.site!r}; use one of {SITES}")
        if not isinstance(self.directions, dict) or not self.directions:
            raise SteeringVectorError(
                "SteeringVector has no directions: pass directions={layer: tensor[hidden]} "
                "with at least one layer"
            )
        clean: dict[int, torch.Tensor] = {}
        for layer, t in self.directions.items():
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise SteeringVectorError(f"layer keys must be non-negative ints, got {layer!r}")
            t = torch.as_tensor(t)
            if t.dim() != 1:
                raise SteeringVectorError(
                    f"direction for layer {layer} must be 1-D [hidden], got shape {tuple(t.shape)}"
                )
            if not t.is_floating_point():
                raise SteeringVectorError(
                    f"direction for layer {layer} must be floating point, got {t.dtype}"
                )
            t = t.detach().to("cpu", torch.float32).contiguous()
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise SteeringVectorError(
                    f"direction for layer {layer} has {bad} non-finite values (NaN/Inf); "
                    "re-estimate the vector or drop that layer"
                )
            clean[int(layer)] = t
        dims = {t.numel() for t in clean.values()}
        if len(dims) != 1:
            raise SteeringVectorError(f"all directions must have the same size, got sizes {sorted(dims)}")
        dim = dims.pop()
        if self.hidden_size is None:
            self.hidden_size = dim
        elif self.hidden_size != dim:
            raise SteeringVectorError(f"hidden_size={self.hidden_size} but directions have size {dim}")
        if self.num_layers is not None:
            over = [l for l in clean if l >= self.num_layers]
            if over:
                raise SteeringVectorError(f"layers {over} out of range for num_layers={self.num_layers}")
        self.directions = dict(sorted(clean.items()))

    # ------------------------------------------------------------------ info
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def __repr__(self) -> str:
        return (
            f"SteeringVector(site={self.site!r}, layers={self.layers}, dim={self.hidden_size}, "
            f"method={self.method!r}, model_id={self.model_id!r})"
        )

    def validate_for(self, num_layers: int, dim: int, what: str = "model") -> None:
        """Raise ``SteeringVectorError`` unless the vector fits a model with ``num_layers``
        layers and activation size ``dim`` at this vector's site."""
        if self.hidden_size != dim:
            raise SteeringVectorError(
                f"vector has size {self.hidden_size} but the {what}'s {self.site} "
                f"activations have size {dim}: the vector was made for a different model "
                f"(model_id={self.model_id!r}); estimate one on this model"
            )
        over = [l for l in self.directions if l >= num_layers]
        if over:
            raise SteeringVectorError(
                f"vector has layers {over} but the {what} has {num_layers} layers "
                f"(0..{num_layers - 1}); drop those layers or use the right model"
            )
        if self.num_layers is not None and self.num_layers != num_layers:
            raise SteeringVectorError(
                f"vector was made for a {self.num_layers}-layer model, the {what} has {num_layers} layers"
            )

    def digest(self) -> str:
        """16 hex chars identifying what steering does with this vector: site and the
        exact fp32 directions (metadata excluded). Front end and workers compute it
        independently; a request is pinned to the digest current when it was submitted."""
        import hashlib

        h = hashlib.sha256(f"{self.site}:{self.hidden_size}".encode())
        for l, t in self.directions.items():
            h.update(l.to_bytes(4, "little"))
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def max_abs(self) -> float:
        """Largest ``|element|`` over all layers (bounds what a scale may add)."""
        return max(float(t.abs().max()) for t in self.directions.values())

    # ------------------------------------------------------------ arithmetic
    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.site != self.site or other.hidden_size != self.hidden_size:
            raise SteeringVectorError(
                f"cannot combine vectors with site/size {self.site}/{self.hidden_size} "
                f"and {other.site}/{other.hidden_size}"
            )
        out = {l: t.clone() for l, t in self.directions.items()}
        for l, t in other.directions.items():
            out[l] = out[l] + sign * t if l in out else sign * t
        return replace(self, directions=out, provenance=dict(self.provenance))

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, k: float) -> SteeringVector:
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            return NotImplemented
        if not math.isfinite(float(k)):
            raise SteeringVectorError(f"cannot scale a vector by non-finite {k!r}")
        return replace(
            self,
            directions={l: t * float(k) for l, t in self.directions.items()},
            provenance=dict(self.provenance),
        )

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> SteeringVector:
        return self * (1.0 / float(k))

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return (
            self._meta() == other._meta()
            and self.directions.keys() == other.directions.keys()
            and all(torch.equal(t, other.directions[l]) for l, t in self.directions.items())
        )

    # -------------------------------------------------------------------- io
    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "site": self.site,
            "model_id": self.model_id,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "method": self.method,
            "provenance": self.provenance,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f"layer.{l}": t for l, t in self.directions.items()}

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file (tensors ``layer.<i>``, JSON metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(path), metadata={_META_KEY: json.dumps(self._meta())})
        return path

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save(self._tensors(), metadata={_META_KEY: json.dumps(self._meta())})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> SteeringVector:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
        except (SafetensorError, ValueError, UnicodeDecodeError) as e:
            raise SteeringVectorError(f"{source}: not a valid safetensors vector ({e})") from e
        return cls._from_parts(tensors, header.get("__metadata__") or {}, source)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a file written by :meth:`save`, or a llama.cpp / repeng control-vector GGUF
        (:meth:`load_gguf`, told apart by its magic bytes). Never unpickles anything."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise SteeringVectorError(f"vector file {str(path)!r} does not exist")
        with open(path, "rb") as fh:
            if fh.read(4) == b"GGUF":
                return cls.load_gguf(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SteeringVectorError(
                f"{path}: cannot read steering vector ({e}); the file is truncated or not "
                "a safetensors file written by SteeringVector.save"
            ) from e
        return cls._from_parts(tensors, meta, str(path))

    @classmethod
    def _from_parts(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str
    ) -> SteeringVector:
        if _META_KEY not in meta:
            raise SteeringVectorError(
                f"{source}: safetensors file has no '{_META_KEY}' metadata; it was not "
                "written by SteeringVector.save"
            )
        try:
            info = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as e:
            raise SteeringVectorError(f"{source}: metadata is not valid JSON ({e})") from e
        directions = {}
        for k, t in tensors.items():
            if not k.startswith("layer.") or not k[6:].isdigit():
                raise SteeringVectorError(f"{source}: unexpected tensor name {k!r}")
            directions[int(k[6:])] = t
        info.pop("format_version", None)
        try:
            return cls(directions=directions, **info)
        except TypeError as e:
            raise SteeringVectorError(f"{source}: bad metadata ({e})") from e

    # ------------------------------------------------------- llama.cpp / repeng GGUF
    def save_gguf(self, path: str | Path, model_hint: str = "llama", drop_layer0: bool = False) -> Path:
        """Write a llama.cpp control vector (also repeng's ``export_gguf`` format): GGUF with
        architecture ``controlvector``, ``controlvector.model_hint`` (repeng requires it),
        ``controlvector.layer_count`` (the number of directions, as repeng writes it) and
        one F32 tensor ``direction.<l>`` per layer. Numbering is the same on all three
        sides: llama.cpp adds ``direction.l`` to the output of block ``l`` (0-based,
        ``build_cvec(cur, il)`` after the layer), as repeng and this project do. llama.cpp
        rejects a file with ``direction.0`` (it cannot steer block 0): such a vector
        raises unless ``drop_layer0``. Residual-stream vectors only. This project's own
        metadata rides along as ``roast_vllm.metadata`` (ignored by llama.cpp), so a round
        trip through :meth:`load_gguf` is exact."""
        import gguf

        if self.site != "residual":
            raise SteeringVectorError(
                f"llama.cpp control vectors steer the residual stream; this is a {self.site} vector"
            )
        dirs = dict(self.directions)
        if 0 in dirs:
            if not drop_layer0:
                raise SteeringVectorError(
                    "the vector has a direction at layer 0, which llama.cpp cannot apply (it "
                    "rejects a file with direction.0); pass drop_layer0=True (--drop-layer0) to "
                    "leave it out"
                )
            del dirs[0]
        if not dirs:
            raise SteeringVectorError("nothing to write: the vector's only layer is 0")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arch = "controlvector"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_string(f"{arch}.model_hint", model_hint)
        w.add_uint32(f"{arch}.layer_count", len(dirs))
        meta = self._meta()
        if len(dirs) != len(self.directions):
            meta["provenance"] = {**self.provenance, "dropped_layers": [0]}
        w.add_string(f"{_META_KEY}.metadata", json.dumps(meta))
        for l, t in dirs.items():
            w.add_tensor(f"direction.{l}", t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    @classmethod
    def load_gguf(cls, path: str | Path) -> SteeringVector:
        """Read a llama.cpp / repeng control vector (``direction.<l>`` F32 tensors, see
        :meth:`save_gguf`); metadata this project wrote is restored, a foreign file's
        ``model_hint`` becomes ``model_id``."""
        import gguf

        path = Path(path)
        if not path.is_file():
            raise SteeringVectorError(f"vector file {str(path)!r} does not exist")
        try:
            r = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises a variety of errors on a bad file
            raise SteeringVectorError(f"{path}: not a GGUF file ({e})") from e

        def text(key: str) -> str | None:
            f = r.get_field(key)
            return None if f is None or not len(f.parts) else bytes(f.parts[-1]).decode("utf-8", "replace")

        arch = text("general.architecture")
        if arch != "controlvector":
            raise SteeringVectorError(
                f"{path}: GGUF architecture is {arch!r}, not 'controlvector': not a control vector"
            )
        directions: dict[int, torch.Tensor] = {}
        for t in r.tensors:
            name = t.name
            if not name.startswith("direction.") or not name[10:].isdigit():
                raise SteeringVectorError(f"{path}: unexpected tensor {name!r} (want direction.<layer>)")
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise SteeringVectorError(f"{path}: {name} is {t.tensor_type.name}, llama.cpp needs F32")
            directions[int(name[10:])] = torch.from_numpy(t.data.copy()).reshape(-1)
        if not directions:
            raise SteeringVectorError(f"{path}: no direction.<layer> tensors")
        raw = text(f"{_META_KEY}.metadata")
        info: dict[str, Any] = {}
        if raw:
            try:
                info = json.loads(raw)
            except json.JSONDecodeError as e:
                raise SteeringVectorError(f"{path}: {_META_KEY}.metadata is not JSON ({e})") from e
            info.pop("format_version", None)
        else:
            info = {"model_id": text("controlvector.model_hint"), "method": "llama.cpp control vector"}
            info["provenance"] = {"source": str(path)}
        try:
            return cls(directions=directions, **info)
        except TypeError as e:
            raise SteeringVectorError(f"{path}: bad metadata ({e})") from e

    # ------------------------------------------------------- repeng ControlVector
    @classmethod
    def from_repeng(
        cls,
        control_vector: Any,
        layers: Iterable[int] | None = None,
        *,
        num_layers: int | None = None,
        model_id: str | None = None,
    ) -> SteeringVector:
        """A residual-stream vector from repeng's ``ControlVector`` (duck-typed: anything with
        ``model_type: str`` and ``directions: {layer: array[hidden]}``; repeng is not imported).

        Numbering is the same as ours, no shift: repeng's ``ControlModel`` replaces
        ``model.model.layers[i]`` with a ``ControlModule`` whose forward is
        ``output = self.block(*args, **kwargs)`` then ``modified = self.params.operator(modified,
        control * mask)`` (``current + control``) on that output, with ``control = coeff *
        directions[i]`` from ``set_control``: ``directions[i]`` is added to the output of
        block ``i`` (0-based), exactly where this project adds ``scale * directions[i]``.
        (``ControlVector.train`` reads ``out.hidden_states[layer + 1]``, the same block's
        output.) ``ControlModel(model, layer_ids).set_control(cv, coeff)`` is therefore
        ``SteeringVector.from_repeng(cv, layer_ids, num_layers=L)`` at ``steer_scale=coeff``
        (repeng's mask spares only left padding: every position is steered, our default
        ``steer_positions="all"``).

        ``layers``: keep only these layers, as ``ControlModel``'s ``layer_ids`` (negative ids
        count from ``num_layers``, which they then need); default all of them. Directions
        become float32 (what the engine adds): bit-exact for repeng's own float32 vectors
        (``train``, ``import_gguf``). A vector made by :meth:`to_repeng` and not changed
        since gets this project's metadata back (the round trip is exact); otherwise
        ``model_id`` defaults to ``model_type`` (as :meth:`load_gguf` does with repeng's
        ``model_hint``) and the model type is kept in ``provenance`` for :meth:`to_repeng`.
        """
        try:
            model_type, raw = control_vector.model_type, control_vector.directions
        except AttributeError as e:
            raise SteeringVectorError(
                f"not a repeng ControlVector ({type(control_vector).__name__} has no model_type / directions)"
            ) from e
        if not isinstance(raw, dict):
            raise SteeringVectorError(f"ControlVector.directions must be a dict, got {type(raw).__name__}")
        directions = {}
        for l, d in raw.items():
            try:
                # a copy: repeng's arrays (a read-only GGUF memmap after import_gguf) stay
                # theirs; float32 arrays are taken bit for bit
                directions[l] = torch.tensor(np.asarray(d))
            except (TypeError, ValueError, RuntimeError) as e:
                raise SteeringVectorError(
                    f"ControlVector direction {l!r} is not a numeric array ({e})"
                ) from e
        if layers is not None:
            picked = {}
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                    raise SteeringVectorError(f"layer ids must be ints, got {i!r}")
                if i < 0:
                    if num_layers is None:
                        raise SteeringVectorError(
                            f"layer id {i} counts from the end: pass num_layers (the model's layer count)"
                        )
                    i += num_layers
                if i not in directions:
                    raise SteeringVectorError(
                        f"the ControlVector has no direction for layer {i} (it has {sorted(directions)})"
                    )
                picked[int(i)] = directions[i]
            directions = picked
        meta: dict[str, Any] = {
            "model_id": model_type if model_id is None else model_id,
            "method": "repeng",
            "provenance": {"source": "repeng ControlVector", "repeng_model_type": model_type},
        }
        vec = cls(directions=directions, num_layers=num_layers, **meta)
        ours = getattr(control_vector, _REPENG_META_ATTR, None)
        if isinstance(ours, dict) and ours.get("digest") == vec.digest():
            info = json.loads(ours["metadata"])
            info.pop("format_version", None)
            if num_layers is not None:
                info["num_layers"] = num_layers
            if model_id is not None:
                info["model_id"] = model_id
            vec = cls(directions=vec.directions, **info)
        return vec

    def to_repeng(self, model_type: str | None = None) -> Any:
        """repeng's ``ControlVector`` with these directions (float32 numpy copies, same layer
        numbering: see :meth:`from_repeng`), for ``ControlModel.set_control`` or
        ``export_gguf``. ``model_type`` (repeng's ``model.config.model_type``, written as
        the GGUF ``model_hint``) defaults to the one :meth:`from_repeng` recorded, or the
        ``model_hint`` of a foreign GGUF file :meth:`load_gguf` read, else ``"llama"`` (as
        :meth:`save_gguf`). This project's metadata rides along as an extra
        attribute, so :meth:`from_repeng` gives back an equal vector while the directions
        are unchanged (repeng's arithmetic makes new objects without it). Residual-stream
        vectors only. Needs repeng (``pip install --no-deps repeng``)."""
        if self.site != "residual":
            raise SteeringVectorError(
                f"repeng's ControlModel steers the residual stream; this is a {self.site} vector"
            )
        repeng = _import_repeng()
        if model_type is None:
            model_type = self.provenance.get("repeng_model_type")
        if model_type is None and self.method == "llama.cpp control vector":
            model_type = self.model_id  # load_gguf put a foreign file's model_hint there
        if model_type is None:
            model_type = "llama"
        cv = repeng.ControlVector(
            model_type=model_type, directions={l: t.numpy().copy() for l, t in self.directions.items()}
        )
        setattr(cv, _REPENG_META_ATTR, {"digest": self.digest(), "metadata": json.dumps(self._meta())})
        return cv

    # ------------------------------------------------------------- helpers
    def dense(self, num_layers: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Tensor[num_layers, dim]`` with zeros on layers the vector does not have."""
        out = torch.zeros(num_layers, self.hidden_size, dtype=dtype)
        for l, t in self.directions.items():
            out[l] = t.to(dtype)
        return out

    @classmethod
    def random(
        cls, num_layers: int, dim: int, layers: list[int] | None = None, seed: int = 0, **meta
    ) -> SteeringVector:
        """Unit-norm random directions (a control for experiments and benchmarks)."""
        g = torch.Generator().manual_seed(seed)
        layers = list(range(num_layers)) if layers is None else layers
        dirs = {l: torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0) for l in layers}
        meta.setdefault("method", "random")
        meta.setdefault("provenance", {"seed": seed})
        return cls(directions=dirs, num_layers=num_layers, **meta)


#: Attribute of a ``ControlVector`` made by ``to_repeng`` that carries this project's metadata.
_REPENG_META_ATTR = "roast_vllm_metadata"


def _import_repeng():
    """Import repeng, or say how to install it. repeng 0.4.0 (the newest release) pins
    ``numpy<2`` and names ``np.float_`` in annotations evaluated when it is imported; NumPy 2
    (which vLLM needs) removed that alias of ``np.float64``, so it is put back when absent
    (the very object NumPy 1 had; repeng uses it in type hints only)."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    try:
        import repeng
    except ModuleNotFoundError as e:
        if e.name != "repeng":
            raise
        raise ImportError(
            "repeng is not installed: pip install --no-deps repeng (its numpy<2 pin conflicts "
            "with vLLM's numpy 2; its other dependencies come with roast-vllm and scikit-learn)"
        ) from e
    return repeng
