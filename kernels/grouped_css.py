"""Grouped Mean Normalization with Continuous Soft Scaling (ROAST steps 4-6).

Inputs: pair differences ``D [L, N, H]`` (fp32 or bf16), pair weights ``w [N]``, group
ids ``g [N]`` (any order, any integer labels; uneven groups and singletons allowed).

Per layer ``l``::

    grouped:    mu_g = sum_{i in g} w_i D[l, i] / sum_{i in g} w_i
                v[l] = (1/G) sum_g CSS(mu_g)          # one question, one vote
    ungrouped:  mu   = sum_i w_i D[l, i] / sum_i w_i
                v[l] = CSS(mu)

    CSS: max_norm  mu / max_j |mu_j|
         l2        mu / ||mu||_2
         softmax   H * softmax(|mu|) * sign(mu)
         none      mu

Accumulation is fp32 and the result is fp32 ``[L, H]``. A group whose weights sum to 0,
or whose mean is exactly 0, contributes a zero vector (never NaN).

Layers, as in Liger-Kernel: Triton kernels (``_kernels``) -> launcher
(``grouped_css_triton``) -> public op (``grouped_css``, dispatch by device). The pure-torch
``grouped_css_ref`` sits beside them; it is what runs on CPU and what tests compare to.
"""

from __future__ import annotations

import functools

import torch
from roast_vllm.kernels.dispatch import use_triton

MODES = ("max_norm", "l2", "softmax", "none")
_MODE_ID = {m: i for i, m in enumerate(MODES)}
_EPS = 1e-30


def _check(D: torch.Tensor, w: torch.Tensor, g: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
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
    chunk: int = 4096,
) -> torch.Tensor:
    """Pure-torch reference, same signature as :func:`grouped_css`. Works in chunks of
    ``chunk`` pairs, so the largest temporary is ``[L, chunk, H]``, never ``[L, N, H]``."""
    _check(D, w, g, mode)
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
    return css(mu, mode).mean(1)


# ----------------------------------------------------------------------------- Triton
@functools.cache
def _kernels():
    """Build the kernels on first use: ``triton.jit`` decides at decoration time whether
    to interpret (``TRITON_INTERPRET=1``), and ``import roast_vllm`` must not need Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def group_sum_kernel(
        D,
        W,
        PERM,
        CHUNK_GROUP,
        CHUNK_START,
        CHUNK_END,
        S,
        WSUM,
        N,
        H,
        G,
        stride_dl,
        stride_dn,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # grid: (L, num_chunks, cdiv(H, BLOCK_H)). A chunk is <= BLOCK_N pairs of one group
        # (pairs sorted by group through PERM), so D is read exactly once.
        l = tl.program_id(0)
        c = tl.program_id(1)
        hb = tl.program_id(2)
        grp = tl.load(CHUNK_GROUP + c)
        start = tl.load(CHUNK_START + c)
        end = tl.load(CHUNK_END + c)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        idx = tl.load(PERM + offs_n, mask=mask_n, other=0)
        wv = tl.load(W + idx, mask=mask_n, other=0.0).to(tl.float32)
        ptrs = D + l * stride_dl + idx[:, None] * stride_dn + offs_h[None, :]
        d = tl.load(ptrs, mask=mask_n[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        part = tl.sum(d * wv[:, None], axis=0)
        tl.atomic_add(S + (l * G + grp) * H + offs_h, part, mask=mask_h)
        if (l == 0) & (hb == 0):
            tl.atomic_add(WSUM + grp, tl.sum(wv, axis=0))

    @triton.jit
    def css_mean_kernel(S, WSUM, OUT, H, G, inv_G, MODE: tl.constexpr, BLOCK_H: tl.constexpr):
        # grid: (L, G). Whole-H row per program: CSS needs max / norm / softmax over H.
        l = tl.program_id(0)
        grp = tl.program_id(1)
        offs = tl.arange(0, BLOCK_H)
        mask = offs < H
        s = tl.load(S + (l * G + grp) * H + offs, mask=mask, other=0.0)
        wsum = tl.load(WSUM + grp)
        denom = tl.where(wsum != 0.0, wsum, 1.0)
        mu = tl.where(wsum != 0.0, s / denom, 0.0)
        if MODE == 0:  # max_norm
            m = tl.max(tl.abs(mu), axis=0)
            beta = mu / tl.maximum(m, 1e-30)
        elif MODE == 1:  # l2
            nrm = tl.sqrt(tl.sum(mu * mu, axis=0))
            beta = mu / tl.maximum(nrm, 1e-30)
        elif MODE == 2:  # softmax
            a = tl.where(mask, tl.abs(mu), float("-inf"))
            e = tl.exp(a - tl.max(a, axis=0))
            e = tl.where(mask, e, 0.0)
            sgn = tl.where(mu > 0, 1.0, tl.where(mu < 0, -1.0, 0.0))
            beta = H * (e / tl.sum(e, axis=0)) * sgn
        else:
            beta = mu
        tl.atomic_add(OUT + l * H + offs, beta * inv_G, mask=mask)

    return group_sum_kernel, css_mean_kernel


def grouped_css_triton(
    D: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mode: str = "max_norm",
    grouped: bool = True,
    block_n: int = 32,
) -> torch.Tensor:
    """Launcher for the Triton path (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""
    import triton

    _check(D, w, g, mode)
    L, N, H = D.shape
    D = D if D.stride(2) == 1 else D.contiguous()
    gid, G = _group_index(g, grouped)
    order = torch.argsort(gid, stable=True)
    counts = torch.bincount(gid, minlength=G)
    # chunk table: each group's pair range cut into pieces of <= block_n pairs
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + block_n - 1) // block_n
    chunk_group = torch.repeat_interleave(torch.arange(G, device=D.device), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    within = torch.arange(int(n_chunks.sum()), device=D.device) - first[chunk_group]
    chunk_start = starts[chunk_group] + within * block_n
    chunk_end = torch.minimum(chunk_start + block_n, starts[chunk_group] + counts[chunk_group])
    S = torch.zeros(L, G, H, dtype=torch.float32, device=D.device)
    wsum = torch.zeros(G, dtype=torch.float32, device=D.device)
    out = torch.zeros(L, H, dtype=torch.float32, device=D.device)
    group_sum, css_mean = _kernels()
    block_h = min(triton.next_power_of_2(H), 1024)
    i32 = torch.int32
    group_sum[(L, chunk_group.numel(), triton.cdiv(H, block_h))](
        D,
        w.to(torch.float32).contiguous(),
        order.to(i32),
        chunk_group.to(i32),
        chunk_start.to(i32),
        chunk_end.to(i32),
        S,
        wsum,
        N,
        H,
        G,
        D.stride(0),
        D.stride(1),
        BLOCK_H=block_h,
        BLOCK_N=block_n,
    )
    css_mean[(L, G)](S, wsum, out, H, G, 1.0 / G, MODE=_MODE_ID[mode], BLOCK_H=triton.next_power_of_2(H))
    return out


def grouped_css(
    D: torch.Tensor, w: torch.Tensor, g: torch.Tensor, mode: str = "max_norm", grouped: bool = True
) -> torch.Tensor:
    """ROAST vector ``[L, H]`` (fp32) from pair differences: Triton on CUDA, torch elsewhere."""
    if use_triton(D):
        return grouped_css_triton(D, w, g, mode, grouped)
    return grouped_css_ref(D, w, g, mode, grouped)
