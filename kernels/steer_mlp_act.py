"""Per-token steering of the gated-MLP activation (the ROAST ``mlp_act`` site).

The steered activation is ``(SiLU(g) + delta) * up`` with ``delta = scale[s] * table[s]``.
Since ``(SiLU(g) + delta) * up == SiluAndMul(g, up) + delta * up``, the stock fused
``SiluAndMul`` output ``act`` can be corrected after the fact (equal up to act's own
rounding) instead of unfusing it. In place on ``act``, over the ``T`` tokens of one step and
one layer::

    s = slot[t]
    if s != 0:  act[t] <- act[t] + scale[s] * table[s] * up[t]     (fp32, rounded once)
    if s == 0:  act[t] is not touched (bit-identical)

Shapes: ``act [T, I]`` (bf16/fp16/fp32, contiguous along ``I``), ``up [T, I]`` of act's
dtype with unit column stride; it is usually the view ``gate_up[:, I:]`` of the
``gate_up [T, 2I]`` projection (row stride ``2I``), which is read in place, never copied.
``table [S, I]`` fp32 (one layer's rows; row 0 is conventionally zeros), ``slot [T]``
int32/int64, ``scale [S]`` fp32. Position scope is encoded in ``slot``: a token outside
its request's scope gets slot 0.

Layers, as in ``steer_apply``: Triton kernel -> launcher ``steer_mlp_act_triton`` -> custom
op ``torch.ops.roast_vllm.steer_mlp_act`` -> ``steer_mlp_act``. ``steer_mlp_act_ref`` is the
pure-torch reference the tests compare against; ``steer_mlp_act_rows`` is the torch path off
CUDA (steered rows only; nothing but a scan of ``slot`` when no token is steered). Under
torch.compile the op is the opaque custom op on CUDA; on CPU the reference is traced and
inductor fuses it into the loop that computes ``act = SiLU(g) * up`` (it already reads
``up`` and writes ``act``): the correction costs one gathered table row per token, read from
cache, and no pass of its own (see ``steer_apply``).
"""

from __future__ import annotations

import functools

import torch
from roast_vllm.kernels.dispatch import register_op, use_triton

# Columns per program. The intermediate width I reaches 27648 (and TP shards of it), far
# past what one program should hold in registers, so the grid tiles I instead of using
# next_power_of_2(I) as steer_apply does for the narrower hidden size.
BLOCK = 1024


def _check(
    act: torch.Tensor, up: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor
) -> None:
    if act.dim() != 2 or table.dim() != 2 or act.shape[1] != table.shape[1]:
        raise ValueError(
            f"act [T, I] and table [S, I] must share I; got {tuple(act.shape)}, {tuple(table.shape)}"
        )
    if up.shape != act.shape:
        raise ValueError(f"up must have act's shape {tuple(act.shape)}, got {tuple(up.shape)}")
    if up.dtype != act.dtype:
        raise ValueError(f"up must have act's dtype {act.dtype}, got {up.dtype}")
    if slot.shape != (act.shape[0],):
        raise ValueError(f"slot must be [T={act.shape[0]}], got {tuple(slot.shape)}")
    if slot.dtype.is_floating_point or slot.dtype.is_complex or slot.dtype == torch.bool:
        raise ValueError(f"slot must be an integer tensor, got {slot.dtype}")
    if scale.shape != (table.shape[0],):
        raise ValueError(f"scale must be [S={table.shape[0]}], got {tuple(scale.shape)}")


def steer_mlp_act_ref(
    act: torch.Tensor, up: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Pure-torch reference; modifies and returns ``act``."""
    s = slot.long()
    # Every row is computed (fixed shapes, so it compiles to one fused loop); the row
    # select below, not the zero row of the table, is what keeps slot-0 rows exact: a
    # zero delta times an inf/nan in ``up`` would still be nan.
    delta = table.index_select(0, s).float() * scale.index_select(0, s).float()[:, None]
    y = act.float() + delta * up.float()
    act.copy_(torch.where((s != 0)[:, None], y.to(act.dtype), act))
    return act


def steer_mlp_act_rows(
    act: torch.Tensor, up: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Torch path over the steered rows only: the reference's math, with the multiply-add
    as one ``addcmul_`` (which may round once fewer, so equal to the reference within the
    fp32 bound, not bit for bit); ``act`` is untouched after one scan of ``slot`` when no
    token is steered. Data-dependent shapes: runs eagerly or inside the opaque custom op."""
    idx = slot.nonzero().squeeze(1)
    n = idx.numel()
    if n == 0:
        return act
    # few temporaries, updated in place: each [n, I] tensor allocated per call costs more
    # than its arithmetic on CPU (measured 2.7 ms vs 0.13 ms per call at [128, 1536] fp32)
    s = slot.index_select(0, idx).long()
    delta = table.index_select(0, s).float().mul_(scale.index_select(0, s).float()[:, None])
    if n == act.shape[0]:  # every token steered (a steered batch): no row gather/scatter
        y = act.float()  # act itself when fp32
        y.addcmul_(delta, up.float())
        if y is not act:
            act.copy_(y)
        return act
    y = act.index_select(0, idx).float().addcmul_(delta, up.index_select(0, idx).float())
    act.index_copy_(0, idx, y.to(act.dtype))
    return act


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def steer_mlp_act_kernel(
        ACT, UP, TABLE, SLOT, SCALE, n_cols, stride_act, stride_up, stride_table, BLOCK: tl.constexpr
    ):
        # grid (token, column block). In a decode batch most tokens are usually unsteered:
        # read the slot first and leave before any other load, so they cost one scalar read.
        t = tl.program_id(0)
        s = tl.load(SLOT + t)
        if s == 0:
            return
        # int64 row offsets: t * stride reaches past 2^31 elements at large T * I (e.g.
        # 40k tokens x 2 * 27648 in gate_up); the column offsets stay small.
        t64 = t.to(tl.int64)
        s64 = s.to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(ACT + t64 * stride_act + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(UP + t64 * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(TABLE + s64 * stride_table + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(SCALE + s64).to(tl.float32)
        # same association as the reference: (scale * table) * up, then the add. On CUDA the
        # multiply-add contracts to one FMA (one rounding fewer), so there it agrees with torch to
        # fp32 rounding rather than bitwise.
        y = x + (v * a) * u
        # the one rounding to act's dtype: round-to-nearest-even on GPU (cvt.rn). Triton's
        # interpreter truncates fp32 -> bf16 instead (up to 1 bf16 ulp); the tests allow for it.
        tl.store(ACT + t64 * stride_act + offs, y.to(ACT.dtype.element_ty), mask=mask)

    return steer_mlp_act_kernel


def steer_mlp_act_triton(
    act: torch.Tensor, up: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Launcher (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``). Returns ``act``."""
    import triton

    _check(act, up, table, slot, scale)
    # The kernel addresses columns as base + offs, so the last dim must be dense; rows may
    # be strided (``up`` is a view into gate_up).
    if act.stride(1) != 1:
        raise ValueError(f"act must be contiguous along I, got strides {act.stride()}")
    if up.stride(1) != 1:
        raise ValueError(f"up must have unit stride along I (e.g. gate_up[:, I:]), got {up.stride()}")
    if table.stride(1) != 1:
        raise ValueError(f"table must be contiguous along I, got strides {table.stride()}")
    T, I = act.shape
    if T == 0:
        return act
    _kernel()[(T, triton.cdiv(I, BLOCK))](
        act,
        up,
        table,
        slot.contiguous(),  # read as SLOT + t; a no-op for the usual contiguous slot
        scale.float().contiguous(),
        I,
        act.stride(0),
        up.stride(0),
        table.stride(0),
        BLOCK=BLOCK,
    )
    return act


def steer_mlp_act(
    act: torch.Tensor, up: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """In-place ``act += scale[slot] * table[slot] * up`` on steered rows; returns ``act``.
    On CUDA the opaque custom op (Triton); traced by torch.compile off CUDA the reference,
    which inductor fuses into the SiluAndMul loop that computes ``act`` (no extra pass);
    eager off CUDA ``steer_mlp_act_rows`` (steered rows only)."""
    if use_triton(act):
        torch.ops.roast_vllm.steer_mlp_act(act, up, table, slot, scale)
        return act
    if torch.compiler.is_compiling():
        return steer_mlp_act_ref(act, up, table, slot, scale)
    return steer_mlp_act_rows(act, up, table, slot, scale)


@functools.cache
def register_custom_op() -> None:
    """``torch.ops.roast_vllm.steer_mlp_act``: an opaque, in-place op that torch.compile (and
    so vLLM's compiled graph and CUDA graph) holds as one call: the Triton launch on CUDA,
    ``steer_mlp_act_rows`` on CPU tensors (compiled CPU graphs trace the reference)."""

    def _op(
        act: torch.Tensor, up: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor
    ) -> None:
        if use_triton(act):
            steer_mlp_act_triton(act, up, table, slot, scale)
        else:
            steer_mlp_act_rows(act, up, table, slot, scale)

    def _fake(act, up, table, slot, scale) -> None:
        return None

    register_op("steer_mlp_act", _op, ("act",), _fake)


try:  # registering needs only torch; the Triton kernel itself is built on first CUDA launch
    register_custom_op()
except Exception:  # pragma: no cover - a torch without torch.library's schema inference
    pass
