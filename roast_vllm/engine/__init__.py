"""The steering engine: what runs inside vLLM's processes.

- ``spec``: per-request ``steer_*`` keys, parsed and validated.
- ``registry``: the front end's view of registered vectors (submission-time checks).
- ``state``: the worker's steering buffers (table, per-row and per-token slots).
- ``tracker``: a no-op logits processor that tells ``state`` which request sits in which row.
- ``scheduler``: slot admission control and prefix-cache salting.
- ``worker``: the worker extension that receives vectors registered at run time.
"""
