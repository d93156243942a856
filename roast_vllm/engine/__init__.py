"""The serving engine: steering inside stock vLLM, per request.

Front end (the user's process, the API server):

- ``llm``: ``LLM`` (a ``vllm.LLM`` with steering on), ``register_vector``, ``shutdown``.
- ``plugin``: the ``vllm.general_plugins`` entry point (registers ``Roast<Arch>``).
- ``config``: ``RoastConfig``, the engine's steering settings (``additional_config``).
- ``args``: vLLM's own engine-argument parser reused; platform defaults (dtype, step bounds).
- ``model_prep``: the embedded SmolLM2 (GGUF -> HF folder) and model dimensions.
- ``registry``: the front end's view of registered vectors (submission-time checks).
- ``spec``: per-request ``steer_*`` keys, parsed and validated.
- ``capture``: last-token activation capture through the engine.
- ``throughput``: the steering engine against stock vLLM, paired (``make bench``).

Inside vLLM's processes:

- ``scheduler``: slot admission control and prefix-cache salting.
- ``tracker``: a no-op logits processor that tells ``state`` which request sits in which row.
- ``state``: the worker's steering buffers (table, per-row and per-token slots).
- ``runner``: the model-runner hook that prepares per-step buffers before each forward.
- ``worker``: the worker extension that receives vectors registered at run time.
- ``models``: the steered model wrappers (``Roast<Arch>``) per family.
"""
