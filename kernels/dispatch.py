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
