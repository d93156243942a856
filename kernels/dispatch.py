"""Which path a kernel op takes: the Triton launcher for CUDA tensors, the torch reference
elsewhere.

Inside :func:`triton_on_cpu` CPU tensors take the Triton path too, which then runs in
Triton's interpreter (``TRITON_INTERPRET=1`` set before the first launch): that is how the
kernel tests run, without a GPU, exactly the path the engine takes on CUDA (custom op ->
launcher -> kernel), also inside an inductor-compiled graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable

#: A plain constant, not a cached call: ``use_triton`` is traced by torch.compile.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
_triton_on_cpu = False


def use_triton(t) -> bool:
    """True when an op on tensor ``t`` should launch its Triton kernel."""
    return (t.is_cuda or _triton_on_cpu) and HAVE_TRITON


@contextlib.contextmanager
def triton_on_cpu():
    """Route CPU tensors to the Triton launchers (tests, under ``TRITON_INTERPRET=1``)."""
    global _triton_on_cpu
    old, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = old


_LIB = None  # the torch.library fragment of our ops; it must outlive them


def register_op(name: str, impl: Callable, mutates_args: tuple[str, ...], fake: Callable) -> None:
    """Register ``torch.ops.roast_vllm.<name>``: ``impl`` on CPU and CUDA, ``fake`` for
    tracing; the schema is inferred from ``impl``'s annotations, ``mutates_args`` marked
    ``Tensor(a!)`` (so inductor functionalizes the call, then re-inplaces it on its buffer).

    Registered straight on the dispatch keys, as vLLM's ``direct_register_custom_op`` does,
    not with ``torch.library.custom_op``: that one adds Python-level autograd and
    ADInplaceOrView wrappers to every call, which showed up in py-spy profiles of the
    engine's CPU decode steps (2 ops x every layer x every step); the ops are
    inference-only and have no autograd. Call once per name (callers cache)."""
    global _LIB
    import torch
    from torch._library.infer_schema import infer_schema

    if _LIB is None:
        _LIB = torch.library.Library("roast_vllm", "FRAGMENT")
    _LIB.define(name + infer_schema(impl, mutates_args=mutates_args))
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    _LIB._register_fake(name, fake)
