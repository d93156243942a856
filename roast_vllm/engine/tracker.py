"""``SteeringBatchTracker``: a logits processor that changes no logits.

vLLM (V1 model runner) calls ``update_state`` before every forward with the requests
added to, removed from and moved within the persistent batch (including the moves of
``condense()`` and of attention-backend reordering). That is exactly the row -> request
map the steered model needs, so the tracker forwards it to ``SteeringState``.

Its ``validate_params`` hook is vLLM's submission-time check, run in the front end (the
``vllm.LLM`` process or the API server): bad ``steer_*`` or internal ``roast_*`` keys fail
the request in the caller (HTTP 400 on a server) and never reach the engine. It also
stamps the request with the digest of the vector version it steers with, so a vector
re-registered later changes only requests submitted after it.

``update_state`` runs in the engine core's per-step path, where an exception kills the
engine and every request in it: ``SteeringState.apply_batch_update`` is total.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from roast_vllm.engine import registry
from roast_vllm.engine.beam_search import refuse_steered_beam_search
from roast_vllm.engine.spec import CAPTURE_KEY, DIGEST_KEY, check_internal_keys, parse_steer_args
from roast_vllm.engine.state import get_state

__all__ = ["CAPTURE_KEY", "QUALNAME", "SteeringBatchTracker"]

QUALNAME = "roast_vllm.engine.tracker:SteeringBatchTracker"

# The API server loads this class (for validate_params) after importing its request
# protocols and before serving: refuse steered beam search there too, whatever the order
# in which vLLM loaded plugins.
refuse_steered_beam_search()


class SteeringBatchTracker(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args
        check_internal_keys(extra, capture_allowed=registry.capture_allowed())
        spec = parse_steer_args(extra)
        if spec is None:
            return
        digest = registry.check(spec)
        if extra.get(DIGEST_KEY) != digest:
            # a new dict: the caller's own extra_args dict is not modified
            sampling_params.extra_args = {**extra, DIGEST_KEY: digest}

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits):
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        state = get_state()
        if state is None:  # the served model is not a roast model
            return
        state.apply_batch_update(batch_update.removed, batch_update.added, batch_update.moved)
