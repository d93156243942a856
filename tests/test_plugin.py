"""The vLLM entry-point plugin: declared, cheap, idempotent, leaves stock models alone."""

import importlib.metadata as md
import subprocess
import sys


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
