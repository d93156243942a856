"""The steered model wrapper: a stock vLLM ``*ForCausalLM`` whose decoder layers add
``table[l][token_slot]`` to the residual stream.

In vLLM's Llama-style layers the residual stream after layer ``l`` is
``hidden + residual`` (the next layer's fused add-RMSNorm sums them), so adding the
steering to ``hidden`` adds it to the stream. The per-token slots are computed by the
model runner hook before each forward (``roast_vllm.engine.runner``); the model (eager,
compiled or replayed as a CUDA graph) only reads the in-place-updated buffers.

Classes are made on first access (module ``__getattr__``) so that importing this module
does not import every model family.
"""

from __future__ import annotations

import importlib

import torch

from roast_vllm.engine.config import RoastConfig
from roast_vllm.engine.models import FAMILIES, PREFIX
from roast_vllm.engine.runner import find_model_runner, install_step_hook
from roast_vllm.engine.state import SteeringState, set_state
from roast_vllm.vector import SteeringVector

_layer_classes: dict[type, type] = {}
_mlp_classes: dict[type, type] = {}
_model_classes: dict[str, type] = {}


def _steered_layer_class(base: type) -> type:
    cls = _layer_classes.get(base)
    if cls is None:

        def forward(self, positions, hidden_states, residual, *args, **kwargs):
            hidden_states, residual = base.forward(self, positions, hidden_states, residual, *args, **kwargs)
            state = self._roast_state
            if not torch.compiler.is_compiling():
                state.capture_residual(self._roast_layer, hidden_states, residual)
            # Fusion rows and the other steered rows are disjoint: the order does not matter
            hidden_states = state.apply_fusion(self._roast_layer, hidden_states, residual)
            return state.apply(self._roast_layer, hidden_states), residual

        cls = type(f"Steered{base.__name__}", (base,), {"forward": forward})
        _layer_classes[base] = cls
    return cls


def _steered_mlp_class(base: type) -> type:
    """The stock gated MLP (``gate_up_proj -> act_fn -> down_proj``, as in every family
    of ``FAMILIES``) with the ``mlp_act`` site exposed between act_fn and down_proj."""
    cls = _mlp_classes.get(base)
    if cls is None:

        def forward(self, x):
            gate_up, _ = self.gate_up_proj(x)
            act = self._roast_state.apply_mlp(self._roast_layer, self.act_fn(gate_up), gate_up)
            out, _ = self.down_proj(act)
            return out

        cls = type(f"Steered{base.__name__}", (base,), {"forward": forward})
        _mlp_classes[base] = cls
    return cls


def _attach_steering(self, vllm_config) -> None:
    cfg = RoastConfig.from_vllm_config(vllm_config) or RoastConfig()
    hf = vllm_config.model_config.hf_text_config
    sched = vllm_config.scheduler_config
    from vllm.config import CompilationMode
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    compiled = (
        not vllm_config.model_config.enforce_eager
        and vllm_config.compilation_config.mode != CompilationMode.NONE
    )
    mlp_size = int(getattr(hf, "intermediate_size", 0) or 0) if cfg.mlp_act_site else 0
    state = SteeringState(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        max_slots=cfg.max_steering_slots,
        max_num_seqs=sched.max_num_seqs,
        max_num_tokens=sched.max_num_batched_tokens + 1024,
        dtype=vllm_config.model_config.dtype,
        device=None,  # the loader's device context
        mlp_size=mlp_size,
        mlp_shard=(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()),
        compiled=compiled,
        allow_capture=cfg.allow_capture,
        max_capture_bytes=cfg.max_capture_mib << 20,
        fusion=cfg.fusion,
    )
    self.roast_state = state
    inner = self.model
    for idx in range(inner.start_layer, inner.end_layer):
        layer = inner.layers[idx]
        layer.__class__ = _steered_layer_class(type(layer))
        # object.__setattr__: a plain reference, not a child module (keeps names and
        # state_dict of the stock model unchanged).
        object.__setattr__(layer, "_roast_state", state)
        object.__setattr__(layer, "_roast_layer", idx)
        mlp = getattr(layer, "mlp", None)
        if mlp_size and mlp is not None:
            if not all(hasattr(mlp, a) for a in ("gate_up_proj", "act_fn", "down_proj")):
                raise TypeError(
                    f"roast-vllm: {type(mlp).__name__} is not a gated MLP; set the roast config's "
                    "mlp_act_site=False to steer the residual stream only"
                )
            mlp.__class__ = _steered_mlp_class(type(mlp))
            object.__setattr__(mlp, "_roast_state", state)
            object.__setattr__(mlp, "_roast_layer", idx)
    for name, path in cfg.vectors.items():
        state.register_vector(name, SteeringVector.load(path))
    # Fails engine start on a runner we cannot hook (never serve steering unsteered).
    install_step_hook(find_model_runner(), state)
    set_state(state)


def steered_model_class(name: str) -> type:
    """``Roast<Arch>``: the steered subclass of the stock ``<Arch>`` class."""
    cls = _model_classes.get(name)
    if cls is None:
        stock = name[len(PREFIX) :] if name.startswith(PREFIX) else None
        if stock not in FAMILIES:
            raise AttributeError(name)
        module, base_name = FAMILIES[stock]
        base = getattr(importlib.import_module(module), base_name)

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
            base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
            _attach_steering(self, vllm_config)

        # No forward override: under a full CUDA graph the model's Python does not run, so
        # per-step slots are prepared by the model runner hook (roast_vllm.engine.runner).
        cls = type(name, (base,), {"__init__": __init__, "__module__": __name__})
        cls.__qualname__ = name
        _model_classes[name] = cls
    return cls


def __getattr__(name: str) -> type:
    if name.startswith(PREFIX):
        return steered_model_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
