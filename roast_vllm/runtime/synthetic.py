"""A stand-in worker without an engine, for benchmarks and tests of the runtime itself.

``SyntheticWorker`` answers ``capture_texts`` with deterministic pseudo-activations (one
seeded draw per text, the same on any worker, in any batch) of the model's shapes, so the
driver's job flow and the streaming reduction (``roast_vllm.methods.estimate``) can be run
and measured at sizes no small machine could capture for real (driver memory at 50k
pairs, ``benchmarks/bench_estimate_memory.py``). Its vectors mean nothing: never estimate
a vector to use with it.
"""

from __future__ import annotations

import hashlib
import os

import torch

from roast_vllm.engine.llm import site_dim
from roast_vllm.runtime.pool import EngineWorker


class SyntheticWorker(EngineWorker):
    """``WorkerPool(..., worker_cls=SyntheticWorker)``: an ``EngineWorker`` without an
    engine (``llm`` and ``tok`` are None); only ``capture_texts`` answers, with
    pseudo-activations."""

    def __init__(self, options, env: dict[str, str] | None = None) -> None:
        from roast_vllm.engine.model_prep import default_model, model_dims

        os.environ.update(env or {})
        torch.set_num_threads(1)  # one core per actor, as an engine worker would take
        self.options, self.llm, self.tok, self._vectors = options, None, None, {}
        self.dims = model_dims(options.model or default_model())

    def capture_texts(self, items: list, layers: list[int], sites: list[str], pooling: str = "last") -> dict:
        """``{site: [len(layers), len(items), dim]}`` fp32, a function of each item's
        ``(qid, response)`` text, the layer, the site and the pooling only."""
        out = {}
        for site in sites:
            acts = torch.empty(len(layers), len(items), site_dim(self.dims, site))
            for j, (q, response) in enumerate(items):
                key = f"{site}\0{q.qid}\0{response}" + ("" if pooling == "last" else f"\0{pooling}")
                key = key.encode()
                seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1
                acts[:, j] = torch.randn(
                    max(layers) + 1, acts.shape[2], generator=torch.Generator().manual_seed(seed)
                )[layers]
            out[site] = acts
        return out
