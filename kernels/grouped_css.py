"""Grouped Mean Normalization with Continuous Soft Scaling (ROAST steps 4-6).

Inputs: pair differences ``D [L, N, H]`` (fp32 or bf16; any strides, H contiguous or it
is copied), pair weights ``w [N]``, group ids ``g [N]`` (any order, any integer labels;
uneven groups and singletons allowed). Output: fp32 ``v [L, H]``.

Per layer ``l``, over the ``G`` groups (``grouped=False``: one group holding every pair)::

    mu_g = sum_{i in g} w_i D[l, i] / sum_{i in g} w_i
    v[l] = (1/G) sum_g CSS(mu_g)        reduction="mean": one question, one vote
    v[l] =       sum_g CSS(mu_g)        reduction="sum":  streaming estimation, where each
                                        worker returns the sum over its groups and the
                                        driver divides by the total group count

    CSS: max_norm  mu / max_j |mu_j|
         l2        mu / ||mu||_2
         softmax   H * softmax(|mu|) * sign(mu)
         none      mu

Accumulation is fp32. A group whose weights sum to 0, or whose mean is exactly 0,
contributes a zero vector (never NaN).

Layers, as in Liger-Kernel: Triton kernels (``_kernels``) -> launcher
(``grouped_css_triton``) -> public op (``grouped_css``, dispatch by device). The pure-torch
``grouped_css_ref`` sits beside them; it is what runs on CPU and what tests compare to.

Triton path (no atomics: every output element is written by one program, every sum runs
in an order fixed by the shapes alone, so results are bit-identical run to run):

    plan    pairs sorted by group (stable argsort). A group of <= ``chunk`` (256) pairs is
            "whole" (the usual case: a question has ~16 pairs); a larger one is cut into
            work items of <= ``chunk`` pairs.
    stage 1 grid (programs, L) over the whole groups, ``gpp`` consecutive groups per
            program. Per group: ``mu = sum w_i D[l, i] / sum w`` over the whole H row (H in
            BLOCK_H blocks, pairs in BLOCK_N steps, fp32) into the program's scratch row,
            with the CSS row statistics (max |mu|, sum mu^2, or online softmax); then
            ``CSS(mu)`` added into the program's output row ``Q[l, p]``. D is read
            exactly once, here; the scratch row is the same H * 4 bytes for every group
            (L2-resident), and Q costs one row per ``gpp`` groups.
    groups of several items (rare; three small launches): item sums into ``P``, joined
            into the group's first item row with its statistics, then ``sum CSS(mu_g)``
            over fixed ranges of those groups (splits) into more rows of ``Q``.
    final   grid (H blocks, L): the rows of Q summed in order, divided by G ("mean").

Traffic for bf16 D with k pairs per group (all groups whole): D once, plus ~12 H bytes per
program (:func:`modeled_traffic`): 1.02 x D for D [30, 100000, 576] and 1.04 x D for
D [64, 20000, 5120] at k = 16. Offsets into D, Q, P and the scratch rows are int64 (they
pass 2^31 elements, e.g. D [64, 20000, 5120]); group, item and row indices stay int32.
"""

from __future__ import annotations

import functools

import torch
from roast_vllm.kernels.dispatch import use_triton

MODES = ("max_norm", "l2", "softmax", "none")
REDUCTIONS = ("mean", "sum")
_MODE_ID = {m: i for i, m in enumerate(MODES)}
_EPS = 1e-30

#: Most pairs in one work item of the Triton path. A group larger than this is split into
#: several items (more parallelism for big groups, at one extra fp32 row of P per item:
#: at most 4 / (2 * 256) = 0.8% of a bf16 D); groups up to this size cost no extra row.
_CHUNK = 256
#: Elements per loaded tile (8 KiB of bf16, 16 KiB of fp32 at 4 warps): enough bytes in
#: flight per program for a streaming kernel, few enough registers for high occupancy
#: (71-96 registers, no spills, in stage 1 for sm_90). Not yet tuned on a GPU.
_TILE = 4096
#: At most this many group splits in stage 3, so the final sum reads few rows.
_MAX_SPLITS = 512
#: Stage-1 programs to aim for over all layers (a few waves on a 132-SM GPU) ...
_MIN_PROGRAMS = 8192
#: ... and the most whole groups one program takes (its fixed cost, one Q row and one
#: scratch row, ~12 H bytes, is then <= 3% of the D it reads at 16 bf16 pairs per group).
_MAX_GPP = 32
#: On CPU tensors the Triton path runs only in the interpreter (tests), where every Triton
#: op is a numpy call wrapped in ~50 us of Python: there the launcher takes fewer, larger
#: blocks (H blocks of next_power_of_2(H) up to 1024, 8x larger tiles). Same kernels, same
#: code paths; a test turns this off to run the GPU sizes on CPU as well.
_INTERPRETER_BLOCKS = True


def _check(D: torch.Tensor, w: torch.Tensor, g: torch.Tensor, mode: str, reduction: str = "mean") -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r}; use 'mean' ((1/G) * sum over groups) or 'sum' (sum over "
            "groups, for streaming: divide by the total group count afterwards)"
        )
    if D.dim() != 3:
        raise ValueError(f"D must be [L, N, H], got shape {tuple(D.shape)}")
    n = D.shape[1]
    if n == 0:
        raise ValueError("D has no pairs (N = 0)")
    if tuple(w.shape) != (n,) or tuple(g.shape) != (n,):
        raise ValueError(f"w and g must be [N={n}], got {tuple(w.shape)} and {tuple(g.shape)}")
    if g.dtype.is_floating_point or g.dtype == torch.bool:
        raise ValueError(f"group ids must be integers, got {g.dtype}")


def css(mu: torch.Tensor, mode: str) -> torch.Tensor:
    """Continuous Soft Scaling of mean differences ``mu [..., H]`` (fp32); zero in, zero out."""
    if mode == "none":
        return mu
    if mode == "max_norm":
        return mu / mu.abs().amax(-1, keepdim=True).clamp_min(_EPS)
    if mode == "l2":
        return mu / mu.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    if mode == "softmax":
        out = mu.shape[-1] * torch.softmax(mu.abs(), dim=-1) * torch.sign(mu)
        return out  # sign(0) = 0: a zero mean gives zero
    raise ValueError(f"mode={mode!r}; use one of {MODES}")


def _group_index(g: torch.Tensor, grouped: bool) -> tuple[torch.Tensor, int]:
    if not grouped:
        return torch.zeros(g.numel(), dtype=torch.long, device=g.device), 1
    labels, gid = torch.unique(g, return_inverse=True)
    return gid, labels.numel()


def grouped_css_ref(
    D: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mode: str = "max_norm",
    grouped: bool = True,
    reduction: str = "mean",
    chunk: int = 4096,
) -> torch.Tensor:
    """Pure-torch reference, same signature as :func:`grouped_css`. Works in chunks of
    ``chunk`` pairs, so the largest temporary is ``[L, chunk, H]``, never ``[L, N, H]``.
    (On CUDA its ``index_add_`` uses atomics: close to, not bit-equal with, itself.)"""
    _check(D, w, g, mode, reduction)
    L, N, H = D.shape
    gid, G = _group_index(g, grouped)
    w32 = w.to(torch.float32)
    S = torch.zeros(L, G, H, dtype=torch.float32, device=D.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        S.index_add_(1, gid[s:e], D[:, s:e].to(torch.float32) * w32[s:e, None])
    W = torch.zeros(G, dtype=torch.float32, device=D.device).index_add_(0, gid, w32)
    safe = torch.where(W != 0, W, torch.ones_like(W))
    mu = torch.where((W != 0)[None, :, None], S / safe[None, :, None], torch.zeros_like(S))
    beta = css(mu, mode)
    return beta.mean(1) if reduction == "mean" else beta.sum(1)


# ----------------------------------------------------------------------------- Triton
@functools.cache
def _kernels():
    """Build the kernels on first use: ``triton.jit`` decides at decoration time whether
    to interpret (``TRITON_INTERPRET=1``), and ``import roast_vllm`` must not need Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def whole_groups_kernel(
        D,
        WS,
        PERM,
        W_START,
        W_END,
        MU,
        Q,
        H,
        n_whole,
        gpp,
        n_prog,
        n_rows,
        stride_dl,
        stride_dn,
        MODE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # grid (programs, L): programs on axis 0, whose limit is 2^31 - 1 (axes 1 and 2 stop
        # at 65535). Program p takes the whole groups [p * gpp, (p + 1) * gpp) in order and
        # writes one row Q[l, p] = sum of CSS(mu_g) over them. mu_g goes through the
        # program's own scratch row MU[l, p], read back once its statistics over all of H
        # are known: the same H * 4 bytes for every group, so they stay in L2 and D is the
        # only stream from DRAM.
        p = tl.program_id(0)
        # int64 before any multiply: l * stride_dl and idx * stride_dn pass 2^31 elements
        # (D [64, 20000, 5120]: 63 * 20000 * 5120 = 6.5e9) while each stride fits int32,
        # so Triton would do them in int32 and wrap to a wild address
        l = tl.program_id(1).to(tl.int64)
        d_layer = D + l * stride_dl
        mu_row = MU + (l * n_prog + p) * H
        q_row = Q + (l * n_rows + p) * H
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            tl.store(q_row + offs_h, tl.zeros([BLOCK_H], dtype=tl.float32), mask=offs_h < H)
        g_hi = tl.minimum(p * gpp + gpp, n_whole)
        for grp in range(p * gpp, g_hi):
            start = tl.load(W_START + grp)
            end = tl.load(W_END + grp)
            # the group's weight sum, in pair order (WS = w sorted like the pairs)
            wsum = 0.0
            for s in range(start, end, BLOCK_N):
                offs_n = s + tl.arange(0, BLOCK_N)
                wsum += tl.sum(tl.load(WS + offs_n, mask=offs_n < end, other=0.0), axis=0)
            denom = tl.where(wsum != 0.0, wsum, 1.0)
            a = 0.0
            b = 0.0
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                # 2-D accumulator, reduced over pairs once per H block: one cross-lane
                # reduction per block instead of one per BLOCK_N pairs, in a fixed order
                acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
                for s in range(start, end, BLOCK_N):
                    offs_n = s + tl.arange(0, BLOCK_N)
                    mask_n = offs_n < end
                    idx = tl.load(PERM + offs_n, mask=mask_n, other=0).to(tl.int64)
                    wv = tl.load(WS + offs_n, mask=mask_n, other=0.0)
                    ptrs = d_layer + idx[:, None] * stride_dn + offs_h[None, :]
                    d = tl.load(ptrs, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                    acc += d.to(tl.float32) * wv[:, None]
                mu = tl.where(wsum != 0.0, tl.sum(acc, axis=0) / denom, 0.0)
                tl.store(mu_row + offs_h, mu, mask=mask_h)
                # running CSS statistics of the row, in H order: max |mu| (max_norm), sum
                # mu^2 (l2), or online softmax: a = max |mu|, b = sum exp(|mu| - a). Lanes
                # past H hold mu = 0: harmless (|mu| >= 0 and a starts at 0), masked out of
                # b. (Inlined, also in group_combine_kernel: the interpreter re-executes
                # kernel source against the module's globals, where a jit helper defined
                # in _kernels is not found.)
                if MODE == 0:
                    a = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
                elif MODE == 1:
                    a += tl.sum(mu * mu, axis=0)
                elif MODE == 2:
                    m = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
                    b = b * tl.exp(a - m) + tl.sum(tl.where(mask_h, tl.exp(tl.abs(mu) - m), 0.0), axis=0)
                    a = m
            # every lane's stores (mu, and Q zeroed or summed so far) land before any lane
            # reads them back: a load need not run on the lane that stored the element
            tl.debug_barrier()
            # the divisor; the clamp keeps a zero row at zero
            if MODE == 0:
                div = tl.maximum(a, 1e-30)
            elif MODE == 1:
                div = tl.maximum(tl.sqrt(a), 1e-30)
            else:
                div = 1.0
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                mu = tl.load(mu_row + offs_h, mask=mask_h, other=0.0)
                if MODE == 2:  # H * softmax(|mu|) * sign(mu); sign(0) = 0
                    sgn = tl.where(mu > 0, 1.0, tl.where(mu < 0, -1.0, 0.0))
                    beta = H * (tl.exp(tl.abs(mu) - a) / b) * sgn
                else:
                    beta = mu / div
                q = tl.load(q_row + offs_h, mask=mask_h, other=0.0)
                tl.store(q_row + offs_h, q + beta, mask=mask_h)
            # the next group's mu overwrites MU only after every lane has read this one's
            tl.debug_barrier()

    @triton.jit
    def item_sum_kernel(
        D,
        WS,
        PERM,
        ITEM_START,
        ITEM_END,
        P,
        H,
        n_items,
        stride_dl,
        stride_dn,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # grid (items, L), for groups of more than `chunk` pairs cut into items:
        # P[l, item] = sum over the item's pairs of w_i D[l, i] (fp32, pair order). The
        # pair loop is whole_groups_kernel's, inlined for the interpreter (see there).
        item = tl.program_id(0)
        l = tl.program_id(1).to(tl.int64)  # int64: see whole_groups_kernel
        start = tl.load(ITEM_START + item)
        end = tl.load(ITEM_END + item)
        d_layer = D + l * stride_dl
        p_row = P + (l * n_items + item) * H
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
            for s in range(start, end, BLOCK_N):
                offs_n = s + tl.arange(0, BLOCK_N)
                mask_n = offs_n < end
                idx = tl.load(PERM + offs_n, mask=mask_n, other=0).to(tl.int64)
                wv = tl.load(WS + offs_n, mask=mask_n, other=0.0)
                ptrs = d_layer + idx[:, None] * stride_dn + offs_h[None, :]
                d = tl.load(ptrs, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                acc += d.to(tl.float32) * wv[:, None]
            tl.store(p_row + offs_h, tl.sum(acc, axis=0), mask=mask_h)

    @triton.jit
    def group_combine_kernel(
        P,
        WS,
        STATS,
        M_ITEM0,
        M_NITEMS,
        M_START,
        M_END,
        H,
        n_items,
        n_multi,
        MODE: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        # grid (groups of several items, L). mu of the group goes into its first item's
        # row: each block of that row is read (into acc) before it is overwritten.
        grp = tl.program_id(0)
        l = tl.program_id(1).to(tl.int64)
        item0 = tl.load(M_ITEM0 + grp)
        nit = tl.load(M_NITEMS + grp)
        start = tl.load(M_START + grp)
        end = tl.load(M_END + grp)
        wacc = tl.zeros([BLOCK_W], dtype=tl.float32)
        for s in range(start, end, BLOCK_W):
            offs = s + tl.arange(0, BLOCK_W)
            wacc += tl.load(WS + offs, mask=offs < end, other=0.0)
        wsum = tl.sum(wacc, axis=0)
        denom = tl.where(wsum != 0.0, wsum, 1.0)
        rows = P + (l * n_items + item0) * H
        a = 0.0
        b = 0.0
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            acc = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)
            for i0 in range(0, nit, BLOCK_I):
                offs_i = i0 + tl.arange(0, BLOCK_I)
                m = (offs_i < nit)[:, None] & mask_h[None, :]
                acc += tl.load(rows + offs_i.to(tl.int64)[:, None] * H + offs_h[None, :], mask=m, other=0.0)
            mu = tl.where(wsum != 0.0, tl.sum(acc, axis=0) / denom, 0.0)
            tl.store(rows + offs_h, mu, mask=mask_h)
            if MODE == 0:  # as in whole_groups_kernel
                a = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
            elif MODE == 1:
                a += tl.sum(mu * mu, axis=0)
            elif MODE == 2:
                m = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
                b = b * tl.exp(a - m) + tl.sum(tl.where(mask_h, tl.exp(tl.abs(mu) - m), 0.0), axis=0)
                a = m
        st = STATS + (l * n_multi + grp) * 2  # int64
        tl.store(st, a)
        tl.store(st + 1, b)

    @triton.jit
    def css_sum_kernel(
        P,
        STATS,
        M_ITEM0,
        OUT,
        H,
        n_items,
        n_multi,
        groups_per_split,
        row0,
        n_rows,
        MODE: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # grid (H blocks, splits, L), over the groups of several items:
        # OUT[l, row0 + split, h] = sum over the split's groups of CSS(mu_g)[h]. Each lane
        # sums its groups in order, then one fixed-shape tree over BLOCK_G: the same order
        # on every run.
        offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        sp = tl.program_id(1)
        l = tl.program_id(2).to(tl.int64)
        g_lo = sp * groups_per_split
        g_hi = tl.minimum(g_lo + groups_per_split, n_multi)
        acc = tl.zeros([BLOCK_G, BLOCK_H], dtype=tl.float32)
        for g0 in range(g_lo, g_hi, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            mask_g = offs_g < g_hi
            row = tl.load(M_ITEM0 + offs_g, mask=mask_g, other=0).to(tl.int64)  # mu: first item's row
            m = mask_g[:, None] & mask_h[None, :]
            mu = tl.load(P + (l * n_items + row)[:, None] * H + offs_h[None, :], mask=m, other=0.0)
            st = STATS + (l * n_multi + offs_g) * 2
            if MODE == 0:  # max_norm: mu / max |mu|; the clamp keeps a zero row at zero
                a = tl.maximum(tl.load(st, mask=mask_g, other=1.0), 1e-30)
                beta = mu / a[:, None]
            elif MODE == 1:  # l2: mu / ||mu||
                a = tl.maximum(tl.sqrt(tl.load(st, mask=mask_g, other=1.0)), 1e-30)
                beta = mu / a[:, None]
            elif MODE == 2:
                a = tl.load(st, mask=mask_g, other=0.0)
                b = tl.load(st + 1, mask=mask_g, other=1.0)
                sgn = tl.where(mu > 0, 1.0, tl.where(mu < 0, -1.0, 0.0))
                beta = H * (tl.exp(tl.abs(mu) - a[:, None]) / b[:, None]) * sgn
            else:
                beta = mu
            acc += beta  # masked lanes: mu = 0, so beta = 0 in every mode
        tl.store(OUT + (l * n_rows + row0 + sp) * H + offs_h, tl.sum(acc, axis=0), mask=mask_h)

    @triton.jit
    def rows_sum_kernel(Q, OUT, H, n_rows, div, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
        # grid (H blocks, L): OUT[l, h] = sum over rows, in order, of Q[l, row, h] / div
        offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        l = tl.program_id(1).to(tl.int64)
        acc = tl.zeros([BLOCK_S, BLOCK_H], dtype=tl.float32)
        for s0 in range(0, n_rows, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            m = (offs_s < n_rows)[:, None] & mask_h[None, :]
            acc += tl.load(Q + (l * n_rows + offs_s)[:, None] * H + offs_h[None, :], mask=m, other=0.0)
        tl.store(OUT + l * H + offs_h, tl.sum(acc, axis=0) / div, mask=mask_h)

    return whole_groups_kernel, item_sum_kernel, group_combine_kernel, css_sum_kernel, rows_sum_kernel


def _block_h(H: int, cap: int) -> int:
    """Largest power of two <= ``cap`` whose padding of ``H`` stays within 15% (lanes past
    H are masked: they cost issue slots, not bytes). 576 -> 128, 5120 -> 1024, 769 -> 64."""
    b = min(cap, 1 << max(H - 1, 0).bit_length())
    while b > 16 and -(-H // b) * b > 1.15 * H:
        b //= 2
    return b


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def groups_per_program(n_whole: int, L: int) -> int:
    """Whole groups per stage-1 program on a GPU: as many as keep >= ``_MIN_PROGRAMS``
    programs over all layers (to fill the device), at most ``_MAX_GPP``. Each program adds
    one fp32 row of Q (written, read once) and of its L2-resident scratch, ~12 H bytes,
    spread over its groups' ``gpp * k * H * elem`` bytes of D."""
    return max(1, min(_MAX_GPP, n_whole * L // _MIN_PROGRAMS))


def modeled_traffic(L: int, N: int, H: int, k: int, elem: int, chunk: int = _CHUNK) -> float:
    """Bytes the Triton path moves, over bytes of D, for N pairs in groups of ``k``:
    D once; per stage-1 program its Q row written and read and its scratch row written
    back once (12 H); per work item of a group of > ``chunk`` pairs, its P row written and
    read (8 H). Stage 3's and the final sum's reads of their own outputs are counted."""
    G = -(-N // k)
    if k > chunk:
        extra = 8 * G * -(-k // chunk) * H
    else:
        extra = 12 * -(-G // groups_per_program(G, L)) * H
    return 1 + L * extra / (L * N * H * elem)


def grouped_css_triton(
    D: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mode: str = "max_norm",
    grouped: bool = True,
    reduction: str = "mean",
    chunk: int = _CHUNK,
    gpp: int | None = None,
) -> torch.Tensor:
    """Launcher for the Triton path (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
    ``chunk``: most pairs in a whole group / in one work item of a larger group; ``gpp``:
    whole groups per stage-1 program (default :func:`groups_per_program`). Tests lower both
    to reach every path."""
    _check(D, w, g, mode, reduction)
    if chunk < 1 or (gpp is not None and gpp < 1):
        raise ValueError(f"chunk={chunk}, gpp={gpp}; both must be >= 1")
    L, N, H = D.shape
    dev = D.device
    D = D if D.stride(2) == 1 else D.contiguous()
    gid, G = _group_index(g, grouped)

    # ---- plan (torch, deterministic: stable sort, cumsums of integers)
    order = torch.argsort(gid, stable=True)
    counts = torch.bincount(gid, minlength=G)  # every group has >= 1 pair (unique labels)
    g_start = torch.cumsum(counts, 0) - counts
    g_end = g_start + counts
    is_multi = counts > chunk
    g_nitems = torch.where(is_multi, (counts + chunk - 1) // chunk, 0)
    # one host sync for the sizes that shape the launches
    n_multi, n_items, max_nitems, max_whole = torch.stack(
        [is_multi.sum(), g_nitems.sum(), g_nitems.max(), torch.where(is_multi, 0, counts).max()]
    ).tolist()
    n_whole = G - n_multi

    interp = dev.type == "cpu" and _INTERPRETER_BLOCKS
    if interp:
        tile, block_h, bh3 = 8 * _TILE, min(1024, _pow2(H)), min(1024, _pow2(H))
    else:
        tile, block_h, bh3 = _TILE, _block_h(H, 1024), _block_h(H, 128)
    if gpp is None:
        # the interpreter runs programs one by one: few programs, several groups each
        gpp = -(-n_whole // 4) if interp else groups_per_program(n_whole, L)
    gpp = max(1, gpp)
    n_prog = -(-n_whole // gpp)

    i32 = torch.int32
    ws = w.to(torch.float32)[order].contiguous()
    perm = order.to(i32)
    whole_k, item_sum, group_combine, css_sum, rows_sum = _kernels()
    mode_id = _MODE_ID[mode]

    # groups of several items: P rows per item, combined into the first; stage 3 splits
    if n_multi:
        m_groups = torch.nonzero(is_multi).flatten()
        m_nitems = g_nitems[m_groups]
        m_item0 = torch.cumsum(m_nitems, 0) - m_nitems
        m_start, m_end = g_start[m_groups], g_end[m_groups]
        ig = torch.repeat_interleave(torch.arange(n_multi, device=dev), m_nitems, output_size=n_items)
        item_start = m_start[ig] + (torch.arange(n_items, device=dev) - m_item0[ig]) * chunk
        item_end = torch.minimum(item_start + chunk, m_end[ig])
        block_g = min(_pow2(n_multi), max(1, tile // bh3))
        # >= 8 tiles per program, <= _MAX_SPLITS splits; a multiple of BLOCK_G
        gps = max(8 * block_g, -(-n_multi // _MAX_SPLITS))
        gps = -(-gps // block_g) * block_g
        n_split = -(-n_multi // gps)
    else:
        n_split = 0
    n_rows = n_prog + n_split
    Q = torch.empty(L, n_rows, H, dtype=torch.float32, device=dev)

    if n_whole:
        whole = torch.nonzero(~is_multi).flatten()
        whole_k[(n_prog, L)](
            D,
            ws,
            perm,
            g_start[whole].to(i32),
            g_end[whole].to(i32),
            torch.empty(L, n_prog, H, dtype=torch.float32, device=dev),  # scratch mu rows
            Q,
            H,
            n_whole,
            gpp,
            n_prog,
            n_rows,
            D.stride(0),
            D.stride(1),
            MODE=mode_id,
            BLOCK_N=min(_pow2(max_whole), max(1, tile // block_h)),
            BLOCK_H=block_h,
            num_warps=4,
        )
    if n_multi:
        P = torch.empty(L, n_items, H, dtype=torch.float32, device=dev)
        stats = torch.empty(L, n_multi, 2, dtype=torch.float32, device=dev)
        item_sum[(n_items, L)](
            D,
            ws,
            perm,
            item_start.to(i32),
            item_end.to(i32),
            P,
            H,
            n_items,
            D.stride(0),
            D.stride(1),
            BLOCK_N=min(_pow2(chunk), max(1, tile // block_h)),
            BLOCK_H=block_h,
            num_warps=4,
        )
        group_combine[(n_multi, L)](
            P,
            ws,
            stats,
            m_item0.to(i32),
            m_nitems.to(i32),
            m_start.to(i32),
            m_end.to(i32),
            H,
            n_items,
            n_multi,
            MODE=mode_id,
            BLOCK_I=min(_pow2(max_nitems), max(1, tile // block_h)),
            BLOCK_H=block_h,
            BLOCK_W=1024,
            num_warps=4,
        )
        css_sum[(-(-H // bh3), n_split, L)](
            P,
            stats,
            m_item0.to(i32),
            Q,
            H,
            n_items,
            n_multi,
            gps,
            n_prog,
            n_rows,
            MODE=mode_id,
            BLOCK_G=block_g,
            BLOCK_H=bh3,
            num_warps=4,
        )

    out = torch.empty(L, H, dtype=torch.float32, device=dev)
    rows_sum[(-(-H // bh3), L)](
        Q,
        out,
        H,
        n_rows,
        float(G) if reduction == "mean" else 1.0,
        BLOCK_S=min(_pow2(n_rows), max(1, tile // bh3)),
        BLOCK_H=bh3,
        num_warps=4,
    )
    return out


def grouped_css(
    D: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mode: str = "max_norm",
    grouped: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """ROAST vector ``[L, H]`` (fp32) from pair differences: Triton on CUDA, torch elsewhere.
    ``reduction``: "mean" over groups (default) or "sum" (streaming partial sums)."""
    if use_triton(D):
        return grouped_css_triton(D, w, g, mode, grouped, reduction)
    return grouped_css_ref(D, w, g, mode, grouped, reduction)
