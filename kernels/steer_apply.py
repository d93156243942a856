"""Per-token steering add, the serving hot loop.

In place, over the ``T`` tokens of one step and one layer::

    s = slot[t]
    if s != 0:  h[t] <- h[t] + scale[s] * table[s]          (computed in fp32)
                (energy_preserving: then rescale h[t] to its original L2 norm)
    if s == 0:  h[t] is not touched (bit-identical)

Shapes: ``h [T, H]`` (bf16/fp16/fp32), ``table [S, H]`` (one layer's rows; row 0 is
conventionally zeros), ``slot [T]`` int, ``scale [S]`` float. Position scope is encoded
in ``slot``: a token outside its request's scope gets slot 0.

Layers: Triton kernel -> launcher ``steer_apply_triton`` -> custom op
``torch.ops.roast_vllm.steer_apply`` -> ``steer_apply``. ``steer_apply_ref`` is the
pure-torch reference (every row computed, then selected) that the tests compare against;
``steer_apply_rows`` is the torch path the engine runs off CUDA, bit for bit equal to the
reference: a step with no steered token costs one scan of ``slot``; a mostly steered one
one in-place pass (unsteered rows get ``+ (-0.0)``, the identity); a few steered rows are
gathered, updated and written back.

Inside torch.compile (vLLM's compile mode) the path depends on the device. On CUDA the op
is the opaque custom op (one Triton launch, recorded in the CUDA graph; a slot-0 token's
program leaves after reading its slot). On CPU the reference is traced into the graph:
inductor fuses its gather, add and select into the loop that already reads ``h`` (the next
layer's residual add and RMSNorm), so steering costs no extra pass over memory, steered or
not, where the opaque op cost a call and a pass per layer (README "Measured here": K = 64
``mlp_act`` steering 0.895 of stock's throughput as the op, 1.035 traced, and
``bench_kernels.py``'s compiled MLP block).
"""

from __future__ import annotations

import functools

import torch
from roast_vllm.kernels.dispatch import register_op, use_triton

_EPS = 1e-12


def _check(h: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor) -> None:
    if h.dim() != 2 or table.dim() != 2 or h.shape[1] != table.shape[1]:
        raise ValueError(
            f"h [T, H] and table [S, H] must share H; got {tuple(h.shape)}, {tuple(table.shape)}"
        )
    if slot.shape != (h.shape[0],):
        raise ValueError(f"slot must be [T={h.shape[0]}], got {tuple(slot.shape)}")
    if scale.shape != (table.shape[0],):
        raise ValueError(f"scale must be [S={table.shape[0]}], got {tuple(scale.shape)}")


def steer_apply_ref(
    h: torch.Tensor,
    table: torch.Tensor,
    slot: torch.Tensor,
    scale: torch.Tensor,
    energy_preserving: bool = False,
) -> torch.Tensor:
    """Pure-torch reference; modifies and returns ``h``."""
    s = slot.long()
    y = _steered(h.float(), table, s, scale, energy_preserving)
    h.copy_(torch.where((s != 0)[:, None], y.to(h.dtype), h))
    return h


def _steered(x: torch.Tensor, table: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, energy: bool):
    """The steered rows ``[n, H]`` fp32 for rows ``x [n, H]`` fp32 with slots ``s [n]``."""
    y = x + table.index_select(0, s).float() * scale.index_select(0, s).float()[:, None]
    if energy:
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(_EPS))
    return y


def _is_plus_zero(row: torch.Tensor) -> bool:
    """Every element of ``row`` is +0.0 (bits, not value: -0.0 * -0.0 would be +0.0)."""
    return row.stride(-1) == 1 and not row.view(torch.uint8).any()


def steer_apply_rows(
    h: torch.Tensor,
    table: torch.Tensor,
    slot: torch.Tensor,
    scale: torch.Tensor,
    energy_preserving: bool = False,
) -> torch.Tensor:
    """Torch path (the engine's op off CUDA): the reference's math (one fp32 multiply,
    one add, one rounding to ``h.dtype``), bit for bit equal to it; returns ``h``
    untouched after one scan of ``slot`` when no token is steered. Data-dependent shapes
    (``nonzero``): it runs eagerly or inside the opaque custom op.

    Two ways. Every row steered, or most of them (fp32 ``h``): one in-place pass over
    every row, ``h += d`` with ``d[t] = table[s] * scale[s]``; an unsteered row gets
    ``d[t] = -0.0`` (its scale taken as -0.0, times a +0.0 ``table[0]``: checked, else the
    other way), and ``x + (-0.0) == x`` for every float ``x`` (-0.0, inf and nan
    included), so it is left bit for bit. Otherwise: gather the steered rows, update,
    scatter back (``index_copy_``), which costs more per row than the in-place pass."""
    idx = slot.nonzero().squeeze(1)
    m = idx.numel()
    if m == 0:
        return h
    T = h.shape[0]
    # The mixed in-place pass needs fp32 ``h``: a 16-bit nan round-tripped through fp32
    # comes back with its payload canonicalized, and unsteered rows must keep every bit.
    if not energy_preserving and (
        m == T or (4 * m >= T and h.dtype == torch.float32 and _is_plus_zero(table[0]))
    ):
        s = slot.long()
        a = scale.index_select(0, s).float()
        if m < T:
            a.masked_fill_(s == 0, -0.0)  # with table[0] == +0.0: d = -0.0 on unsteered rows
        d = table.index_select(0, s).float().mul_(a[:, None])
        return h.add_(d)  # in fp32, rounded once to h.dtype (type promotion), as the reference
    s = slot.index_select(0, idx).long()
    y = _steered(h.index_select(0, idx).float(), table, s, scale, energy_preserving)
    h.index_copy_(0, idx, y.to(h.dtype))
    return h


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def steer_apply_kernel(
        Hp, TABLE, SLOT, SCALE, n_cols, stride_h, stride_t, ENERGY: tl.constexpr, BLOCK: tl.constexpr
    ):
        # one program per token; slot-0 tokens return before touching memory
        t = tl.program_id(0)
        s = tl.load(SLOT + t)
        if s != 0:
            # int64 row offsets: t * stride_h passes 2^31 elements once tokens x hidden does
            # (e.g. 420k tokens x 5120), and int32 arithmetic would wrap to a wild address
            t64 = t.to(tl.int64)
            s64 = s.to(tl.int64)
            offs = tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = tl.load(Hp + t64 * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(TABLE + s64 * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(SCALE + s).to(tl.float32)
            y = x + a * v
            if ENERGY:
                nx = tl.sqrt(tl.sum(x * x, axis=0))
                ny = tl.sqrt(tl.sum(y * y, axis=0))
                y = y * (nx / tl.maximum(ny, 1e-12))
            tl.store(Hp + t64 * stride_h + offs, y.to(Hp.dtype.element_ty), mask=mask)

    return steer_apply_kernel


def steer_apply_triton(
    h: torch.Tensor,
    table: torch.Tensor,
    slot: torch.Tensor,
    scale: torch.Tensor,
    energy_preserving: bool = False,
) -> torch.Tensor:
    """Launcher (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)."""
    import triton

    _check(h, table, slot, scale)
    if h.stride(1) != 1 or table.stride(1) != 1:
        raise ValueError("h and table must be contiguous along H")
    T, H = h.shape
    if T == 0:
        return h
    _kernel()[(T,)](
        h,
        table,
        slot,
        scale.float().contiguous(),
        H,
        h.stride(0),
        table.stride(0),
        ENERGY=energy_preserving,
        BLOCK=triton.next_power_of_2(H),
    )
    return h


def steer_apply(
    h: torch.Tensor,
    table: torch.Tensor,
    slot: torch.Tensor,
    scale: torch.Tensor,
    energy_preserving: bool = False,
) -> torch.Tensor:
    """In-place per-token steering add; returns ``h``. Three paths:

    - CUDA (eager, compiled, CUDA graph): the opaque custom op holding the Triton launch;
    - traced by torch.compile off CUDA (vLLM's compile mode on CPU): the reference itself,
      which inductor fuses into the neighbouring pointwise loop (the next layer's
      residual add and RMSNorm), so steering adds no pass over ``h`` and no call;
    - eager off CUDA: ``steer_apply_rows`` (steered rows only)."""
    if use_triton(h):
        torch.ops.roast_vllm.steer_apply(h, table, slot, scale, energy_preserving)
        return h
    if torch.compiler.is_compiling():
        return steer_apply_ref(h, table, slot, scale, energy_preserving)
    return steer_apply_rows(h, table, slot, scale, energy_preserving)


@functools.cache
def register_custom_op() -> None:
    """``torch.ops.roast_vllm.steer_apply``: an opaque, in-place op that torch.compile (and
    so vLLM's compiled graph and CUDA graph) holds as one call: the Triton launch on CUDA
    (slot-0 tokens leave after one read), ``steer_apply_rows`` on CPU tensors (called
    directly; compiled CPU graphs trace the reference instead)."""

    def _op(
        h: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor, energy_preserving: bool
    ) -> None:
        if use_triton(h):
            steer_apply_triton(h, table, slot, scale, energy_preserving)
        else:
            steer_apply_rows(h, table, slot, scale, energy_preserving)

    def _fake(h, table, slot, scale, energy_preserving) -> None:
        return None

    register_op("steer_apply", _op, ("h",), _fake)


try:  # registering needs only torch; the Triton kernel itself is built on first CUDA launch
    register_custom_op()
except Exception:  # pragma: no cover - a torch without torch.library's schema inference
    pass
