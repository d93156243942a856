"""The vLLM entry-point plugin: declared, cheap, idempotent, leaves stock models alone."""

import importlib.metadata as md
import subprocess
import sys

import pytest


def test_entry_point_declared():
    eps = md.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "roast_vllm" and ep.value == "roast_vllm.engine.plugin:register" for ep in eps)


def test_register_is_idempotent_and_keeps_stock_archs():
    from vllm import ModelRegistry

    from roast_vllm.engine.models import FAMILIES
    from roast_vllm.engine.plugin import register

    register()
    register()
    archs = set(ModelRegistry.get_supported_archs())
    for stock in FAMILIES:
        assert stock in archs and "Roast" + stock in archs
    from vllm.model_executor.models import llama

    assert llama.LlamaForCausalLM.__name__ == "LlamaForCausalLM"
    assert not hasattr(llama.LlamaForCausalLM, "roast_state")


def test_import_is_light():
    """`import roast_vllm` must not pull in vLLM, Triton or CUDA (GPU-less machines)."""
    code = (
        "import sys, roast_vllm, roast_vllm.engine.plugin; "
        "bad=[m for m in ('vllm','triton') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_steered_class_subclasses_stock():
    from roast_vllm.engine.models.steered import steered_model_class

    cls = steered_model_class("RoastLlamaForCausalLM")
    from vllm.model_executor.models.llama import LlamaForCausalLM

    assert issubclass(cls, LlamaForCausalLM) and cls.__module__ == "roast_vllm.engine.models.steered"


# ------------------------------------------------------------------ stock `vllm serve`
@pytest.fixture
def clean_env(monkeypatch):
    """The wrapper sets ROAST_VLLM_CONFIG in os.environ; record its absence first so it
    is removed again afterwards (later tests' engines and servers inherit the env) and
    leave the front-end registry empty."""
    from roast_vllm.engine import registry

    monkeypatch.setenv("ROAST_VLLM_CONFIG", "")
    monkeypatch.delenv("ROAST_VLLM_CONFIG")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    yield
    registry.reset()


def _engine_config(model_dir, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_dir, max_model_len=1024, **kw).create_engine_config()


def test_additional_config_alone_switches_steering_on(model_dir, tmp_path, clean_env):
    """What stock `vllm serve MODEL --additional-config '{"roast": {...}}'` builds: the
    plugin's wrapper of EngineArgs.create_engine_config fills in the architecture override,
    the tracker, the scheduler and worker extension, completes the roast entry from the
    built config and hands it to the front end's validation (ROAST_VLLM_CONFIG)."""
    import json

    from roast_vllm import SteeringVector
    from roast_vllm.engine import registry
    from roast_vllm.engine.scheduler import QUALNAME as SCHED
    from roast_vllm.engine.tracker import QUALNAME as TRACKER
    from roast_vllm.engine.worker import QUALNAME as WORKER

    vec = SteeringVector.random(30, 576, seed=0).save(tmp_path / "v.safetensors")
    roast = {"max_steering_slots": 8, "vectors": {"v": str(vec)}}
    cfg = _engine_config(model_dir, additional_config={"roast": roast, "other": 1})
    assert cfg.model_config.architectures == ["RoastLlamaForCausalLM"]
    assert cfg.model_config.logits_processors == [TRACKER]
    assert cfg.scheduler_config.scheduler_cls == SCHED
    assert cfg.parallel_config.worker_extension_cls == WORKER
    got = cfg.additional_config["roast"]
    assert cfg.additional_config["other"] == 1
    assert got["max_steering_slots"] == 8 and got["vectors"] == {"v": str(vec)}
    assert got["num_layers"] == 30 and got["max_model_len"] == 1024
    assert got["model_dtype"] == str(cfg.model_config.dtype).replace("torch.", "")
    assert json.loads(__import__("os").environ["ROAST_VLLM_CONFIG"]) == got
    assert registry.known() and registry.names() == ["v"]  # the front end can validate
    registry.reset()
    # without a roast entry nothing changes: stock vLLM
    plain = _engine_config(model_dir)
    assert plain.model_config.architectures == ["LlamaForCausalLM"]
    assert not plain.model_config.logits_processors and plain.scheduler_config.scheduler_cls is None
    # the user's own hf_overrides and logits processors are kept, merged
    cfg = _engine_config(
        model_dir,
        additional_config={"roast": {}},
        hf_overrides={"rope_theta": 10000.0},
        logits_processors=["vllm.v1.sample.logits_processor:MinPLogitsProcessor"],
    )
    assert cfg.model_config.architectures == ["RoastLlamaForCausalLM"]
    assert cfg.model_config.hf_config.rope_theta == 10000.0
    assert cfg.model_config.logits_processors[-1] == TRACKER and len(cfg.model_config.logits_processors) == 2


def test_additional_config_bad_input_fails_before_any_engine(model_dir, tmp_path, monkeypatch, clean_env):
    cases = [
        ({"roast": {"slots": 3}}, {}, "unknown roast config keys"),
        ({"roast": "on"}, {}, "must be a JSON object"),
        (
            {"roast": {"vectors": {"v": str(tmp_path / "missing.safetensors")}}},
            {},
            "roast vector 'v'.*does not exist",
        ),
        ({"roast": {}}, {"scheduler_cls": "x.Y"}, "its own scheduler_cls"),
        ({"roast": {}}, {"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ]
    for extra, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _engine_config(model_dir, additional_config=extra, **kw)
    # a stale ROAST_VLLM_CONFIG (left from the old flags) is replaced by the engine's config,
    # so the front end validates against what the engine runs
    import json
    import os

    monkeypatch.setenv("ROAST_VLLM_CONFIG", '{"max_steering_slots": 3}')
    cfg = _engine_config(model_dir, additional_config={"roast": {}})
    assert json.loads(os.environ["ROAST_VLLM_CONFIG"]) == cfg.additional_config["roast"]
    assert cfg.additional_config["roast"]["max_steering_slots"] == 64


def test_create_engine_config_is_wrapped_once():
    from vllm.engine.arg_utils import EngineArgs

    from roast_vllm.engine.autoconfig import install
    from roast_vllm.engine.plugin import register

    register()
    first = EngineArgs.create_engine_config
    assert install() and install() and register() is None
    assert EngineArgs.create_engine_config is first
    assert getattr(first, "__wrapped__", None) is not None
    assert getattr(first.__wrapped__, "_roast_vllm_wrapper", False) is False  # not wrapped twice


def test_explicit_registry_wins_over_the_environment(clean_env, monkeypatch):
    """roast_vllm.LLM sets the front end's registry itself; a ROAST_VLLM_CONFIG in the
    environment (a server's, inherited) must not replace it on first use."""
    from roast_vllm.engine import registry

    monkeypatch.setenv("ROAST_VLLM_CONFIG", '{"allow_capture": false, "num_layers": 30}')
    registry.reset()
    registry.set_model(30, 1024, "float32", allow_capture=True)
    assert registry.capture_allowed()
    registry.reset()  # no explicit model: the environment is the registry
    assert registry.known() and not registry.capture_allowed()
