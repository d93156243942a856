"""vLLM general plugin (entry point ``vllm.general_plugins``).

vLLM calls ``register()`` in every process it starts, so it must be cheap and safe to
call twice. It adds the steered architectures (``Roast<Arch>``) to vLLM's model
registry, lazily (no model code is imported); wraps ``EngineArgs.create_engine_config`` so
that an ``additional_config`` with a ``roast`` entry alone switches steering on
(``roast_vllm.engine.autoconfig``; without that entry the wrapper does nothing); and in an
API-server process refuses steering combined with beam search
(``roast_vllm.engine.beam_search``). Stock architectures are untouched: a model is steered
only when its architecture is overridden to ``Roast<Arch>``.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    from roast_vllm.engine.autoconfig import install
    from roast_vllm.engine.beam_search import refuse_steered_beam_search

    refuse_steered_beam_search()  # API server only (no-op elsewhere; see the module)
    install()  # where engine arguments are built (no-op elsewhere, and when already done)
    if _registered:
        return
    from vllm import ModelRegistry

    from roast_vllm.engine.models import FAMILIES, steered_arch

    supported = set(ModelRegistry.get_supported_archs())
    for stock in FAMILIES:
        arch = steered_arch(stock)
        if arch not in supported:
            ModelRegistry.register_model(arch, f"roast_vllm.engine.models.steered:{arch}")
    _registered = True
