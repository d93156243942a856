"""Steering methods: how vectors are made from a model.

- ``pairs``: ROAST's (correct, incorrect) rollout pairs per question, with fallbacks.
- ``estimate``: ROAST (ROC differences reduced by Grouped Mean Normalization with Continuous
  Soft Scaling, ``roast_vllm.kernels.grouped_css``) and CAA over the same pairs, streamed:
  each capture job reduces its questions' pairs on its worker.
- ``caa``: CAA from two prompt files.
- ``hf``: the transformers reference of steering and residual capture that the engine is
  checked against.
- ``fusion``: Fusion Steering's coefficients, prompts, overlap / objective, and its
  transformers reference in the cached (engine) and uncached (paper) semantics.
- ``fusion_search``: its per-prompt Optuna search, every study's trial of a round in one
  batch, resumable from a journal file.

Rollouts themselves (sampling, sharding, resuming) are the runtime's
(``roast_vllm.runtime.rollout``); serving a vector is the engine's.
"""
