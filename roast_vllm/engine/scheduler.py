"""``SteeringScheduler``: vLLM's scheduler plus two steering rules.

1. Slot admission: at most ``max_steering_slots`` distinct (vector version, scale,
   layers) configurations run at once. A waiting request (in either of vLLM's waiting
   queues) whose configuration would exceed that stays where it is, in order, until a
   slot frees; it is never run unsteered. Counting ``running`` (a superset of the worker's
   batch) over-counts at worst, so the worker always finds a free slot.
2. Prefix-cache salt: a steered request's KV blocks differ from an unsteered one's, so
   its block hashes are salted with its steering and the absolute positions it steers
   (see ``SteerSpec.cache_salt``). A Fusion Steering request reads no prefix cache at
   all: its running mean needs the forward to see every position (a cached block's
   positions would be missing from it), also when it is recomputed after preemption; nor
   does a mean capture (``roast_capture_from``), for the same reason.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from roast_vllm.engine.config import RoastConfig
from roast_vllm.engine.spec import CAPTURE_FROM_KEY, SteeringRequestError, parse_steer_args

QUALNAME = "roast_vllm.engine.scheduler.SteeringScheduler"


def _spec(request):
    spec = getattr(request, "_roast_spec", False)
    if spec is False:
        try:
            spec = parse_steer_args(request.sampling_params.extra_args if request.sampling_params else None)
        except SteeringRequestError:
            spec = None  # rejected at submission; the worker refuses it loudly too
        request._roast_spec = spec
    return spec


class _SteeringMixin:
    """The steering rules, on top of either vLLM scheduler (sync or async)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = RoastConfig.from_vllm_config(self.vllm_config) or RoastConfig()
        self.max_steering_slots = cfg.max_steering_slots
        #: Requests held back by slot admission in the last step (observability/tests).
        self.num_slot_blocked = 0

    def add_request(self, request) -> None:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        if isinstance(extra, dict) and CAPTURE_FROM_KEY in extra:
            # a mean capture must see every position it averages (cached ones are skipped)
            request.skip_reading_prefix_cache = True
        spec = _spec(request)
        if spec is not None and request.request_id not in self.requests:
            salt = spec.cache_salt(request.num_prompt_tokens)
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
            request.block_hashes = []
            request.update_block_hashes()
            if spec.mode == "fusion":
                request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _slot_blocked(self) -> list[tuple]:
        """``(queue, [requests])`` held back this step, in queue order: vLLM drains
        ``kv_holding_waiting`` before ``waiting``, so slots go in that order too."""
        active = {s.slot_key for r in self.running if (s := _spec(r)) is not None}
        out = []
        for queue in (getattr(self, "kv_holding_waiting", None), self.waiting):
            if not queue:
                continue
            blocked = []
            for r in queue:
                s = _spec(r)
                if s is None or s.slot_key in active:
                    continue
                if len(active) < self.max_steering_slots:
                    active.add(s.slot_key)
                else:
                    blocked.append(r)
            if blocked:
                out.append((queue, blocked))
        return out

    def schedule(self, *args, **kwargs):
        held = self._slot_blocked() if (self.waiting or getattr(self, "kv_holding_waiting", None)) else []
        self.num_slot_blocked = sum(len(b) for _, b in held)
        if not held:
            return super().schedule(*args, **kwargs)
        for queue, blocked in held:
            queue.remove_requests(blocked)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            for queue, blocked in held:
                # vLLM's FCFS prepend_requests extendlefts (reversing its argument);
                # reversed() puts the held requests back in their own order. Priority
                # queues re-insert by priority, where order does not matter.
                queue.prepend_requests(list(reversed(blocked)))


class SteeringScheduler(_SteeringMixin, Scheduler):
    """The scheduler to name in ``scheduler_cls``: it becomes an ``AsyncSteeringScheduler``
    when the engine resolved async scheduling on, and stays the synchronous one otherwise.

    vLLM picks ``AsyncScheduler`` or ``Scheduler`` from ``scheduler_config.async_scheduling``
    only when no ``scheduler_cls`` is given; that setting is resolved in
    ``VllmConfig.__post_init__`` from the platform, pipeline parallelism, speculative
    decoding and the executor. We follow the resolved value, not the platform, so a
    subclass of the wrong base never turns async scheduling off (or on) behind vLLM's back.
    """

    def __new__(cls, *args, **kwargs):
        if cls is SteeringScheduler and _async_enabled(args, kwargs):
            cls = AsyncSteeringScheduler
        return super().__new__(cls)


class AsyncSteeringScheduler(SteeringScheduler, AsyncScheduler):
    """With async scheduling (vLLM's default on CUDA)."""


def _async_enabled(args, kwargs) -> bool:
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    return bool(getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False))
