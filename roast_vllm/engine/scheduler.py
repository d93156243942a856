"""``SteeringScheduler``: vLLM's scheduler plus two steering rules.

1. Slot admission: at most ``max_steering_slots`` distinct (vector, scale, layers)
   configurations run at once. A waiting request whose configuration would exceed that
   stays in the queue (in order) until a slot frees; it is never run unsteered.
2. Prefix-cache salt: a steered request's KV blocks differ from an unsteered one's, so
   its block hashes are salted with its steering (see ``SteerSpec.cache_salt``).
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from roast_vllm.config import RoastConfig
from roast_vllm.engine.spec import SteeringRequestError, parse_steer_args

QUALNAME = "roast_vllm.engine.scheduler.SteeringScheduler"


def _spec(request):
    spec = getattr(request, "_roast_spec", False)
    if spec is False:
        try:
            spec = parse_steer_args(request.sampling_params.extra_args if request.sampling_params else None)
        except SteeringRequestError:
            spec = None  # rejected at submission; cannot happen here
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
        spec = _spec(request)
        if spec is not None and request.request_id not in self.requests:
            salt = spec.cache_salt()
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
            request.block_hashes = []
            request.update_block_hashes()
        super().add_request(request)

    def _slot_blocked(self) -> list:
        active = {s.slot_key for r in self.running if (s := _spec(r)) is not None}
        blocked = []
        for r in self.waiting:
            s = _spec(r)
            if s is None or s.slot_key in active:
                continue
            if len(active) < self.max_steering_slots:
                active.add(s.slot_key)
            else:
                blocked.append(r)
        return blocked

    def schedule(self, *args, **kwargs):
        blocked = self._slot_blocked() if self.waiting else []
        self.num_slot_blocked = len(blocked)
        if not blocked:
            return super().schedule(*args, **kwargs)
        self.waiting.remove_requests(blocked)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.waiting.prepend_requests(blocked)


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
