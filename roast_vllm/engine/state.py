"""Worker-side steering state: the buffers the steered model reads on every forward.

Shapes (``L`` layers, ``S = max_steering_slots + 1`` slots, ``H`` hidden, ``R`` =
``max_num_seqs`` batch rows, ``T`` = max tokens per step)::

    table       [L, S, H]  fp32; table[l, s] = v_s[l] (0 where slot s does not steer
                           layer l; times the layer's own scale for a per-layer
                           ``steer_scale``); slot 0 is all zeros = "no steering"
    mlp_table   [L, S, I]  fp32, the same for ``mlp_act`` vectors (I = MLP width on
                           this rank); a slot's row is zero in the table of the other site
    slot_scale  [S]        fp32 scale of each slot (0 for slot 0; 1 for a per-layer one)
    slot_mlp    [S]        int64, 1 where the slot steers the ``mlp_act`` site
    slot_res    [S]        int64, 1 where the slot steers the residual stream (a
                           multi-vector combination may steer both)
    token_slot  [T]        int64, the residual-site slot of each token of the current step
    mlp_token_slot [T]     int64, the same for ``mlp_act`` slots
    row_slot    [R]        slot of the request in each persistent-batch row
    row_lo/hi   [R]        steered absolute positions [lo, hi) of each row
    fusion_coef [L, S]     fp32 per-layer coefficient c_l of each Fusion slot (0 elsewhere)
    fusion_sum  [L, K, H]  fp32 running sum of each Fusion request's own pre-injection
                           stream per layer (K = max_num_seqs + 1 running states; 0 unused)
    fusion_meta [5, R]     int64 this step's Fusion requests: start, n, state, slot, count0

Per step, before the forward and outside any captured region (CUDA graph or compiled
graph), ``prepare_step`` fills ``token_slot`` and ``mlp_token_slot`` from the model
runner's per-token request index and positions (``roast_vllm.engine.runner`` calls it, as
vLLM prepares LoRA's per-token indices): nothing inside the model's ``forward`` depends on per-step Python
state or on attention metadata, so a replayed full CUDA graph reads the right slots.

Why this layout: inside the compiled graph each layer does one fused gather-add,
``h[t] += slot_scale[s] * table[l, s]`` with ``s = token_slot[t]`` (the
``roast_vllm.kernels.steer_apply`` op: Triton on CUDA, torch on CPU), reading tensors that
are updated in place, so torch.compile never bakes a vector or a batch composition into the
graph, and any mix of requests (steered or not, prefill chunks and decodes) runs in one
batch. Rows whose slot is 0 are left untouched, bit for bit. On CUDA a compiled graph
(and the CUDA graph replaying it) holds the op as one opaque call that decides from
``token_slot`` at run time: an unsteered token costs its kernel program one slot read. On
CPU the compiled graph traces the reference instead, and inductor fuses the gather-add into
the loop that already reads the tensor (the next residual add and RMSNorm; for ``mlp_act``
the SiluAndMul loop), so it costs no pass of its own, steered or not; eager steps with no
steered row skip the call.

``mlp_act`` steering adds ``delta`` to SiLU(gate) before the multiply by ``up``; since
``(SiLU(g) + delta) * up = SiluAndMul(g, up) + delta * up``, the stock fused activation
stays and one fused op adds ``scale[s] * mlp_table[l, s] * up[t]`` to steered tokens
only (``roast_vllm.kernels.steer_mlp_act``); unsteered tokens are not touched.
Each site's op reads its own per-token slots: a token steered at one site is slot 0 for
the other site's op, which so skips it (on CUDA and in eager steps; traced on CPU both
sites' selects are fused into loops that run anyway).

Fusion Steering (``steer_mode="fusion"``): a Fusion slot's table rows hold ``c_l * r_l``
(never read by ``steer_apply``: its tokens get residual slot 0) and ``fusion_coef`` its
``c_l``. The ``fusion_mean`` op adds ``c_l * (r_l - m_l)`` with ``m_l`` the request's running
mean, kept in ``fusion_sum`` by the forward itself. A running state belongs to a *request*
(vLLM's request id), not to a batch row: vLLM drops a request that is not scheduled in a
step from the persistent batch and adds it back later, and moves rows around; the state
stays put. ``prepare_step`` (outside any graph) writes ``fusion_meta`` from the runner's
per-request token offsets and computed-token counts; a request seen again at position 0
(recomputed after preemption) starts a fresh sum. Fusion requests never read the prefix
cache (the scheduler sets ``skip_reading_prefix_cache``): a cached position is a position
the forward never saw, so its term would be missing from the mean.

Activation capture (eager engines only, opt-in with the roast config's ``allow_capture``):
a request with ``extra_args["roast_capture"] = id`` records, at its last prompt token, the
residual stream after every capture layer and the ``mlp_act`` activation, kept here until
``pop_captures`` takes them (at most ``max_capture_bytes``; the oldest are dropped). With
``roast_capture_from = k`` it records their mean over prompt positions ``k ..`` instead
(Fusion Steering's reference vectors: the answer-and-explanation positions), summed step by
step across prefill chunks.

Vectors are versioned by content digest: re-registering a name adds a version; a request
steers with the version the front end stamped on it at submission, so a running,
preempted or queued request never switches vector mid-generation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from roast_vllm.engine.spec import (
    CAPTURE_FROM_KEY,
    CAPTURE_KEY,
    MAX_SCALE,
    SteeringRequestError,
    SteerSpec,
    SteerTerm,
    parse_steer_args,
)
from roast_vllm.kernels.fusion_mean import fusion_mean
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
    mlp: bool = False  # the slot steers the mlp_act site
    residual: bool = True  # the slot steers the residual stream (a combination may do both)


@dataclass
class _Row:
    """What occupies one persistent-batch row (only rows that steer or capture)."""

    slot: int = 0  # 0: not steered
    lo: int = 0
    hi: int = 0
    capture: tuple[str, int, int] | None = None  # (capture id, first, last position averaged)
    fusion: bool = False  # a Fusion Steering request (slot read by fusion_mean only)


@dataclass
class _FState:
    """One Fusion request's running state: its row of ``fusion_sum`` and the position the
    next step must start at (anything else is a gap or a recompute)."""

    index: int
    next_pos: int = 0
    last_step: int = 0


@dataclass
class StepRequests:
    """What ``prepare_step`` needs of the runner for Fusion requests (CPU, no device read):
    ``query_start_loc [num_reqs + 1]`` token offset of each batch row, ``num_computed [R]``
    tokens each row had computed before this step, ``req_ids [R]`` each row's request id,
    ``live``: the ids of requests the runner still holds (running or preempted)."""

    query_start_loc: object
    num_computed: object
    req_ids: list
    live: object


@dataclass
class _Pending:
    """A row added by this batch update, resolved once its final row is known."""

    spec: SteerSpec | None
    prompt_len: int | None  # None: not given (prompt embeddings): read from the runner
    #: (capture id, first prompt position averaged; None: the last token only)
    capture: tuple[str, int | None] | None


class SlotsExhausted(RuntimeError):
    """No free steering slot (the scheduler's admission rule should make this unreachable)."""


#: Old versions of re-registered vectors kept for requests submitted before the change
#: (pinned by digest); beyond this many, the oldest ones no slot uses are dropped.
MAX_RETIRED_VERSIONS = 64


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
        allow_capture: bool = True,
        max_capture_bytes: int = 1 << 30,
        fusion: bool = True,
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
            "slot_mlp", torch.zeros(max_slots + 1, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "slot_res", torch.zeros(max_slots + 1, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "token_slot",
            torch.zeros(max_num_tokens, dtype=torch.long, device=device),
            persistent=False,
        )
        self.register_buffer(
            "mlp_token_slot",
            torch.zeros(max_num_tokens, dtype=torch.long, device=device),
            persistent=False,
        )
        # Fusion Steering: per-slot coefficients, per-request running sums, per-step list.
        self.fusion = fusion
        nf = max_num_seqs + 1 if fusion else 1
        self.register_buffer(
            "fusion_coef",
            torch.zeros(num_layers, max_slots + 1, dtype=torch.float32, device=device),
            persistent=False,
        )
        self.register_buffer(
            "fusion_sum",
            torch.zeros(num_layers, nf, hidden_size, dtype=torch.float32, device=device),
            persistent=False,
        )
        self.fusion_meta_cpu = torch.zeros(5, max_num_seqs, dtype=torch.long)
        self.register_buffer("fusion_meta", self.fusion_meta_cpu.clone().to(device), persistent=False)
        self._fstates: dict[object, _FState] = {}  # request id -> running state
        self._fstate_free = list(range(nf - 1, 0, -1))
        self._fusion_dirty = False
        self.num_fusion_rows = 0
        #: Python-side "a Fusion request has tokens this step" (eager skip only).
        self.step_fusion = False
        #: Steps where a Fusion request did not start where its running sum ended (should
        #: stay 0: prefix-cache reads are off for Fusion requests); each one is logged.
        self.num_fusion_gaps = 0
        self.num_fusion_evictions = 0
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
        #: Rows steered at the ``mlp_act`` site and at the residual stream (a combination of
        #: both sites' vectors counts in both).
        self.num_mlp_rows = 0
        self.num_residual_rows = 0
        #: Python-side "any row steered this step", overall and per site (set by
        #: ``prepare_step``); read only on eager paths to skip no-op ops, never inside a
        #: captured or compiled region.
        self.step_steered = False
        self.step_steered_residual = False
        self.step_steered_mlp = False
        #: Steps prepared so far (tests check that the runner hook runs every step).
        self.num_steps_prepared = 0
        #: ``row -> prompt length`` from the model runner (set by the runner hook); used
        #: when vLLM gives no prompt token ids (prompt embeddings).
        self.prompt_len_of_row: Callable[[int], int] | None = None

        # Vectors by version: ``names`` maps a name to its current digest; requests are
        # pinned to the digest the front end stamped at submission.
        self.versions: dict[str, SteeringVector] = {}
        self.names: dict[str, str] = {}
        self._retired: dict[str, None] = {}  # insertion-ordered: oldest first
        self._slots: dict[tuple, _Slot] = {}
        self._slot_by_index: dict[int, _Slot] = {}
        self._free = list(range(max_slots, 0, -1))  # pop() gives 1, 2, ...
        self._used_indices: set[int] = set()
        #: Acquisitions that reused a previously released slot index (observability).
        self.num_slot_reuses = 0
        #: Rows that could not be steered as asked (unreachable when the front end and the
        #: scheduler did their part; each one is logged as an error).
        self.num_rows_refused = 0
        self._rows: dict[int, _Row] = {}
        self._fusion_rows: dict[int, _Row] = {}
        #: Some row waits for a capture: derived from ``_rows`` where captures change (batch
        #: updates, capture steps), so steps without captures skip the scan of ``_rows``.
        self._captures_pending = False

        # capture: opt-in, bounded
        self.allow_capture = allow_capture
        self.max_capture_bytes = max_capture_bytes
        self.num_captures_dropped = 0
        self.capture_layers: tuple[int, ...] = tuple(range(num_layers))
        self.capture_sites: tuple[str, ...] = ("residual", "mlp_act") if mlp_size else ("residual",)
        self._cap_index: torch.Tensor | None = None  # token indices of this step's captures
        self._cap_groups: dict[str, list[int]] = {}  # capture id -> its rows of _cap_index
        #: captures whose last position is in this step -> positions they average
        self._cap_done: dict[str, int] = {}
        # per capture id: per site, per capture layer, the sum over the positions so far
        self._cap_acc: dict[str, dict[str, list[torch.Tensor | None]]] = {}
        self._cap_layer_pos: dict[int, int] = {}
        self.captures: dict[str, dict[str, torch.Tensor]] = {}
        self._capture_bytes = 0

    # ------------------------------------------------------------ vectors
    @property
    def vectors(self) -> dict[str, SteeringVector]:
        """The current vector of each name."""
        return {n: self.versions[d] for n, d in self.names.items()}

    def register_vector(self, name: str, vector: SteeringVector) -> str:
        """Make ``vector`` the current version of ``name``; returns its digest. Requests
        pinned to an older version keep it (slots are keyed by digest)."""
        if vector.site == "mlp_act":
            if not self.mlp_size:
                raise SteeringVectorError(
                    f"vector {name!r} targets site 'mlp_act', which this engine has switched off; "
                    "start it with the roast config's mlp_act_site=True (the default)"
                )
            vector.validate_for(self.num_layers, self.mlp_size)
        else:
            vector.validate_for(self.num_layers, self.hidden_size)
        digest = vector.digest()
        old = self.names.get(name)
        self.versions[digest] = vector
        self.names[name] = digest
        self._retired.pop(digest, None)
        if old is not None and old != digest and old not in self.names.values():
            self._retired[old] = None
            self._evict_retired()
        return digest

    def unregister_vector(self, name: str) -> bool:
        """Forget ``name``: new requests cannot use it; requests pinned to its version keep
        it (it is retired like a replaced version). Returns whether it was registered."""
        digest = self.names.pop(name, None)
        if digest is None:
            return False
        if digest not in self.names.values():
            self._retired[digest] = None
            self._evict_retired()
        return True

    def _evict_retired(self) -> None:
        if len(self._retired) <= MAX_RETIRED_VERSIONS:
            return  # the common case: nothing to scan (this runs on every slot release)
        in_use = {d for slot in self._slots.values() for d in slot.key[0].split(",")}
        for d in list(self._retired):
            if len(self._retired) <= MAX_RETIRED_VERSIONS:
                break
            if d not in in_use:
                del self._retired[d]
                self.versions.pop(d, None)

    def _release_index(self, slot: _Slot) -> None:
        self._slot_by_index.pop(slot.index, None)
        # A freed slot holds nothing: its scale and rows are zeroed, so a stale token_slot
        # entry (or a later configuration that gets this index) never sees the old vector.
        # These writes are stream-ordered after every step already launched.
        self.slot_scale[slot.index] = 0.0
        self.slot_mlp[slot.index] = 0
        self.slot_res[slot.index] = 0
        self.table[:, slot.index].zero_()
        self.mlp_table[:, slot.index].zero_()
        self.fusion_coef[:, slot.index].zero_()
        self._free.append(slot.index)

    # -------------------------------------------------------------- slots
    def _resolve(
        self, spec: SteerSpec
    ) -> tuple[str, list[tuple[SteeringVector, tuple[int, ...], list[float] | None]]]:
        """``(digest, [(vector, layers, per-layer scales or None)])`` of ``spec``'s vectors
        at their pinned versions: one entry, or one per term of a combination (whose scales
        are always folded); ``digest`` the versions joined by commas (``spec.digests``'
        form). Raises ``SteeringVectorError`` if anything does not fit."""
        terms = spec.terms or (SteerTerm(spec.vector, 1.0, spec.layers),)
        digests = spec.digests or tuple(self.names.get(t.vector) for t in terms)
        if len(digests) != len(terms):
            raise SteeringVectorError(
                f"steering {spec.vector!r}: {len(digests)} versions for {len(terms)} vectors"
            )
        out = []
        for t, digest in zip(terms, digests):
            vec = self.versions.get(digest) if digest is not None else None
            if vec is None:
                raise SteeringVectorError(
                    f"unknown steering vector {t.vector!r}" + (f" (version {digest})" if spec.digest else "")
                )
            layers = t.layers if t.layers is not None else tuple(vec.layers)
            missing = [l for l in layers if l not in vec.directions]
            if missing:
                raise SteeringVectorError(f"vector {t.vector!r} has no direction for layers {missing}")
            if vec.site == "mlp_act" and not self.mlp_size:
                raise SteeringVectorError(f"vector {t.vector!r} is an mlp_act vector; that site is off")
            out.append((vec, layers, [t.scale] * self.num_layers if spec.terms else None))
        return ",".join(digests), out

    def acquire(self, spec: SteerSpec) -> int:
        """The slot index for ``spec`` (shared with every row of the same configuration).
        Raises ``SteeringVectorError`` if the spec does not fit its vector(s) and
        ``SlotsExhausted`` if no slot is free; writes nothing in either case."""
        digest, parts = self._resolve(spec)
        fusion = spec.mode == "fusion"
        if fusion:
            if not self.fusion:
                raise SteeringVectorError(
                    "Fusion Steering is off on this engine; start it with the roast config's fusion=True"
                )
            if parts[0][0].site != "residual":
                raise SteeringVectorError(
                    f"Fusion Steering needs a residual-stream reference; {spec.vector!r} is a "
                    f"{parts[0][0].site} vector"
                )
        scales = [spec.scale] if not spec.terms else [t.scale for t in spec.terms]
        per_layer = isinstance(spec.scale, tuple)
        if not all(
            math.isfinite(x) and abs(x) <= MAX_SCALE
            for sc in scales
            for x in (sc if isinstance(sc, tuple) else [sc])
        ):
            raise SteeringVectorError(f"steer_scale {spec.scale!r} out of range (|scale| <= {MAX_SCALE:g})")
        try:
            layer_scales = spec.layer_scales(self.num_layers)
        except SteeringRequestError as e:
            raise SteeringVectorError(str(e)) from None
        # fold the scales into the slot's rows (slot_scale 1.0) for a per-layer scale, Fusion
        # and combinations; a single vector at one scale keeps its rows and slot_scale
        fold = per_layer or fusion or bool(spec.terms)
        key = (digest, *spec.slot_key[1:])  # the front end's key, with the resolved versions
        slot = self._slots.get(key)
        if slot is None:
            if not self._free:
                raise SlotsExhausted(f"all {self.max_slots} steering slots are in use")
            index = self._free.pop()
            self.num_slot_reuses += index in self._used_indices
            self._used_indices.add(index)
            sites = {v.site for v, _, _ in parts}
            rows = {
                site: torch.zeros(self.num_layers, tbl.shape[-1], dtype=torch.float32)
                for site, tbl in (("residual", self.table), ("mlp_act", self.mlp_table))
                if site in sites
            }
            for vec, layers, term_scales in parts:
                mlp = vec.site == "mlp_act"
                width = rows[vec.site].shape[-1]
                rank = self.mlp_shard[0] if mlp else 0
                per = term_scales if term_scales is not None else layer_scales
                for l in layers:
                    # tensor parallel: this rank's MLP columns are one contiguous slice
                    d = vec.directions[l][rank * width : (rank + 1) * width].float()
                    # a folded scale is applied here, in fp32 (the same product the ops form
                    # from table * scale), with the slot's scale 1.0: no per-layer buffer, the
                    # ops and the captured graphs are unchanged. Fusion: the rows are c_l * r_l,
                    # and fusion_coef holds c_l. Combinations: sum_i s_i * v_i[l].
                    rows[vec.site][l] += d * per[l] if fold else d
            # the other site's rows of this slot are already zero: free slots hold nothing
            # (zeroed at start and by _release_index)
            if "residual" in rows:
                self.table[:, index].copy_(rows["residual"])
            if "mlp_act" in rows:
                self.mlp_table[:, index].copy_(rows["mlp_act"])
            if fusion:
                coef = torch.zeros(self.num_layers, dtype=torch.float32)
                for l in parts[0][1]:
                    coef[l] = layer_scales[l]
                self.fusion_coef[:, index].copy_(coef)
            self.slot_scale[index] = 1.0 if fold else spec.scale
            self.slot_mlp[index] = int("mlp_act" in rows)
            self.slot_res[index] = int("residual" in rows)
            slot = _Slot(index, key, mlp="mlp_act" in rows, residual="residual" in rows)
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
            self._evict_retired()

    def active_slots(self) -> int:
        return len(self._slot_by_index)

    # --------------------------------------------------------------- rows
    def apply_batch_update(self, removed, added, moved) -> None:
        """Apply one vLLM ``BatchUpdate`` (``removed`` rows, ``added`` ``(row, params,
        prompt_ids, output_ids)``, ``moved`` ``(src, dst, MoveDirectionality)``).

        Runs in the engine core's per-step path, so it is total: a request that cannot be
        steered as asked (unreachable after front-end validation and slot admission) runs
        unsteered with an error in the log and ``num_rows_refused`` counted; nothing
        raises. The update is applied as one transition: vLLM's ``condense()`` refills a
        finished request's row with a *move* (the row never appears in ``removed``), and
        rows added this step are listed before those moves, so every row's old occupant
        is released before any new occupant acquires a slot."""
        from vllm.v1.sample.logits_processor import MoveDirectionality

        entries: list[tuple[int, SteerSpec | None, int | None, str | None]] = []
        for row, params, prompt_ids, _out in added:
            extra = getattr(params, "extra_args", None) if params is not None else None
            try:
                spec = parse_steer_args(extra)
            except SteeringRequestError as e:
                logger.error("roast-vllm: row %d: %s; it runs UNSTEERED", row, e)
                self.num_rows_refused += 1
                spec = None
            cap = extra.get(CAPTURE_KEY) if isinstance(extra, dict) else None
            cap_from = extra.get(CAPTURE_FROM_KEY) if isinstance(extra, dict) else None
            n = len(prompt_ids) if prompt_ids is not None else None
            if not (isinstance(cap_from, int) and not isinstance(cap_from, bool) and cap_from >= 0):
                cap_from = None  # checked at submission; anything else: the last token
            entries.append((row, spec, n, (cap, cap_from) if isinstance(cap, str) and cap else None))
        self._apply(removed, entries, [(a, b, kind == MoveDirectionality.SWAP) for a, b, kind in moved])

    def _apply(self, removed, added, moved) -> None:
        occ: dict[int, _Row | _Pending] = dict(self._rows)
        for row in removed:
            occ.pop(row, None)
        for row, spec, n, cap in added:
            if spec is None and cap is None:
                occ.pop(row, None)
            else:
                occ[row] = _Pending(spec, n, cap)
        for src, dst, swap in moved:
            a, b = occ.pop(src, None), occ.pop(dst, None)
            if a is not None:
                occ[dst] = a
            if swap and b is not None:
                occ[src] = b
        # release every old occupant that is gone, before anything acquires
        alive = {id(e) for e in occ.values()}
        for old in self._rows.values():
            if id(old) not in alive and old.slot:
                self.release(old.slot)
        rows: dict[int, _Row] = {}
        for row, e in occ.items():
            if isinstance(e, _Row):
                rows[row] = e
                continue
            if not 0 <= row < self.max_num_seqs:
                logger.error("roast-vllm: batch row %d outside 0..%d; ignored", row, self.max_num_seqs - 1)
                continue
            n = e.prompt_len
            if n is None:
                n = self.prompt_len_of_row(row) if self.prompt_len_of_row is not None else 0
            r = _Row()
            if e.capture is not None:
                cid, start = e.capture
                if self.allow_capture:
                    last = max(n - 1, 0)
                    r.capture = (cid, last if start is None else min(start, last), last)
                else:
                    logger.error("roast-vllm: capture %r refused: capture is off on this engine", cid)
            if e.spec is not None:
                try:
                    r.slot = self.acquire(e.spec)
                    r.lo, r.hi = e.spec.token_range(n)
                    r.fusion = e.spec.mode == "fusion"
                except (SteeringVectorError, SlotsExhausted) as err:
                    logger.error(
                        "roast-vllm: request in row %d cannot be steered (%s); it runs UNSTEERED",
                        row,
                        err,
                    )
                    self.num_rows_refused += 1
            if r.slot or r.capture is not None:
                rows[row] = r
        self._rows = rows
        self.row_slot_cpu.zero_()
        for row, r in rows.items():
            if r.fusion:
                continue  # read by fusion_mean through fusion_meta, never through token_slot
            self.row_slot_cpu[row] = r.slot
            self.row_lo_cpu[row] = r.lo
            self.row_hi_cpu[row] = r.hi
        self._fusion_rows = {row: r for row, r in rows.items() if r.fusion}
        self.num_fusion_rows = len(self._fusion_rows)
        self.num_steered_rows = sum(1 for r in rows.values() if r.slot and not r.fusion)
        slots = [
            s for r in rows.values() if r.slot and not r.fusion and (s := self._slot_by_index.get(r.slot))
        ]
        self.num_mlp_rows = sum(s.mlp for s in slots)
        self.num_residual_rows = sum(s.residual for s in slots)
        self._captures_pending = any(r.capture is not None for r in rows.values())
        self._rows_dirty = True
        self.sync_rows()

    # The one-row forms (tests, and callers outside a batch update).
    def set_row(self, row: int, spec: SteerSpec | None, prompt_len: int | None) -> None:
        self._apply([], [(row, spec, prompt_len, None)], [])

    def set_capture(
        self, row: int, capture_id: str | None, prompt_len: int, start: int | None = None
    ) -> None:
        """Record the activations of ``row``'s last prompt token under ``capture_id`` (or
        their mean over prompt positions ``start ..``)."""
        r = self._rows.get(row)
        if r is None:
            if capture_id is None:
                return
            r = self._rows[row] = _Row()
        last = prompt_len - 1
        first = last if start is None else min(start, last)
        r.capture = (capture_id, first, last) if capture_id is not None else None
        self._captures_pending = bool(self._capture_rows)

    def clear_row(self, row: int) -> None:
        self._apply([row], [], [])

    def move_row(self, src: int, dst: int, swap: bool) -> None:
        self._apply([], [], [(src, dst, swap)])

    @property
    def _capture_rows(self) -> dict[int, tuple[str, int, int]]:
        return {row: r.capture for row, r in self._rows.items() if r.capture is not None}

    def sync_rows(self) -> None:
        if self._rows_dirty:
            self.row_slot.copy_(self.row_slot_cpu, non_blocking=True)
            self.row_lo.copy_(self.row_lo_cpu, non_blocking=True)
            self.row_hi.copy_(self.row_hi_cpu, non_blocking=True)
            self._rows_dirty = False

    # ------------------------------------------------------------ forward
    def prepare_step(
        self,
        req_indices: torch.Tensor,
        positions: torch.Tensor,
        num_tokens: int,
        requests: StepRequests | None = None,
    ) -> None:
        """Fill ``token_slot`` for this step. Runs before the forward, outside any captured
        region; the graph reads ``token_slot`` by address.

        Args:
            req_indices: ``[>= num_tokens]`` int, the persistent-batch row of each token
                (the model runner's own per-token request index).
            positions: ``[T_pad]`` int, absolute position of each token; ``T_pad >=
                num_tokens`` is the (CUDA-graph) padded step size.
            num_tokens: real tokens this step; tokens ``num_tokens..`` are padding.
            requests: the runner's per-row offsets, computed counts and request ids, for
                Fusion requests (None: derived from ``req_indices`` and ``positions`` on
                the host, with the row index as the request id; tests only).

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
        self._prepare_fusion(req_indices, positions, num_tokens, requests)
        self.step_steered = self.num_steered_rows > 0
        self.step_steered_mlp = self.num_mlp_rows > 0
        self.step_steered_residual = self.num_residual_rows > 0
        if not self.step_steered:
            if self._tokens_dirty:
                self.token_slot.zero_()
                self.mlp_token_slot.zero_()
                self._tokens_dirty = False
            return
        n = num_tokens
        rows = req_indices[:n].to(device=self.token_slot.device, dtype=torch.long)
        pos = positions[:n].to(torch.long)
        keep = (pos >= self.row_lo[rows]) & (pos < self.row_hi[rows])
        slots = self.row_slot[rows] * keep
        # each site's op reads only the slots that steer its site (a combination of both
        # sites' vectors is in both)
        torch.mul(slots, self.slot_mlp[slots], out=self.mlp_token_slot[:n])
        torch.mul(slots, self.slot_res[slots], out=self.token_slot[:n])
        self.token_slot[n:].zero_()  # padded graph tokens (and any stale tail) get slot 0
        self.mlp_token_slot[n:].zero_()
        self._tokens_dirty = True

    def _prepare_fusion(self, req_indices, positions, n: int, requests: StepRequests | None) -> None:
        """Fill ``fusion_meta`` with this step's Fusion requests (compact: entries with
        tokens first, then ``n = 0``) and keep each request's running state. Host-side only.

        Per request: its tokens ``[start, start + n)`` this step begin at position ``p0``;
        with ``lo`` = 1 under ``skip_first`` (position 0 neither counted nor injected) and
        else 0, the positions counted before this step are ``count0 = p0 - lo``."""
        if not self.fusion_active:
            if self._fusion_dirty:
                self.fusion_meta_cpu[1].zero_()
                self.fusion_meta[1].zero_()
                self._fusion_dirty = False
            self.step_fusion = False
            return
        if requests is None:
            requests = _requests_from_tokens(req_indices, positions, n, self.max_num_seqs)
        live = requests.live
        for rid in [rid for rid in self._fstates if rid not in live]:
            self._fstate_free.append(self._fstates.pop(rid).index)  # finished: free the row
        meta = self.fusion_meta_cpu
        meta[1].zero_()
        qsl, ncomp, ids = requests.query_start_loc, requests.num_computed, requests.req_ids
        j = 0
        for row, r in self._fusion_rows.items():
            if row + 1 >= len(qsl) or row >= len(ids):
                continue  # not in this step's batch
            start, end = int(qsl[row]), int(qsl[row + 1])
            if end <= start:
                continue
            rid, p0 = ids[row], int(ncomp[row])
            fs = self._fstate(rid)
            if fs is None:
                continue
            if p0 == 0:
                fs.next_pos = 0  # (re)computed from the start: a fresh sum
                self.fusion_sum[:, fs.index].zero_()
            elif p0 != fs.next_pos:
                self.num_fusion_gaps += 1
                logger.error(
                    "roast-vllm: Fusion request %s resumes at position %d but its running mean "
                    "covers positions up to %d; its mean misses or repeats positions",
                    rid,
                    p0,
                    fs.next_pos,
                )
            fs.next_pos = p0 + (end - start)
            fs.last_step = self.num_steps_prepared
            skip = max(r.lo - p0, 0)  # leading positions below lo (skip_first: position 0)
            if end - start - skip <= 0:
                continue
            meta[:, j] = torch.tensor([start + skip, end - start - skip, fs.index, r.slot, p0 + skip - r.lo])
            j += 1
        self.step_fusion = j > 0
        if j or self._fusion_dirty:
            self.fusion_meta.copy_(meta, non_blocking=True)
            self._fusion_dirty = j > 0

    def _fstate(self, rid) -> _FState | None:
        fs = self._fstates.get(rid)
        if fs is not None:
            return fs
        if not self._fstate_free:
            # More live Fusion requests than batch rows: some are preempted (their next
            # run starts at position 0 and a fresh sum) or not scheduled. Evict the one
            # idle longest; should it resume mid-sequence, the gap is logged.
            victim = min(self._fstates, key=lambda k: self._fstates[k].last_step, default=None)
            if victim is None:
                return None
            self._fstate_free.append(self._fstates.pop(victim).index)
            self.num_fusion_evictions += 1
        fs = self._fstates[rid] = _FState(self._fstate_free.pop())
        self.fusion_sum[:, fs.index].zero_()
        return fs

    @property
    def fusion_active(self) -> bool:
        """Some Fusion request is in the batch or holds a running state (the runner hook
        then passes ``StepRequests`` to ``prepare_step``)."""
        return bool(self._fusion_rows or self._fstates)

    def apply_fusion(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Fusion Steering at ``layer`` for this step's Fusion tokens of ``h [n, H]`` (the
        layer's output; the stream is ``h + residual``), in place; ``fusion_sum[layer]``
        takes their stream. In a compiled graph one opaque op call."""
        if not self.fusion or self._eager_skip(h, self.step_fusion):
            return h
        res = residual if residual is not None else torch.zeros_like(h)
        return fusion_mean(
            h, res, self.table[layer], self.fusion_coef[layer], self.fusion_sum, self.fusion_meta, layer
        )

    def _eager_skip(self, x: torch.Tensor, steered: bool) -> bool:
        """True when the steering op may be skipped: plain eager execution with no row
        steered at the op's site this step (``steered``). Never inside torch.compile
        tracing or CUDA-graph capture, where the op must be recorded whatever this step
        holds."""
        if torch.compiler.is_compiling():
            return False
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        return not steered

    def apply(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Steer ``h [n, H]`` (the stream after ``layer``) in place; compiled, it reads the
        live buffers (one opaque op call on CUDA; traced and fused on CPU)."""
        if self._eager_skip(h, self.step_steered_residual):
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
        if self._eager_skip(act, self.step_steered_mlp):
            return act
        n = act.shape[0]
        return steer_mlp_act(
            act, gate_up[..., width:], self.mlp_table[layer], self.mlp_token_slot[:n], self.slot_scale
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
        """Add ``rows [n, dim]`` (this step's capture tokens, fp32) to each capture's sum."""
        if layer not in self._cap_layer_pos:
            return
        k = self._cap_layer_pos[layer]
        for cid, idx in self._cap_groups.items():
            part = (rows[idx[0]] if len(idx) == 1 else rows[idx[0] : idx[-1] + 1].sum(0)).cpu()
            acc = self._cap_acc[cid][site]
            acc[k] = part if acc[k] is None else acc[k] + part

    def _drop_capture(self, row: int) -> None:
        r = self._rows.get(row)
        if r is not None:
            r.capture = None
            if not r.slot:
                del self._rows[row]

    def _prepare_capture(self, req_indices: torch.Tensor, positions: torch.Tensor, n: int) -> None:
        self._finish_capture_step()
        if not self._captures_pending:
            return
        pending = self._capture_rows
        if self.compiled:
            logger.error(
                "roast-vllm: activation capture needs an eager engine (enforce_eager=True); "
                "%d capture request(s) get no activations",
                len(pending),
            )
            for row in pending:
                self._drop_capture(row)
            self._captures_pending = False
            return
        rows = req_indices[:n].tolist()
        pos = positions[:n].tolist()
        idx: list[int] = []
        groups: dict[str, list[int]] = {}  # capture id -> its entries of idx (contiguous)
        done: list[int] = []
        for t, (row, p) in enumerate(zip(rows, pos)):
            c = pending.get(row)
            if c is None or not c[1] <= p <= c[2]:
                continue
            groups.setdefault(c[0], []).append(len(idx))
            idx.append(t)
            if p == c[2]:
                done.append(row)
        self._cap_done = {pending[row][0]: pending[row][2] - pending[row][1] + 1 for row in done}
        for row in done:
            self._drop_capture(row)
        self._captures_pending = len(done) < len(pending)
        # sums of captures whose request is gone before its last position: dropped
        alive = {c[0] for c in pending.values()}
        for cid in [c for c in self._cap_acc if c not in alive]:
            del self._cap_acc[cid]
        if idx:
            self._cap_index = torch.tensor(idx, device=positions.device)
            self._cap_groups = groups
            self._cap_layer_pos = {l: k for k, l in enumerate(self.capture_layers)}
            nl = len(self.capture_layers)
            for cid in groups:
                if cid not in self._cap_acc:
                    self._cap_acc[cid] = {s: [None] * nl for s in self.capture_sites}

    def _finish_capture_step(self) -> None:
        """Move last step's per-layer rows into ``captures`` (``[len(layers), dim]``),
        dropping the oldest held captures beyond ``max_capture_bytes``."""
        if self._cap_index is None:
            return
        for cid, count in self._cap_done.items():
            sites = self._cap_acc.pop(cid)
            old = self.captures.pop(cid, None)
            if old is not None:
                self._capture_bytes -= _nbytes(old)
            cap = {s: torch.stack(rows) / count for s, rows in sites.items() if None not in rows}
            self.captures[cid] = cap
            self._capture_bytes += _nbytes(cap)
        self._cap_index, self._cap_groups, self._cap_done = None, {}, {}
        while self._capture_bytes > self.max_capture_bytes and len(self.captures) > 1:
            cid = next(iter(self.captures))
            self._capture_bytes -= _nbytes(self.captures.pop(cid))
            self.num_captures_dropped += 1
            logger.error(
                "roast-vllm: capture %r dropped: captures held exceed %d MiB (pop them with the "
                "capture RPC, or raise max_capture_mib)",
                cid,
                self.max_capture_bytes >> 20,
            )

    def pop_captures(self, ids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        self._finish_capture_step()
        out = {cid: self.captures.pop(cid) for cid in ids if cid in self.captures}
        self._capture_bytes -= sum(_nbytes(c) for c in out.values())
        return out


def _requests_from_tokens(req_indices, positions, n: int, num_rows: int) -> StepRequests:
    """``StepRequests`` from the per-token row index and positions (rows in token order,
    each row's tokens contiguous, as vLLM lays them out); the row index is the id."""
    rows = req_indices[:n].tolist()
    pos = positions[:n].tolist()
    qsl = [0] * (num_rows + 1)
    first: dict[int, int] = {}
    for t, row in enumerate(rows):
        first.setdefault(row, t)
        qsl[row + 1] = t + 1
    for row in range(num_rows):  # rows without tokens: an empty range
        if row not in first:
            qsl[row + 1] = max(qsl[row + 1], qsl[row])
    ncomp = [pos[first[row]] if row in first else 0 for row in range(num_rows)]
    return StepRequests(qsl, ncomp, list(range(num_rows)), set(range(num_rows)))


def _nbytes(cap: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in cap.values())
