"""Fusion Steering's per-layer step: inject ``c_l * (r_l - m_l)``, with ``m_l`` a running
mean of each request's own pre-injection stream that the forward itself keeps.

For one layer and one step, for each Fusion request ``j`` whose tokens this step are the
contiguous rows ``start_j .. start_j + n_j - 1`` of ``h`` (vLLM lays each request's tokens
out contiguously), with running state ``k = state_j`` and slot ``s = slot_j``::

    x_i   = h[start_j + i] + res[start_j + i]                 the stream, before injection
    S_i   = msum[k] + sum_{i' <= i} x_i'                      running sum (fp32)
    m_i   = S_i / (count0_j + i + 1)                          positions counted up to here
    h[start_j + i] <- h[...] + table[s] - coef[s] * m_i       fp32, rounded once
    msum[k] <- S_{n_j - 1}                                    for the next chunk or step

``table[s] = c_l * r_l`` and ``coef[s] = c_l`` (the slot's per-layer coefficient), so the
add is ``c_l * (r_l - m_i)``. Everything outside the listed tokens is untouched, bit for
bit. The mean spans prompt and generated positions alike, across prefill chunks and decode
steps, without re-reading the sequence: ``msum`` and ``count0`` carry it.

Shapes: ``h``, ``res [T, H]`` (model dtype; ``res`` is the residual branch, the stream
being ``h + res``), ``table [S, H]`` fp32, ``coef [S]`` fp32, ``msum [K, H]`` fp32 (one row
per running state, updated in place), ``meta [5, J]`` int64 with rows ``start, n, state,
slot, count0``; entries with ``n = 0`` are idle (a CUDA graph launches a fixed ``J``), and
the busy entries come first (the torch path stops at an idle entry 0).

Layers: Triton kernel (one program per request and ``H`` block, a loop over the request's
tokens in tiles with ``tl.cumsum``) -> launcher ``fusion_mean_triton`` -> custom op
``torch.ops.roast_vllm.fusion_mean`` -> ``fusion_mean``. ``fusion_mean_ref`` is the torch
reference (one request at a time); ``fusion_mean_rows`` the torch path the engine runs off
CUDA, equal to the reference bit for bit (decode requests, one token each, in one
vectorized pass).
"""

from __future__ import annotations

import functools

import torch
from roast_vllm.kernels.dispatch import register_op, use_triton

#: Rows of ``meta``.
START, LEN, STATE, SLOT, COUNT0 = range(5)


def _check(h, res, table, coef, msum, meta) -> None:
    if h.dim() != 2 or res.shape != h.shape:
        raise ValueError(f"h and res must both be [T, H], got {tuple(h.shape)}, {tuple(res.shape)}")
    H = h.shape[1]
    if table.dim() != 2 or table.shape[1] != H or msum.dim() != 2 or msum.shape[1] != H:
        raise ValueError(
            f"table [S, H] and msum [K, H] need H = {H}, got {tuple(table.shape)}, {tuple(msum.shape)}"
        )
    if coef.shape != (table.shape[0],):
        raise ValueError(f"coef must be [S={table.shape[0]}], got {tuple(coef.shape)}")
    if meta.dim() != 2 or meta.shape[0] != 5:
        raise ValueError(f"meta must be [5, J] (start, n, state, slot, count0), got {tuple(meta.shape)}")
    if table.dtype != torch.float32 or coef.dtype != torch.float32 or msum.dtype != torch.float32:
        raise ValueError("table, coef and msum must be float32")


def _segment(h, res, table, coef, msum, start, n, k, s, count0) -> None:
    """One request's ``n`` tokens at ``start``: the math of the module docstring."""
    rows = slice(start, start + n)
    xh = h[rows].float()
    x = xh + res[rows].float()
    S = msum[k] + torch.cumsum(x, 0)
    cnt = torch.arange(count0 + 1, count0 + n + 1, dtype=torch.float32, device=h.device)
    m = S / cnt[:, None]
    h[rows] = (xh + (table[s] - coef[s] * m)).to(h.dtype)
    msum[k] = S[-1]


def fusion_mean_ref(
    h: torch.Tensor,
    res: torch.Tensor,
    table: torch.Tensor,
    coef: torch.Tensor,
    msum: torch.Tensor,
    meta: torch.Tensor,
) -> torch.Tensor:
    """Torch reference, one request at a time; modifies ``h`` and ``msum``, returns ``h``."""
    _check(h, res, table, coef, msum, meta)
    for start, n, k, s, c0 in meta.t().tolist():
        if n > 0:
            _segment(h, res, table, coef, msum, start, n, k, s, c0)
    return h


def fusion_mean_rows(
    h: torch.Tensor,
    res: torch.Tensor,
    table: torch.Tensor,
    coef: torch.Tensor,
    msum: torch.Tensor,
    meta: torch.Tensor,
) -> torch.Tensor:
    """The engine's torch path: the reference's math, bit for bit. Requests with one token
    this step (decodes: the common case) go in one gather / update / scatter; longer ones
    (prefill chunks) one at a time. A step with no Fusion request costs one read of
    ``meta[1, 0]`` (busy entries come first): this runs at every layer of every compiled
    step."""
    n = meta[LEN]
    if not int(n[0]):
        return h
    one = (n == 1).nonzero().squeeze(1)
    if one.numel():
        t = meta[START].index_select(0, one)
        k = meta[STATE].index_select(0, one)
        s = meta[SLOT].index_select(0, one)
        cnt = meta[COUNT0].index_select(0, one).to(torch.float32) + 1.0
        xh = h.index_select(0, t).float()
        S = msum.index_select(0, k) + (xh + res.index_select(0, t).float())
        m = S / cnt[:, None]
        y = xh + (table.index_select(0, s) - coef.index_select(0, s)[:, None] * m)
        h.index_copy_(0, t, y.to(h.dtype))
        msum.index_copy_(0, k, S)  # states are distinct: one row per running request
    for j in (n > 1).nonzero().squeeze(1).tolist():
        start, nj, k, s, c0 = meta[:, j].tolist()
        _segment(h, res, table, coef, msum, start, nj, k, s, c0)
    return h


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fusion_mean_kernel(
        Hp,
        RES,
        TABLE,
        COEF,
        MSUM,
        META,
        n_cols,
        stride_h,
        stride_r,
        stride_t,
        stride_m,
        J,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # one program per (request entry, H block); idle entries (n = 0) leave at once
        j = tl.program_id(0)
        n = tl.load(META + 1 * J + j)
        if n > 0:
            start = tl.load(META + 0 * J + j)
            k = tl.load(META + 2 * J + j)
            s = tl.load(META + 3 * J + j)
            c0 = tl.load(META + 4 * J + j).to(tl.float32)
            cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            cmask = cols < n_cols
            tr = tl.load(TABLE + s * stride_t + cols, mask=cmask, other=0.0)
            c = tl.load(COEF + s)
            carry = tl.load(MSUM + k * stride_m + cols, mask=cmask, other=0.0)
            ti = tl.arange(0, BLOCK_T)
            # int64 row offsets: token x hidden passes 2^31 elements on long steps
            for i0 in range(0, n, BLOCK_T):
                rows = i0 + ti
                rmask = rows < n
                m2 = rmask[:, None] & cmask[None, :]
                t64 = (start + rows).to(tl.int64)
                ph = Hp + t64[:, None] * stride_h + cols[None, :]
                xh = tl.load(ph, mask=m2, other=0.0).to(tl.float32)
                xr = tl.load(RES + t64[:, None] * stride_r + cols[None, :], mask=m2, other=0.0)
                x = xh + xr.to(tl.float32)
                S = carry[None, :] + tl.cumsum(x, axis=0)
                cnt = c0 + (rows + 1).to(tl.float32)
                m = S / cnt[:, None]
                y = xh + (tr[None, :] - c * m)
                tl.store(ph, y.to(Hp.dtype.element_ty), mask=m2)
                # the tile's last valid row carries on (masked rows added 0)
                carry = carry + tl.sum(x, axis=0)
            tl.store(MSUM + k * stride_m + cols, carry, mask=cmask)

    return fusion_mean_kernel


def fusion_mean_triton(
    h: torch.Tensor,
    res: torch.Tensor,
    table: torch.Tensor,
    coef: torch.Tensor,
    msum: torch.Tensor,
    meta: torch.Tensor,
    block_t: int = 16,
) -> torch.Tensor:
    """Launcher (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``). The grid is
    ``(J, cdiv(H, BLOCK_H))`` whatever the step holds: fixed for a CUDA graph."""
    import triton

    _check(h, res, table, coef, msum, meta)
    for name, t in (("h", h), ("res", res), ("table", table), ("msum", msum)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along H")
    meta = meta.contiguous()
    J = meta.shape[1]
    if J == 0 or h.shape[0] == 0:
        return h
    H = h.shape[1]
    block_h = min(triton.next_power_of_2(H), 256)
    _kernel()[(J, triton.cdiv(H, block_h))](
        h,
        res,
        table,
        coef,
        msum,
        meta,
        H,
        h.stride(0),
        res.stride(0),
        table.stride(0),
        msum.stride(0),
        J,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
    )
    return h


def fusion_mean(
    h: torch.Tensor,
    res: torch.Tensor,
    table: torch.Tensor,
    coef: torch.Tensor,
    msum: torch.Tensor,
    meta: torch.Tensor,
    layer: int = 0,
) -> torch.Tensor:
    """In-place Fusion Steering step for one layer: Triton on CUDA, torch elsewhere. Under
    torch.compile always the opaque custom op. Returns ``h``.

    ``msum`` is the whole ``[L, K, H]`` buffer of running sums and ``layer`` picks its
    row: the op mutates a graph input, not a view of one. (Mutating ``buffer[l]`` in a
    compiled graph makes functionalization clone and scatter the buffer around every call,
    and vLLM's compiled CPU graph then read uninitialized memory: nan.)"""
    if msum.dim() != 3:
        raise ValueError(f"msum must be the [L, K, H] buffer (with layer), got {tuple(msum.shape)}")
    if use_triton(h) or torch.compiler.is_compiling():
        torch.ops.roast_vllm.fusion_mean(h, res, table, coef, msum, meta, layer)
        return h
    return fusion_mean_rows(h, res, table, coef, msum[layer], meta)


@functools.cache
def register_custom_op() -> None:
    """``torch.ops.roast_vllm.fusion_mean``: opaque and in place on ``h`` and the whole
    ``msum [L, K, H]`` (its row ``layer``), so a compiled graph (and a CUDA graph) holds one
    call that reads ``meta`` at run time."""

    def _op(
        h: torch.Tensor,
        res: torch.Tensor,
        table: torch.Tensor,
        coef: torch.Tensor,
        msum: torch.Tensor,
        meta: torch.Tensor,
        layer: int,
    ) -> None:
        if use_triton(h):
            fusion_mean_triton(h, res, table, coef, msum[layer], meta)
        else:
            fusion_mean_rows(h, res, table, coef, msum[layer], meta)

    def _fake(h, res, table, coef, msum, meta, layer) -> None:
        return None

    register_op("fusion_mean", _op, ("h", "msum"), _fake)


try:  # registering needs only torch; the Triton kernel itself is built on first launch
    register_custom_op()
except Exception:  # pragma: no cover - a torch without torch.library's schema inference
    pass
