"""Worker-side steering state: the buffers the steered model reads on every forward.

Shapes (``L`` layers, ``S = max_steering_slots + 1`` slots, ``H`` hidden, ``R`` =
``max_num_seqs`` batch rows, ``T`` = max tokens per step)::

    table       [L, S, H]  fp32; table[l, s] = v_s[l] (0 where slot s does not steer
                           layer l); slot 0 is all zeros = "no steering"
    mlp_table   [L, S, I]  fp32, the same for ``mlp_act`` vectors (I = MLP width on
                           this rank); a slot's row is zero in the table of the other site
    slot_scale  [S]        fp32 scale of each slot (0 for slot 0)
    token_slot  [T]        int64, the slot of each token of the current step
    row_slot    [R]        slot of the request in each persistent-batch row
    row_lo/hi   [R]        steered absolute positions [lo, hi) of each row

Per step, before the forward and outside any captured region (CUDA graph or compiled
graph), ``prepare_step`` fills ``token_slot`` from the model runner's per-token request
index and positions (``roast_vllm.engine.runner`` calls it, as vLLM prepares LoRA's
per-token indices): nothing inside the model's ``forward`` depends on per-step Python
state or on attention metadata, so a replayed full CUDA graph reads the right slots.

Why this layout: inside the compiled graph each layer does one fused gather-add,
``h[t] += slot_scale[s] * table[l, s]`` with ``s = token_slot[t]`` (the
``roast_vllm.kernels.steer_apply`` op: Triton on CUDA, torch on CPU), reading tensors that
are updated in place, so
torch.compile never bakes a vector or a batch composition into the graph, and any mix
of requests (steered or not, prefill chunks and decodes) runs in one batch. Rows whose
slot is 0 are left untouched, bit for bit.

``mlp_act`` steering adds ``delta`` to SiLU(gate) before the multiply by ``up``; since
``(SiLU(g) + delta) * up = SiluAndMul(g, up) + delta * up``, the stock fused activation
stays and one fused op adds ``scale[s] * mlp_table[l, s] * up[t]`` to steered tokens
only (``roast_vllm.kernels.steer_mlp_act``); unsteered tokens are not touched.

Activation capture (eager engines only): a request with ``extra_args["roast_capture"] =
id`` records, at its last prompt token, the residual stream after every capture layer
and the ``mlp_act`` activation, kept here until ``pop_captures`` takes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from roast_vllm.engine.spec import SteerSpec
from roast_vllm.kernels.steer_apply import steer_apply
from roast_vllm.kernels.steer_mlp_act import steer_mlp_act
from roast_vllm.vector import SteeringVector, SteeringVectorError

logger = logging.getLogger("roast_vllm")

_STATE: SteeringState | None = None


def get_state() -> SteeringState | None:
    """The steering state of this process's steered model (None if there is none)."""
    return _STATE


def set_state(state: SteeringState | None) -> None:
    global _STATE
    _STATE = state


@dataclass
class _Slot:
    index: int
    key: tuple
    refs: int = 0


class SteeringState(nn.Module):
    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        max_slots: int,
        max_num_seqs: int,
        max_num_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        mlp_size: int = 0,
        mlp_shard: tuple[int, int] = (0, 1),
        compiled: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.mlp_size = mlp_size  # full MLP width (0: mlp_act site off)
        self.mlp_shard = mlp_shard  # (tensor-parallel rank, world size)
        self.compiled = compiled
        self.max_slots = max_slots
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        # fp32 whatever the model dtype: the add happens in fp32 and rounds once
        self.register_buffer(
            "table",
            torch.zeros(num_layers, max_slots + 1, hidden_size, dtype=torch.float32, device=device),
            persistent=False,
        )
        i_local = mlp_size // mlp_shard[1]
        self.register_buffer(
            "mlp_table",
            torch.zeros(num_layers, max_slots + 1, i_local, dtype=torch.float32, device=device),
            persistent=False,
        )
        self.register_buffer(
            "slot_scale", torch.zeros(max_slots + 1, dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer(
            "token_slot",
            torch.zeros(max_num_tokens, dtype=torch.long, device=device),
            persistent=False,
        )
        # Host-side per-row state (the tracker writes it), mirrored to the device.
        self.row_slot_cpu = torch.zeros(max_num_seqs, dtype=torch.long)
        self.row_lo_cpu = torch.zeros(max_num_seqs, dtype=torch.long)
        self.row_hi_cpu = torch.zeros(max_num_seqs, dtype=torch.long)
        self.register_buffer("row_slot", self.row_slot_cpu.clone().to(device), persistent=False)
        self.register_buffer("row_lo", self.row_lo_cpu.clone().to(device), persistent=False)
        self.register_buffer("row_hi", self.row_hi_cpu.clone().to(device), persistent=False)
        self._rows_dirty = False
        self._tokens_dirty = False
        self.num_steered_rows = 0
        #: Python-side "any row steered this step" (set by ``prepare_step``); read only on
        #: eager paths to skip no-op ops, never inside a captured or compiled region.
        self.step_steered = False
        #: Steps prepared so far (tests check that the runner hook runs every step).
        self.num_steps_prepared = 0

        self.vectors: dict[str, SteeringVector] = {}
        self._slots: dict[tuple, _Slot] = {}
        self._slot_by_index: dict[int, _Slot] = {}
        self._free = list(range(max_slots, 0, -1))  # pop() gives 1, 2, ...
        self._used_indices: set[int] = set()
        #: Acquisitions that reused a previously released slot index (observability).
        self.num_slot_reuses = 0
        self._row_spec: dict[int, int] = {}  # row -> slot index

        # capture: row -> (capture id, absolute position to record)
        self.capture_layers: tuple[int, ...] = tuple(range(num_layers))
        self.capture_sites: tuple[str, ...] = ("residual", "mlp_act") if mlp_size else ("residual",)
        self._capture_rows: dict[int, tuple[str, int]] = {}
        self._cap_index: torch.Tensor | None = None  # token indices of this step's captures
        self._cap_ids: list[str] = []
        self._cap_step: dict[str, dict[str, list[torch.Tensor | None]]] = {}
        self._cap_layer_pos: dict[int, int] = {}
        self.captures: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------ vectors
    def register_vector(self, name: str, vector: SteeringVector) -> None:
        if vector.site == "mlp_act":
            if not self.mlp_size:
                raise SteeringVectorError(
                    f"vector {name!r} targets site 'mlp_act', which this engine has switched off; "
                    "start it with the roast config's mlp_act_site=True (the default)"
                )
            vector.validate_for(self.num_layers, self.mlp_size)
        else:
            vector.validate_for(self.num_layers, self.hidden_size)
        self.vectors[name] = vector
        # Slots built from the old vector keep serving the requests that hold them;
        # unreferenced ones are dropped so later requests rebuild from the new vector.
        for key, slot in list(self._slots.items()):
            if key[0] == name:
                del self._slots[key]
                if slot.refs == 0:
                    self._release_index(slot)
                else:
                    slot.key = ("<replaced>",) + key

    def _release_index(self, slot: _Slot) -> None:
        self._slot_by_index.pop(slot.index, None)
        # A freed slot holds nothing: its scale and rows are zeroed, so a stale token_slot
        # entry (or a later configuration that gets this index) never sees the old vector.
        # These writes are stream-ordered after every step already launched.
        self.slot_scale[slot.index] = 0.0
        self.table[:, slot.index].zero_()
        self.mlp_table[:, slot.index].zero_()
        self._free.append(slot.index)

    # -------------------------------------------------------------- slots
    def acquire(self, spec: SteerSpec) -> int:
        key = spec.slot_key
        slot = self._slots.get(key)
        if slot is None:
            vec = self.vectors.get(spec.vector)
            if vec is None:
                raise SteeringVectorError(f"unknown steering vector {spec.vector!r}")
            if not self._free:
                raise RuntimeError(
                    f"roast-vllm: all {self.max_slots} steering slots are in use; the "
                    "scheduler should have held this request back (please report)"
                )
            index = self._free.pop()
            self.num_slot_reuses += index in self._used_indices
            self._used_indices.add(index)
            layers = spec.layers if spec.layers is not None else tuple(vec.layers)
            mlp = vec.site == "mlp_act"
            width = self.mlp_table.shape[-1] if mlp else self.hidden_size
            rows = torch.zeros(self.num_layers, width, dtype=torch.float32)
            rank, world = self.mlp_shard if mlp else (0, 1)
            for l in layers:
                # tensor parallel: this rank's MLP columns are one contiguous slice
                rows[l] = vec.directions[l][rank * width : (rank + 1) * width]
            # the other site's rows of this slot are already zero: free slots hold nothing
            # (zeroed at start and by _release_index)
            (self.mlp_table if mlp else self.table)[:, index].copy_(rows)
            self.slot_scale[index] = spec.scale
            slot = _Slot(index, key)
            self._slots[key] = slot
            self._slot_by_index[index] = slot
        slot.refs += 1
        return slot.index

    def release(self, index: int) -> None:
        slot = self._slot_by_index.get(index)
        if slot is None:
            return
        slot.refs -= 1
        if slot.refs <= 0:
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            self._release_index(slot)

    def active_slots(self) -> int:
        return len(self._slot_by_index)

    # --------------------------------------------------------------- rows
    def set_row(self, row: int, spec: SteerSpec | None, prompt_len: int) -> None:
        self.clear_row(row)
        if spec is None:
            return
        try:
            index = self.acquire(spec)
        except SteeringVectorError:
            # Unreachable when the front end validated the request; never crash the
            # engine for it, and say so loudly.
            logger.error(
                "roast-vllm: request in row %d names an unknown vector %r; it runs UNSTEERED",
                row,
                spec.vector,
            )
            return
        lo, hi = spec.token_range(prompt_len)
        self._row_spec[row] = index
        self.row_slot_cpu[row] = index
        self.row_lo_cpu[row] = lo
        self.row_hi_cpu[row] = hi
        self.num_steered_rows += 1
        self._rows_dirty = True

    def set_capture(self, row: int, capture_id: str | None, prompt_len: int) -> None:
        """Record the activations of ``row``'s last prompt token under ``capture_id``."""
        self._capture_rows.pop(row, None)
        if capture_id is not None:
            self._capture_rows[row] = (capture_id, prompt_len - 1)

    def clear_row(self, row: int) -> None:
        self._capture_rows.pop(row, None)
        index = self._row_spec.pop(row, None)
        if index is None:
            return
        self.release(index)
        self.row_slot_cpu[row] = 0
        self.num_steered_rows -= 1
        self._rows_dirty = True

    def move_row(self, src: int, dst: int, swap: bool) -> None:
        ca, cb = self._capture_rows.pop(src, None), self._capture_rows.pop(dst, None)
        if ca is not None:
            self._capture_rows[dst] = ca
        if swap and cb is not None:
            self._capture_rows[src] = cb
        a, b = self._row_spec.pop(src, None), self._row_spec.pop(dst, None)
        if swap:
            if a is not None:
                self._row_spec[dst] = a
            if b is not None:
                self._row_spec[src] = b
            for t in (self.row_slot_cpu, self.row_lo_cpu, self.row_hi_cpu):
                t[src], t[dst] = t[dst].clone(), t[src].clone()
        else:
            if b is not None:  # dst's occupant is replaced
                self.release(b)
                self.num_steered_rows -= 1
            if a is not None:
                self._row_spec[dst] = a
            for t in (self.row_slot_cpu, self.row_lo_cpu, self.row_hi_cpu):
                t[dst] = t[src]
            self.row_slot_cpu[src] = 0
        self._rows_dirty = True

    def sync_rows(self) -> None:
        if self._rows_dirty:
            self.row_slot.copy_(self.row_slot_cpu, non_blocking=True)
            self.row_lo.copy_(self.row_lo_cpu, non_blocking=True)
            self.row_hi.copy_(self.row_hi_cpu, non_blocking=True)
            self._rows_dirty = False

    # ------------------------------------------------------------ forward
    def prepare_step(self, req_indices: torch.Tensor, positions: torch.Tensor, num_tokens: int) -> None:
        """Fill ``token_slot`` for this step. Runs before the forward, outside any captured
        region; the graph reads ``token_slot`` by address.

        Args:
            req_indices: ``[>= num_tokens]`` int, the persistent-batch row of each token
                (the model runner's own per-token request index).
            positions: ``[T_pad]`` int, absolute position of each token; ``T_pad >=
                num_tokens`` is the (CUDA-graph) padded step size.
            num_tokens: real tokens this step; tokens ``num_tokens..`` are padding.

        Token ``t`` of row ``r`` gets ``row_slot[r]`` when ``row_lo[r] <= pos(t) <
        row_hi[r]``, else 0; padded tokens get 0.
        """
        n_pad = positions.shape[-1]
        if n_pad > self.max_num_tokens or num_tokens > n_pad:
            raise RuntimeError(
                f"roast-vllm: step has {num_tokens} tokens ({n_pad} padded) but steering buffers "
                f"hold {self.max_num_tokens}; raise max_num_batched_tokens consistently"
            )
        self.num_steps_prepared += 1
        self._prepare_capture(req_indices, positions, num_tokens)
        self.step_steered = self.num_steered_rows > 0
        if not self.step_steered:
            if self._tokens_dirty:
                self.token_slot.zero_()
                self._tokens_dirty = False
            return
        n = num_tokens
        rows = req_indices[:n].to(device=self.token_slot.device, dtype=torch.long)
        pos = positions[:n].to(torch.long)
        keep = (pos >= self.row_lo[rows]) & (pos < self.row_hi[rows])
        torch.mul(self.row_slot[rows], keep, out=self.token_slot[:n])
        self.token_slot[n:].zero_()  # padded graph tokens (and any stale tail) get slot 0
        self._tokens_dirty = True

    def _eager_skip(self, x: torch.Tensor) -> bool:
        """True when the steering op may be skipped: plain eager execution with no steered
        row this step. Never inside torch.compile tracing or CUDA-graph capture, where the
        op must be recorded whatever this step holds."""
        if torch.compiler.is_compiling():
            return False
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        return not self.step_steered

    def apply(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Steer ``h [n, H]`` (the stream after ``layer``) in place; traced into the
        compiled graph, where it reads the live buffers."""
        if self._eager_skip(h):
            return h
        return steer_apply(h, self.table[layer], self.token_slot[: h.shape[0]], self.slot_scale)

    def apply_mlp(self, layer: int, act: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        """``act [n, I] = SiluAndMul(gate_up)``; adds ``slot_scale[s] * mlp_table[layer, s]
        * up[t]`` to steered tokens in place (the ``mlp_act`` steering) and returns it.
        A capture records SiLU(gate) itself, before steering."""
        width = act.shape[-1]
        if not torch.compiler.is_compiling() and self._cap_index is not None:
            if "mlp_act" in self.capture_sites:
                gate = gate_up[..., :width]
                self._record(layer, "mlp_act", torch.nn.functional.silu(gate[self._cap_index].float()))
        if self._eager_skip(act):
            return act
        n = act.shape[0]
        return steer_mlp_act(
            act, gate_up[..., width:], self.mlp_table[layer], self.token_slot[:n], self.slot_scale
        )

    # ------------------------------------------------------------ capture
    def capture_residual(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Eager only: record the residual stream ``hidden + residual`` after ``layer``
        (called before this layer's steering: captures read the model's own activations)."""
        if self._cap_index is None or "residual" not in self.capture_sites:
            return
        idx = self._cap_index
        h = hidden[idx].float()
        if residual is not None:
            h = h + residual[idx].float()
        self._record(layer, "residual", h)

    def _record(self, layer: int, site: str, rows: torch.Tensor) -> None:
        if layer not in self._cap_layer_pos:
            return
        k = self._cap_layer_pos[layer]
        for i, cid in enumerate(self._cap_ids):
            self._cap_step[cid][site][k] = rows[i].cpu()

    def _prepare_capture(self, req_indices: torch.Tensor, positions: torch.Tensor, n: int) -> None:
        self._finish_capture_step()
        if not self._capture_rows:
            return
        if self.compiled:
            logger.error(
                "roast-vllm: activation capture needs an eager engine (enforce_eager=True); "
                "%d capture request(s) get no activations",
                len(self._capture_rows),
            )
            self._capture_rows.clear()
            return
        rows = req_indices[:n].tolist()
        pos = positions[:n].tolist()
        want = {(row, at): cid for row, (cid, at) in self._capture_rows.items()}
        idx, ids = [], []
        for t, key in enumerate(zip(rows, pos)):
            cid = want.get(key)
            if cid is not None:
                idx.append(t)
                ids.append(cid)
                del self._capture_rows[key[0]]
        if idx:
            self._cap_index = torch.tensor(idx, device=positions.device)
            self._cap_ids = ids
            self._cap_layer_pos = {l: k for k, l in enumerate(self.capture_layers)}
            nl = len(self.capture_layers)
            self._cap_step = {cid: {s: [None] * nl for s in self.capture_sites} for cid in ids}

    def _finish_capture_step(self) -> None:
        """Move last step's per-layer rows into ``captures`` (``[len(layers), dim]``)."""
        if self._cap_index is None:
            return
        for cid, sites in self._cap_step.items():
            self.captures[cid] = {s: torch.stack(rows) for s, rows in sites.items() if None not in rows}
        self._cap_index, self._cap_ids, self._cap_step = None, [], {}

    def pop_captures(self, ids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        self._finish_capture_step()
        return {cid: self.captures.pop(cid) for cid in ids if cid in self.captures}
