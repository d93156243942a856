"""``SteeringWorkerExtension``: methods vLLM mixes into every worker
(``worker_extension_cls``), called through ``LLM.collective_rpc``."""

from __future__ import annotations

from roast_vllm.engine.state import get_state
from roast_vllm.vector import SteeringVector

QUALNAME = "roast_vllm.engine.worker.SteeringWorkerExtension"


class SteeringWorkerExtension:
    def roast_register_vector(self, name: str, payload: bytes) -> dict:
        state = get_state()
        if state is None:
            raise RuntimeError("roast-vllm: this engine's model is not a steered model")
        vec = SteeringVector.from_bytes(payload, source=f"vector {name!r}")
        state.register_vector(name, vec)
        return {"name": name, "layers": vec.layers}

    def roast_info(self) -> dict:
        state = get_state()
        if state is None:
            return {}
        return {
            "vectors": sorted(state.vectors),
            "active_slots": state.active_slots(),
            "max_slots": state.max_slots,
            "num_layers": state.num_layers,
            "hidden_size": state.hidden_size,
        }
