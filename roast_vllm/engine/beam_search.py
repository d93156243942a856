"""Steering with beam search is refused with HTTP 400.

vLLM's OpenAI server runs ``use_beam_search`` requests through ``beam_search``, which
builds fresh ``SamplingParams`` for every beam step from ``BeamSearchParams`` — without
the request's ``vllm_xargs``. A steered beam-search request would run unsteered and answer
200. Steering every beam would need vLLM's beam search to carry ``extra_args``; until it
does, the request is refused where it is converted (``to_beam_search_params``), which runs
in the API server before anything reaches the engine. Offline ``LLM.beam_search`` takes
``BeamSearchParams``, which has no way to ask for steering at all.
"""

from __future__ import annotations

import sys

_PROTOCOLS = (
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
)
_MARK = "_roast_refuses_steering"


def _steered(request) -> list[str]:
    xargs = getattr(request, "vllm_xargs", None) or {}
    return sorted(k for k in xargs if isinstance(k, str) and k.startswith("steer_"))


def refuse_steered_beam_search() -> None:
    """Wrap ``to_beam_search_params`` of the OpenAI request classes already imported in
    this process (the API server imports them before it loads plugins or logits
    processors). Safe to call any number of times; other processes are not touched."""
    for module, name in _PROTOCOLS:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        orig = getattr(cls, "to_beam_search_params", None)
        if orig is None or getattr(orig, _MARK, False):
            continue

        def to_beam_search_params(self, *args, __orig=orig, **kwargs):
            keys = _steered(self)
            if keys:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(
                    f"steering ({', '.join(keys)}) cannot be combined with use_beam_search: "
                    "vLLM's beam search drops vllm_xargs, so the beams would run unsteered. "
                    "Use sampling (n > 1) or greedy decoding with steering instead",
                    parameter="use_beam_search",
                )
            return __orig(self, *args, **kwargs)

        setattr(to_beam_search_params, _MARK, True)
        cls.to_beam_search_params = to_beam_search_params
