"""``SteeringWorkerExtension``: methods vLLM mixes into every worker
(``worker_extension_cls``), called through ``LLM.collective_rpc``."""

from __future__ import annotations

from roast_vllm.engine.state import get_state
from roast_vllm.vector import SteeringVector

QUALNAME = "roast_vllm.engine.worker.SteeringWorkerExtension"


def _state():
    state = get_state()
    if state is None:
        raise RuntimeError("roast-vllm: this engine's model is not a steered model")
    return state


class SteeringWorkerExtension:
    def roast_register_vector(self, name: str, payload: bytes) -> dict:
        state = _state()
        vec = SteeringVector.from_bytes(payload, source=f"vector {name!r}")
        digest = state.register_vector(name, vec)
        return {"name": name, "layers": vec.layers, "digest": digest}

    def roast_unregister_vector(self, name: str) -> bool:
        return _state().unregister_vector(name)

    def roast_set_capture(self, layers: list[int], sites: list[str]) -> None:
        state = _state()
        bad = [l for l in layers if not 0 <= l < state.num_layers]
        if bad or not layers:
            raise ValueError(f"capture layers {bad or layers} out of range 0..{state.num_layers - 1}")
        allowed = ("residual", "mlp_act") if state.mlp_size else ("residual",)
        if not sites or any(s not in allowed for s in sites):
            raise ValueError(f"capture sites {sites} not in {allowed}")
        state.capture_layers = tuple(layers)
        state.capture_sites = tuple(sites)

    def roast_pop_captures(self, ids: list[str]) -> bytes:
        """``safetensors`` bytes with ``"{id}/{site}" -> [len(layers), dim]`` fp32 (this
        rank's MLP columns for ``mlp_act`` under tensor parallelism)."""
        from safetensors.torch import save

        caps = _state().pop_captures(ids)
        return save({f"{cid}/{site}": t.contiguous() for cid, d in caps.items() for site, t in d.items()})

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
            "mlp_size": state.mlp_size,
            "compiled": state.compiled,
            "steps_prepared": state.num_steps_prepared,
            "slot_reuses": state.num_slot_reuses,
            "rows_refused": state.num_rows_refused,
            "versions": len(state.versions),
            "captures_held": len(state.captures),
            "captures_dropped": state.num_captures_dropped,
            "fusion": state.fusion,
            "fusion_states": len(state._fstates),
            "fusion_gaps": state.num_fusion_gaps,
            "fusion_evictions": state.num_fusion_evictions,
        }
