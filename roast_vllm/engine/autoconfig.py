"""Steering switched on by ``additional_config={"roast": {...}}`` alone, so that stock

    vllm serve MODEL --additional-config '{"roast": {"vectors": {"happy": "/abs/happy.safetensors"}}}'

steers (and so does ``vllm.LLM(MODEL, additional_config={"roast": {...}})``).

Why a wrapper: vLLM 0.32 resolves the model's architecture in ``ModelConfig.__post_init__``,
inside ``EngineArgs.create_engine_config``, and no plugin hook runs between the parsing of
the engine arguments and that point (general plugins load in ``EngineArgs.__post_init__``
and ``add_cli_args``; the platform's ``check_and_update_config`` runs after the
architecture is fixed). So the plugin's ``register()`` wraps
``EngineArgs.create_engine_config`` (once per process; ``install`` is idempotent). When the
arguments carry a ``roast`` entry and steering is not on yet (``roast_vllm.LLM`` and
``roast-vllm serve`` switch it on themselves), the wrapper fills in what they would, before
vLLM builds its config: the ``Roast<Arch>`` architecture override, the tracker logits
processor, the scheduler and worker extension, the CPU dtype rule and bounded CPU steps
(only where the user left vLLM's defaults). After the build it completes the ``roast``
entry from the built config (layer count, model length, dtype).

Every process sees the same setup: vLLM builds the config once, in the front-end process,
and hands it to the engine core and the workers as an object (not rebuilt there; also
true under spawn). The front end's request validation has no config; it reads
``ROAST_VLLM_CONFIG``, which the wrapper sets for this process and its children (a
different value already there, e.g. left from the flags this plugin used to need, is
replaced with a warning). Without a ``roast`` entry the
wrapper does nothing at all.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any

from roast_vllm.engine.config import CONFIG_KEY, RoastConfig

_MARK = "_roast_vllm_wrapper"
logger = logging.getLogger("roast_vllm")

#: ``EngineArgs`` fields ``check_supported`` looks at.
_CHECKED = (
    "speculative_config",
    "runner",
    "convert",
    "pipeline_parallel_size",
    "kv_transfer_config",
    "kv_offloading_size",
)


def install() -> bool:
    """Wrap ``EngineArgs.create_engine_config`` (if vLLM's ``arg_utils`` is loaded in this
    process: it is wherever engine arguments are built, which is where ``register()`` is
    called from). Returns whether the wrapper is in place; calling again changes nothing."""
    mod = sys.modules.get("vllm.engine.arg_utils")
    if mod is None:
        return False
    cls = mod.EngineArgs
    orig = cls.create_engine_config
    if getattr(orig, _MARK, False):
        return True

    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        steering = prepare(self)
        cfg = orig(self, *args, **kwargs)
        if steering:
            complete(cfg)
        return cfg

    setattr(create_engine_config, _MARK, True)
    cls.create_engine_config = create_engine_config
    return True


def wants_steering(engine_args) -> bool:
    extra = getattr(engine_args, "additional_config", None)
    return isinstance(extra, dict) and CONFIG_KEY in extra


def steering_on(engine_args) -> bool:
    """Switched on already (``roast_vllm.LLM``, ``roast-vllm serve``, or by hand)."""
    from roast_vllm.engine.tracker import QUALNAME as TRACKER

    return TRACKER in (getattr(engine_args, "logits_processors", None) or [])


def prepare(engine_args) -> bool:
    """Fill in the steering switches on ``engine_args`` (in place) if its ``roast`` entry
    asks for steering and they are not set; returns whether it did."""
    if not wants_steering(engine_args) or steering_on(engine_args):
        return False
    from roast_vllm.engine.args import default_dtype, on_cpu, step_bounds
    from roast_vllm.engine.llm import steering_engine_kwargs

    ea = engine_args
    user = ea.additional_config[CONFIG_KEY]
    if not isinstance(user, dict):
        raise ValueError(
            f"additional_config['{CONFIG_KEY}'] must be a JSON object of RoastConfig fields, got {user!r}"
        )
    RoastConfig.from_dict(user)  # unknown keys and bad values fail here, before any engine
    if callable(ea.hf_overrides):
        raise ValueError("steering needs dict hf_overrides (it overrides the architecture), not a callable")
    cpu = on_cpu()
    if ea.dtype in (None, "auto") and (dtype := default_dtype(cpu)) is not None:
        ea.dtype = dtype
    sched = {
        k: getattr(ea, k)
        for k in ("enable_chunked_prefill", "max_num_batched_tokens", "max_model_len")
        if getattr(ea, k) is not None
    }
    for k, v in step_bounds(sched, seeded=None, cpu=cpu).items():  # clients may send seeds
        if k not in sched:
            setattr(ea, k, v)
    given: dict[str, Any] = {k: getattr(ea, k, None) for k in _CHECKED}
    rest = {k: v for k, v in ea.additional_config.items() if k != CONFIG_KEY}
    kw = steering_engine_kwargs(
        ea.model,
        user.get("max_steering_slots", 64),
        user.get("vectors"),
        user.get("mlp_act_site", True),
        user.get("allow_capture", False),
        user.get("fusion", True),
        hf_overrides=ea.hf_overrides or {},
        logits_processors=ea.logits_processors,
        scheduler_cls=ea.scheduler_cls,
        worker_extension_cls=ea.worker_extension_cls,
        additional_config=rest,
        max_model_len=ea.max_model_len,
        dtype=ea.dtype,
        **{k: v for k, v in given.items() if v is not None},
    )
    roast = {**kw["additional_config"][CONFIG_KEY], **user}  # the user's explicit fields win
    _check_vectors(ea.model, roast.get("vectors") or {})
    ea.hf_overrides = kw["hf_overrides"]
    ea.logits_processors = kw["logits_processors"]
    ea.scheduler_cls = kw["scheduler_cls"]
    ea.worker_extension_cls = kw["worker_extension_cls"]
    ea.additional_config = {**rest, CONFIG_KEY: RoastConfig.from_dict(roast).to_dict()}
    # steering follows the persistent batch through the V1 runner's logits-processor
    # updates (README, "Which model runner"); children inherit the environment
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return True


def _check_vectors(model: str, vectors: dict[str, str]) -> None:
    """Every server-side vector loads (no pickle) and fits the model, before any engine
    starts (workers and the front end load them again)."""
    from roast_vllm.engine.llm import site_dim
    from roast_vllm.engine.model_prep import model_dims
    from roast_vllm.vector import SteeringVector

    dims = model_dims(model)
    for name, path in vectors.items():
        try:
            v = SteeringVector.load(path)
            v.validate_for(dims["num_layers"], site_dim(dims, v.site))
        except ValueError as e:
            raise ValueError(f"roast vector {name!r} ({path}): {e}") from e


def complete(vllm_config) -> None:
    """The ``roast`` entry completed from the built config (what the front end checks
    requests against), and ``ROAST_VLLM_CONFIG`` set from it."""
    roast = vllm_config.additional_config[CONFIG_KEY]
    mc = vllm_config.model_config
    roast["max_model_len"] = mc.max_model_len
    roast["model_dtype"] = str(mc.dtype).replace("torch.", "")
    roast["num_layers"] = mc.hf_text_config.num_hidden_layers
    roast["hidden_size"] = mc.get_hidden_size()
    mlp = getattr(mc.hf_text_config, "intermediate_size", None)
    roast["mlp_size"] = int(mlp) if roast.get("mlp_act_site", True) and mlp else 0
    cfg = RoastConfig.from_dict(roast)
    value = json.dumps(cfg.to_dict(), sort_keys=True)
    from roast_vllm import envs

    current = envs.get("ROAST_VLLM_CONFIG")
    if current and current != value:
        # e.g. left in the shell from the flags this plugin used to need: this process's
        # front end and its children read the engine's own config from now on
        logger.warning("roast-vllm: replacing ROAST_VLLM_CONFIG with the engine's roast config: %s", value)
    os.environ["ROAST_VLLM_CONFIG"] = value
    from roast_vllm.engine import registry

    registry.reset()  # re-read from the environment on first use
