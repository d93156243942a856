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

    plan    pairs sorted by group (stable argsort); each group cut into work items of
            <= ``chunk`` (256) pairs. A group of one item (the usual case: a question has
            ~16 pairs) is "whole".
    stage 1 grid (items, L). Item sum ``S = sum w_i D[l, i]`` over the whole H row, H in
            BLOCK_H blocks, pairs in BLOCK_N steps (fp32). Whole item: stores
            ``mu = S / sum w`` to ``P[l, item]`` plus the CSS row statistics
            (max |mu|, sum mu^2, or softmax max / sum exp, over all H) to ``STATS[l, g]``.
            Otherwise stores ``S``. D is read exactly once, here.
    stage 2 grid (groups of > 1 item, L); skipped when there are none. Sums the group's
            item rows in item order, stores ``mu`` into the group's first item row, and
            the row statistics.
    stage 3 grid (H blocks, splits, L). ``sum_g CSS(mu_g)`` over a fixed range of groups
            (a split), from ``P`` and ``STATS``, as a [BLOCK_G, BLOCK_H] tile sum.
    stage 4 grid (H blocks, L); only with > 1 split. Sums the splits in order.

Traffic for bf16 D with k pairs per group (all groups whole): D once, plus P written
(stage 1) and read (stage 3), 2 * 4 / (2 k) of D: 1.25 x D at k = 16, 1.125 x D for fp32
D. Offsets into D, P, STATS and the split buffer are int64 (they pass 2^31 elements, e.g.
D [64, 20000, 5120] or P for singletons); item and group indices stay int32.
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
#: At most this many group splits in stage 3, so stage 4 sums few rows.
_MAX_SPLITS = 512
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
    def item_sum_kernel(
        D,
        WS,
        PERM,
        ITEM_START,
        ITEM_END,
        ITEM_GROUP,
        ITEM_WHOLE,
        P,
        STATS,
        H,
        n_items,
        G,
        stride_dl,
        stride_dn,
        MODE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # grid (items, L): items on axis 0, whose limit is 2^31 - 1 (axes 1 and 2 stop at
        # 65535, and singletons make N items); neighbouring programs read neighbouring pairs.
        item = tl.program_id(0)
        # int64 before any multiply: l * stride_dl and idx * stride_dn pass 2^31 elements
        # (D [64, 20000, 5120]: 63 * 20000 * 5120 = 6.5e9) while each stride fits int32,
        # so Triton would do them in int32 and wrap to a wild address
        l = tl.program_id(1).to(tl.int64)
        start = tl.load(ITEM_START + item)
        end = tl.load(ITEM_END + item)
        whole = tl.load(ITEM_WHOLE + item) != 0
        # the item's weight sum, in pair order (WS = w sorted like the pairs)
        wsum = 0.0
        for s in range(start, end, BLOCK_N):
            offs_n = s + tl.arange(0, BLOCK_N)
            wsum += tl.sum(tl.load(WS + offs_n, mask=offs_n < end, other=0.0), axis=0)
        denom = tl.where(wsum != 0.0, wsum, 1.0)
        d_layer = D + l * stride_dl
        p_row = P + (l * n_items + item) * H  # int64: L * items * H passes 2^31 for singletons
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
            s_row = tl.sum(acc, axis=0)
            mu = tl.where(wsum != 0.0, s_row / denom, 0.0)
            tl.store(p_row + offs_h, tl.where(whole, mu, s_row), mask=mask_h)
            # running CSS statistics of the row, in H order: max |mu| (max_norm), sum mu^2
            # (l2), or online softmax: a = max |mu|, b = sum exp(|mu| - a). Lanes past H
            # hold mu = 0: harmless (|mu| >= 0 and a starts at 0), masked out of b.
            # (Inlined, also in group_combine_kernel: the interpreter re-executes kernel
            # source against the module's globals, where a jit helper defined in
            # _kernels is not found.)
            if MODE == 0:
                a = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
            elif MODE == 1:
                a += tl.sum(mu * mu, axis=0)
            elif MODE == 2:
                m = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
                b = b * tl.exp(a - m) + tl.sum(tl.where(mask_h, tl.exp(tl.abs(mu) - m), 0.0), axis=0)
                a = m
        if whole:
            # raw statistics; css_sum_kernel turns them into the divisor
            st = STATS + (l * G + tl.load(ITEM_GROUP + item)) * 2  # int64: L * G * 2 may pass 2^31
            tl.store(st, a)
            tl.store(st + 1, b)

    @triton.jit
    def group_combine_kernel(
        P,
        WS,
        STATS,
        MULTI,
        GROUP_ITEM0,
        GROUP_NITEMS,
        GROUP_START,
        GROUP_END,
        H,
        n_items,
        G,
        MODE: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        # grid (groups of several items, L). mu of the group goes into its first item's
        # row: each block of that row is read (into acc) before it is overwritten.
        grp = tl.load(MULTI + tl.program_id(0))
        l = tl.program_id(1).to(tl.int64)
        item0 = tl.load(GROUP_ITEM0 + grp)
        nit = tl.load(GROUP_NITEMS + grp)
        start = tl.load(GROUP_START + grp)
        end = tl.load(GROUP_END + grp)
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
            if MODE == 0:  # as in item_sum_kernel
                a = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
            elif MODE == 1:
                a += tl.sum(mu * mu, axis=0)
            elif MODE == 2:
                m = tl.maximum(a, tl.max(tl.abs(mu), axis=0))
                b = b * tl.exp(a - m) + tl.sum(tl.where(mask_h, tl.exp(tl.abs(mu) - m), 0.0), axis=0)
                a = m
        st = STATS + (l * G + grp) * 2
        tl.store(st, a)
        tl.store(st + 1, b)

    @triton.jit
    def css_sum_kernel(
        P,
        STATS,
        GROUP_ROW,
        OUT,
        H,
        n_items,
        G,
        groups_per_split,
        n_split,
        div,
        MODE: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # grid (H blocks, splits, L): OUT[l, split, h] = sum over the split's groups of
        # CSS(mu_g)[h] / div. Each lane sums its groups in order, then one fixed-shape
        # tree over BLOCK_G: the same order on every run.
        offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        sp = tl.program_id(1)
        l = tl.program_id(2).to(tl.int64)
        g_lo = sp * groups_per_split
        g_hi = tl.minimum(g_lo + groups_per_split, G)
        acc = tl.zeros([BLOCK_G, BLOCK_H], dtype=tl.float32)
        for g0 in range(g_lo, g_hi, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            mask_g = offs_g < g_hi
            row = tl.load(GROUP_ROW + offs_g, mask=mask_g, other=0).to(tl.int64)
            m = mask_g[:, None] & mask_h[None, :]
            mu = tl.load(P + (l * n_items + row)[:, None] * H + offs_h[None, :], mask=m, other=0.0)
            st = STATS + (l * G + offs_g) * 2
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
        tot = tl.sum(acc, axis=0) / div
        tl.store(OUT + (l * n_split + sp) * H + offs_h, tot, mask=mask_h)

    @triton.jit
    def split_sum_kernel(Q, OUT, H, n_split, div, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
        # grid (H blocks, L): OUT[l, h] = sum over splits, in order, of Q[l, split, h] / div
        offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        l = tl.program_id(1).to(tl.int64)
        acc = tl.zeros([BLOCK_S, BLOCK_H], dtype=tl.float32)
        for s0 in range(0, n_split, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            m = (offs_s < n_split)[:, None] & mask_h[None, :]
            acc += tl.load(Q + (l * n_split + offs_s)[:, None] * H + offs_h[None, :], mask=m, other=0.0)
        tl.store(OUT + l * H + offs_h, tl.sum(acc, axis=0) / div, mask=mask_h)

    return item_sum_kernel, group_combine_kernel, css_sum_kernel, split_sum_kernel


def _block_h(H: int, cap: int) -> int:
    """Largest power of two <= ``cap`` whose padding of ``H`` stays within 15% (lanes past
    H are masked: they cost issue slots, not bytes). 576 -> 128, 5120 -> 1024, 769 -> 64."""
    b = min(cap, 1 << max(H - 1, 0).bit_length())
    while b > 16 and -(-H // b) * b > 1.15 * H:
        b //= 2
    return b


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def grouped_css_triton(
    D: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mode: str = "max_norm",
    grouped: bool = True,
    reduction: str = "mean",
    chunk: int = _CHUNK,
) -> torch.Tensor:
    """Launcher for the Triton path (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
    ``chunk``: most pairs per work item (tests lower it to reach the multi-item path)."""
    _check(D, w, g, mode, reduction)
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; must be >= 1")
    L, N, H = D.shape
    dev = D.device
    D = D if D.stride(2) == 1 else D.contiguous()
    gid, G = _group_index(g, grouped)

    # ---- plan (torch, deterministic: stable sort, cumsums of integers)
    order = torch.argsort(gid, stable=True)
    counts = torch.bincount(gid, minlength=G)  # every group has >= 1 pair (unique labels)
    g_start = torch.cumsum(counts, 0) - counts
    g_nitems = (counts + chunk - 1) // chunk
    g_item0 = torch.cumsum(g_nitems, 0) - g_nitems
    # one host sync for the sizes that shape the launches
    n_items, max_len, max_nitems = torch.stack([g_nitems.sum(), counts.max(), g_nitems.max()]).tolist()
    max_len = min(max_len, chunk)
    item_group = torch.repeat_interleave(torch.arange(G, device=dev), g_nitems, output_size=n_items)
    item_start = g_start[item_group] + (torch.arange(n_items, device=dev) - g_item0[item_group]) * chunk
    item_end = torch.minimum(item_start + chunk, (g_start + counts)[item_group])
    item_whole = g_nitems[item_group] == 1
    multi = torch.nonzero(g_nitems > 1).flatten() if max_nitems > 1 else None

    if dev.type == "cpu" and _INTERPRETER_BLOCKS:
        tile, block_h, bh3 = 8 * _TILE, min(1024, _pow2(H)), min(1024, _pow2(H))
    else:
        tile, block_h, bh3 = _TILE, _block_h(H, 1024), _block_h(H, 128)

    i32 = torch.int32
    ws = w.to(torch.float32)[order].contiguous()
    P = torch.empty(L, n_items, H, dtype=torch.float32, device=dev)
    stats = torch.empty(L, G, 2, dtype=torch.float32, device=dev)
    item_sum, group_combine, css_sum, split_sum = _kernels()
    mode_id = _MODE_ID[mode]

    item_sum[(n_items, L)](
        D,
        ws,
        order.to(i32),
        item_start.to(i32),
        item_end.to(i32),
        item_group.to(i32),
        item_whole.to(i32),
        P,
        stats,
        H,
        n_items,
        G,
        D.stride(0),
        D.stride(1),
        MODE=mode_id,
        BLOCK_N=min(_pow2(max_len), max(1, tile // block_h)),
        BLOCK_H=block_h,
        num_warps=4,
    )
    if multi is not None:
        group_combine[(multi.numel(), L)](
            P,
            ws,
            stats,
            multi.to(i32),
            g_item0.to(i32),
            g_nitems.to(i32),
            g_start.to(i32),
            (g_start + counts).to(i32),
            H,
            n_items,
            G,
            MODE=mode_id,
            BLOCK_I=min(_pow2(max_nitems), max(1, tile // block_h)),
            BLOCK_H=block_h,
            BLOCK_W=1024,
            num_warps=4,
        )

    div = float(G) if reduction == "mean" else 1.0
    out = torch.empty(L, H, dtype=torch.float32, device=dev)
    block_g = min(_pow2(G), max(1, tile // bh3))
    # >= 8 tiles per program, <= _MAX_SPLITS splits; a multiple of BLOCK_G
    gps = max(8 * block_g, -(-G // _MAX_SPLITS))
    gps = -(-gps // block_g) * block_g
    n_split = -(-G // gps)
    target = out if n_split == 1 else torch.empty(L, n_split, H, dtype=torch.float32, device=dev)
    css_sum[(-(-H // bh3), n_split, L)](
        P,
        stats,
        g_item0.to(i32),  # a group's mu row is its first item's row
        target,
        H,
        n_items,
        G,
        gps,
        n_split,
        div if n_split == 1 else 1.0,
        MODE=mode_id,
        BLOCK_G=block_g,
        BLOCK_H=bh3,
        num_warps=4,
    )
    if n_split > 1:
        split_sum[(-(-H // bh3), L)](
            target,
            out,
            H,
            n_split,
            div,
            BLOCK_S=min(_pow2(n_split), max(1, tile // bh3)),
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
