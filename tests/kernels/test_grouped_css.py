"""grouped_css: Triton kernel (interpreted) vs torch reference, and ROAST's invariants."""

from __future__ import annotations

import pytest
import torch
from roast_vllm.kernels.grouped_css import MODES, css, grouped_css, grouped_css_ref, grouped_css_triton

L = 2
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-4, rtol=1e-3)}


def make(N, H, groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(L, N, H, generator=g).to(dtype)
    w = 0.5 + torch.rand(N, generator=g)
    if groups == "singletons":
        gid = torch.arange(N)
    elif groups == "one":
        gid = torch.full((N,), 7)
    else:  # uneven sizes, labels not contiguous, pairs not sorted by group
        sizes = torch.randint(1, 6, (N,), generator=g)
        gid = torch.repeat_interleave(torch.arange(N) * 3 + 11, sizes)[:N]
        gid = gid[torch.randperm(N, generator=g)]
    return D, w, gid


def _cases():
    # The interpreter runs one Triton program at a time in Python, so the largest shapes
    # (H=5120 with N=300: thousands of programs) get one grouping each, not the full matrix.
    for H in (64, 576, 769, 5120):
        for N in (1, 7, 300):
            for groups in ("singletons", "uneven", "one"):
                if H == 5120 and N == 300 and groups != "uneven":
                    continue
                for mode in MODES:
                    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                        if H == 5120 and N == 300 and dtype != torch.float32:
                            continue
                        yield pytest.param(H, N, groups, mode, dtype, id=f"H{H}-N{N}-{groups}-{mode}-{dname}")


@pytest.mark.parametrize("H, N, groups, mode, dtype", list(_cases()))
def test_kernel_matches_reference(H, N, groups, mode, dtype):
    D, w, g = make(N, H, groups, dtype)
    for grouped in (True, False):
        ref = grouped_css_ref(D, w, g, mode, grouped)
        out = grouped_css_triton(D, w, g, mode, grouped)
        assert out.dtype == torch.float32 and out.shape == (L, H)
        torch.testing.assert_close(out, ref, **TOL[dtype])


def test_reference_matches_plain_math():
    D, w, g = make(7, 64, "uneven", torch.float32)
    want = []
    for l in range(L):
        betas = []
        for lab in torch.unique(g):
            m = g == lab
            mu = (w[m, None] * D[l, m]).sum(0) / w[m].sum()
            betas.append(mu / mu.abs().max())
        want.append(torch.stack(betas).mean(0))
    torch.testing.assert_close(grouped_css_ref(D, w, g), torch.stack(want))
    mu = (w[:, None] * D).sum(1) / w.sum()
    torch.testing.assert_close(
        grouped_css_ref(D, w, g, "l2", grouped=False), mu / mu.norm(dim=-1, keepdim=True)
    )


@pytest.mark.parametrize("impl", [grouped_css_ref, grouped_css_triton], ids=["ref", "triton"])
def test_permutation_invariance(impl):
    D, w, g = make(300, 576, "uneven", torch.float32, seed=3)
    p = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(impl(D[:, p], w[p], g[p]), impl(D, w, g), **TOL[torch.float32])


@pytest.mark.parametrize("impl", [grouped_css_ref, grouped_css_triton], ids=["ref", "triton"])
def test_one_question_one_vote(impl):
    """Duplicating every pair of one group leaves the grouped vector unchanged and moves
    the ungrouped one."""
    D, w, g = make(40, 64, "uneven", torch.float32, seed=5)
    lab = g[0]
    dup = (g == lab).nonzero().squeeze(1)
    D2 = torch.cat([D, D[:, dup]], 1)
    w2, g2 = torch.cat([w, w[dup]]), torch.cat([g, g[dup]])
    torch.testing.assert_close(impl(D2, w2, g2), impl(D, w, g), **TOL[torch.float32])
    assert not torch.allclose(impl(D2, w2, g2, grouped=False), impl(D, w, g, grouped=False), atol=1e-4)


def test_zero_weight_group_and_zero_mean_give_zero_not_nan():
    D = torch.zeros(1, 3, 8)
    D[0, 2] = 1.0
    w = torch.tensor([0.0, 1.0, 1.0])
    g = torch.tensor([0, 1, 2])
    for mode in MODES:
        for impl in (grouped_css_ref, grouped_css_triton):
            out = impl(D, w, g, mode)
            assert torch.isfinite(out).all()
            # groups 0 (zero weight) and 1 (zero mean) add nothing; group 2 votes 1/3
            torch.testing.assert_close(out, css(D[:, 2:3], mode).mean(1) / 3)


def test_css_modes():
    mu = torch.tensor([[1.0, -3.0, 0.5]])
    torch.testing.assert_close(css(mu, "max_norm"), mu / 3)
    torch.testing.assert_close(css(mu, "l2"), mu / mu.norm())
    sm = css(mu, "softmax")
    torch.testing.assert_close(sm.abs().sum(), torch.tensor(3.0))
    assert torch.equal(torch.sign(sm), torch.sign(mu))
    assert torch.equal(css(mu, "none"), mu)


def test_dispatch_takes_each_path_and_validates(count_launches):
    """CPU tensors run the reference; inside ``triton_on_cpu`` the Triton launcher runs
    (interpreted): the two agree. Bad input is refused on both paths."""
    from roast_vllm.kernels import grouped_css as mod
    from roast_vllm.kernels.dispatch import triton_on_cpu

    calls = count_launches(mod, "grouped_css_triton")
    D, w, g = make(7, 64, "uneven", torch.float32)
    by_ref = grouped_css(D, w, g)
    assert calls == []
    assert torch.equal(by_ref, grouped_css_ref(D, w, g))
    with triton_on_cpu():
        by_triton = grouped_css(D, w, g)
        with pytest.raises(ValueError, match="mode"):
            grouped_css(D, w, g, mode="topk")
    assert calls
    torch.testing.assert_close(by_triton, by_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        grouped_css(D, w, g, mode="topk")
    with pytest.raises(ValueError, match=r"\[L, N, H\]"):
        grouped_css(D[0], w, g)
    with pytest.raises(ValueError, match="integers"):
        grouped_css(D, w, g.float())
