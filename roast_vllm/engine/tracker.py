"""``SteeringBatchTracker``: a logits processor that changes no logits.

vLLM (V1 model runner) calls ``update_state`` before every forward with the requests
added to, removed from and moved within the persistent batch (including the moves of
``condense()`` and of attention-backend reordering). That is exactly the row -> request
map the steered model needs, so the tracker forwards it to ``SteeringState``. Its
``validate_params`` hook is vLLM's submission-time check: bad ``steer_*`` keys fail the
request in the caller (HTTP 400 on a server) and never reach the engine.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from roast_vllm.engine import registry
from roast_vllm.engine.spec import parse_steer_args
from roast_vllm.engine.state import get_state

CAPTURE_KEY = "roast_capture"  # extra_args key: capture id of an activation-capture request

QUALNAME = "roast_vllm.engine.tracker:SteeringBatchTracker"


class SteeringBatchTracker(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = parse_steer_args(sampling_params.extra_args)
        if spec is not None:
            registry.check(spec)
        cid = (sampling_params.extra_args or {}).get(CAPTURE_KEY)
        if cid is not None and (not isinstance(cid, str) or not cid):
            raise ValueError(f"{CAPTURE_KEY} must be a non-empty string id, got {cid!r}")

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
        for row in batch_update.removed:
            state.clear_row(row)
        for row, params, prompt_ids, _out in batch_update.added:
            extra = params.extra_args if params is not None else None
            n = len(prompt_ids) if prompt_ids is not None else 0
            state.set_row(row, parse_steer_args(extra), n)
            state.set_capture(row, (extra or {}).get(CAPTURE_KEY), n)
        for src, dst, kind in batch_update.moved:
            state.move_row(src, dst, swap=kind == MoveDirectionality.SWAP)
        state.sync_rows()
