"""The distributed runtime: the same code on one machine or a Ray cluster.

- ``pool``: ``EngineWorker`` (one steering engine) and ``WorkerPool`` (N of them as Ray
  actors, or one in-process), jobs dispatched to idle workers, dead workers replaced.
- ``jobs``: the functions a worker runs (sample, capture, reduce, greedy, log-likelihood).
- ``rollout``: bulk rollouts over the pool, sharded, checkpointed and resumable.
"""
