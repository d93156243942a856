"""roast-vllm: per-request activation steering inside stock vLLM.

``import roast_vllm`` is light: it does not import vLLM or Triton; those load when you
create an engine or call a kernel.
"""

from roast_vllm.vector import SITES, SteeringVector, SteeringVectorError

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SITES",
    "SteeringVector",
    "SteeringVectorError",
    "capture_activations",
    "register_vector",
    "__version__",
]


def __getattr__(name):
    if name in ("LLM", "register_vector"):
        from roast_vllm.engine import llm

        return getattr(llm, name)
    if name == "capture_activations":
        from roast_vllm.engine.capture import capture_activations

        return capture_activations
    raise AttributeError(f"module 'roast_vllm' has no attribute {name!r}")
