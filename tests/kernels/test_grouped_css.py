"""grouped_css: Triton kernel (interpreted) vs torch reference, and ROAST's invariants.

The GPU-only tests (bit-identity on a large shape, offsets past 2^31 elements) are skipped
on CPU; the helpers they call run here on small shapes, so their code is exercised too."""

from __future__ import annotations

import importlib

import pytest
import torch
from roast_vllm.kernels.grouped_css import MODES, css, grouped_css, grouped_css_ref, grouped_css_triton

# the module itself: the package attribute roast_vllm.kernels.grouped_css is the op
mod = importlib.import_module("roast_vllm.kernels.grouped_css")

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
    # The interpreter runs one Triton program at a time in Python (~7 ms each; a program is
    # one work item of one layer), so N=300 singletons (600 programs a launch) are left to
    # N=1 and N=7, and H=5120 with N=300 (five H blocks) gets one grouping and dtype, and
    # the two modes whose statistics run across blocks in sums (l2, softmax).
    for H in (64, 576, 769, 5120):
        for N in (1, 7, 300):
            for groups in ("singletons", "uneven", "one"):
                if N == 300 and (groups == "singletons" or (H == 5120 and groups != "uneven")):
                    continue
                for mode in MODES:
                    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                        if (
                            H == 5120
                            and N == 300
                            and (dtype != torch.float32 or mode not in ("l2", "softmax"))
                        ):
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
    for impl in (grouped_css, grouped_css_ref, grouped_css_triton):
        with pytest.raises(ValueError, match="reduction"):
            impl(D, w, g, reduction="max")


@pytest.mark.parametrize("impl", [grouped_css_ref, grouped_css_triton], ids=["ref", "triton"])
@pytest.mark.parametrize("mode", ["max_norm", "softmax"])
def test_reduction_sum_is_G_times_mean(impl, mode):
    """``reduction="sum"`` is the streaming form: workers return sums, the driver divides."""
    D, w, g = make(40, 64, "uneven", torch.float32, seed=2)
    G = torch.unique(g).numel()
    torch.testing.assert_close(
        impl(D, w, g, mode, reduction="sum"), G * impl(D, w, g, mode), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        impl(D, w, g, mode, grouped=False, reduction="sum"), impl(D, w, g, mode, grouped=False)
    )
    # two workers' sums over disjoint question sets, divided by the total count, give the mean
    first = torch.isin(g, torch.unique(g)[: G // 2])
    parts = [impl(D[:, m], w[m], g[m], mode, reduction="sum") for m in (first, ~first)]
    torch.testing.assert_close((parts[0] + parts[1]) / G, impl(D, w, g, mode), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_split_groups_and_split_sums(monkeypatch, mode):
    """The paths the default matrix reaches rarely: groups cut into several work items
    (``chunk`` small: item sums joined per group) and their CSS sum cut into several
    splits (``_TILE`` and ``_MAX_SPLITS`` small), beside whole groups."""
    D, w, g = make(60, 64, "uneven", torch.float32, seed=4)
    g = torch.where(torch.arange(60) < 12, 5, g)  # one big group, 12 pairs, among small ones
    ref = grouped_css_ref(D, w, g, mode)
    for chunk in (1, 5):
        torch.testing.assert_close(grouped_css_triton(D, w, g, mode, chunk=chunk), ref, **TOL[torch.float32])
    # chunk 1: the 16 groups of >= 2 pairs take the several-items path
    assert int((torch.unique(g, return_counts=True)[1] > 1).sum()) == 16
    monkeypatch.setattr(mod, "_INTERPRETER_BLOCKS", False)  # the GPU's block sizes
    monkeypatch.setattr(mod, "_TILE", 128)  # H = 64: BLOCK_G = 2, 8 tiles = 16 groups, 1 split
    torch.testing.assert_close(grouped_css_triton(D, w, g, mode, chunk=1), ref, **TOL[torch.float32])
    monkeypatch.setattr(mod, "_TILE", 64)  # BLOCK_G = 1: 8 groups a split, 2 splits
    torch.testing.assert_close(grouped_css_triton(D, w, g, mode, chunk=1), ref, **TOL[torch.float32])
    monkeypatch.setattr(mod, "_MAX_SPLITS", 1)  # at most 1 split: all 16 groups in it
    torch.testing.assert_close(grouped_css_triton(D, w, g, mode, chunk=1), ref, **TOL[torch.float32])
    torch.testing.assert_close(
        grouped_css_triton(D, w, g, mode, grouped=False, chunk=16),
        grouped_css_ref(D, w, g, mode, grouped=False),
        **TOL[torch.float32],
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blocks", ["interpreter", "gpu"])
def test_groups_per_program(monkeypatch, mode, blocks):
    """Stage 1 takes ``gpp`` whole groups per program through one scratch row and sums
    their CSS into one output row: every ``gpp`` (one group each, a ragged last program,
    all groups in one program) gives the reference, with big groups beside (chunk 4)."""
    monkeypatch.setattr(mod, "_INTERPRETER_BLOCKS", blocks == "interpreter")
    D, w, g = make(40, 96, "uneven", torch.float32, seed=11)
    g = torch.where(torch.arange(40) < 9, 3, g)  # one group of 9 pairs: several items at chunk 4
    G = torch.unique(g).numel()
    ref = grouped_css_ref(D, w, g, mode)
    for gpp, chunk in ((1, 256), (3, 4), (G, 256)):  # ungrouped below: one group, any gpp
        out = grouped_css_triton(D, w, g, mode, chunk=chunk, gpp=gpp)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(
        grouped_css_triton(D, w, g, mode, grouped=False, chunk=4),
        grouped_css_ref(D, w, g, mode, grouped=False),
        **TOL[torch.float32],
    )
    # the scratch row is reused: a zero-weight group after a non-zero one still gives zero
    w0 = torch.where(g == g[-1], 0.0, w)
    torch.testing.assert_close(
        grouped_css_triton(D, w0, g, mode, gpp=G), grouped_css_ref(D, w0, g, mode), **TOL[torch.float32]
    )


def test_modeled_traffic_near_one_read_of_D():
    """The launcher's plan on the benchmark's shapes (16 bf16 pairs per question) moves at
    most 1.125 x the bytes of D (a plain view + sum in torch reads D once and writes its
    fp32 [L, G, H] result: 1.125 x), and programs enough to fill a GPU."""
    for L, N, H in ((30, 100_000, 576), (64, 20_000, 5120)):
        G = N // 16
        gpp = mod.groups_per_program(G, L)
        assert L * -(-G // gpp) >= mod._MIN_PROGRAMS
        assert mod.modeled_traffic(L, N, H, 16, 2) <= 1.05
    assert mod.groups_per_program(3, 2) == 1
    with pytest.raises(ValueError, match="gpp"):
        grouped_css_triton(*make(4, 8, "one", torch.float32), gpp=0)


def test_block_h_choice():
    assert [mod._block_h(H, 1024) for H in (64, 576, 769, 5120, 27648)] == [64, 128, 64, 1024, 1024]
    assert [mod._block_h(H, 128) for H in (1, 17, 576, 5120)] == [1, 16, 128, 128]


@pytest.mark.parametrize(
    "H, dtype", [(576, torch.bfloat16), (769, torch.float32)], ids=["576-bf16", "769-fp32"]
)
def test_gpu_block_sizes_on_cpu(monkeypatch, H, dtype):
    """The interpreter normally gets larger blocks (see ``_INTERPRETER_BLOCKS``); here the
    GPU's: H in 128- or 64-wide blocks with a masked tail, row statistics across blocks."""
    monkeypatch.setattr(mod, "_INTERPRETER_BLOCKS", False)
    D, w, g = make(10, H, "uneven", dtype, seed=8)
    for mode in MODES:
        for grouped in (True, False):
            torch.testing.assert_close(
                grouped_css_triton(D, w, g, mode, grouped, chunk=4),
                grouped_css_ref(D, w, g, mode, grouped),
                **TOL[dtype],
            )


def _assert_bit_identical(D, w, g, chunk=mod._CHUNK):
    """Two launches per mode, reduction and grouping agree bit for bit (no atomics, fixed
    summation order), and agree with the reference within rounding."""
    tol = TOL[D.dtype] if D.dtype in TOL else TOL[torch.float32]
    for mode in MODES:
        for grouped in (True, False):
            for reduction in ("mean", "sum"):
                a = grouped_css_triton(D, w, g, mode, grouped, reduction, chunk=chunk)
                b = grouped_css_triton(D, w, g, mode, grouped, reduction, chunk=chunk)
                assert torch.equal(a, b), (mode, grouped, reduction)
                if reduction == "mean":
                    torch.testing.assert_close(a, grouped_css_ref(D, w, g, mode, grouped), **tol)


def _big_groups(N, seed, device):
    """Uneven groups: 1..40 pairs each, plus groups of 300 and 1000 pairs (several work
    items each), labels shuffled over the pairs."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.cat([torch.tensor([300, 1000]), torch.randint(1, 41, (N,), generator=gen)])
    gid = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)[:N]
    return gid[torch.randperm(N, generator=gen)].to(device)


def test_bit_identical_runs():
    """On CPU the interpreter runs programs one by one, so this is weak (see the GPU test);
    it does check every mode, both groupings and reductions, split groups and sums."""
    D, w, g = make(24, 64, "uneven", torch.float32, seed=6)
    _assert_bit_identical(D, w, g, chunk=3)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: bit-identity under real concurrency"
)
def test_gpu_bit_identical_large():
    gen = torch.Generator(device="cuda").manual_seed(0)
    L, N, H = 8, 50_000, 1536
    D = torch.randn(L, N, H, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = 0.5 + torch.rand(N, generator=gen, device="cuda")
    _assert_bit_identical(D, w, _big_groups(N, 0, "cuda"))


def _assert_big_layers(D, w, g, layers, chunk=mod._CHUNK):
    """Triton over all of D against the reference on a few layers (layers are independent),
    in every mode."""
    Dl = D[list(layers)]
    for mode in MODES:
        out = grouped_css_triton(D, w, g, mode, chunk=chunk)
        assert torch.isfinite(out).all()
        want = grouped_css_ref(Dl, w, g, mode)
        torch.testing.assert_close(out[list(layers)], want, **TOL[D.dtype])


def test_big_helpers_on_cpu():
    """What the GPU offset test runs, on a small shape."""
    D, w, _ = make(32, 64, "uneven", torch.bfloat16, seed=7)
    _assert_big_layers(D, w, torch.arange(32) // 16, (0, 1))
    _assert_big_layers(D, w, torch.arange(32) // 2, (1,), chunk=1)
    _assert_bit_identical(D, w, _big_groups(32, 1, "cpu"), chunk=8)


_GPU_BIG = "needs a CUDA GPU: offsets past 2^31 elements (D 5.2 GB, P up to 10.5 GB)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=_GPU_BIG)
@pytest.mark.parametrize("groups, chunk", [("16", 256), ("singletons", 256), ("pairs", 1)])
def test_gpu_offsets_past_int32(groups, chunk):
    """D [64, 20000, 2048] bf16: layer 63 starts at 63 * 20000 * 2048 = 2.6e9 elements
    (layers >= 53 past 2^31). Groups of two cut into one-pair items put the item rows
    P [64, 20000, 2048] fp32 past 2^31 too (written by the item sums, read by the join and
    the CSS sum). int32 offsets crashed with an illegal memory access."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs >= 24 GiB of GPU memory")
    L, N, H = 64, 20_000, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    D = torch.randn(L, N, H, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = 0.5 + torch.rand(N, generator=gen, device="cuda")
    n = torch.arange(N, device="cuda")
    g = {"16": n // 16, "singletons": n, "pairs": n // 2}[groups]
    _assert_big_layers(D, w, g, (0, 55, 63), chunk=chunk)


_PAST_INT32 = """
import torch
from roast_vllm.kernels.grouped_css import MODES, grouped_css_ref, grouped_css_triton

# D as a strided view of one 6 GiB bf16 buffer whose pages are mostly never touched: rows
# 3 * 2^29 elements apart, so the last starts at 3 * 2^30 > 2^31 while the stride itself
# fits int32 (Triton then multiplies in int32, which wraps to a wild address)
dev = "cuda" if torch.cuda.is_available() else "cpu"
H, S = 64, 3 * 2**29
buf = torch.empty(2 * S + 8 * H, dtype=torch.bfloat16, device=dev)
gen = torch.Generator().manual_seed(0)
for name, size, stride, g in (
    ("layer stride", (3, 4, H), (S, H, 1), [5, 5, 9, 5]),  # l * stride_dl past 2^31
    ("pair stride", (2, 3, H), (4 * H, S, 1), [1, 2, 1]),  # idx * stride_dn past 2^31
):
    D = buf.as_strided(size, stride)
    for l in range(size[0]):
        D[l].copy_(torch.randn(size[1:], generator=gen))
    w = torch.rand(size[1], generator=gen).to(dev) + 0.5
    g = torch.tensor(g, device=dev)
    for mode in MODES:
        torch.testing.assert_close(
            grouped_css_triton(D, w, g, mode), grouped_css_ref(D.contiguous(), w, g, mode), atol=1e-4, rtol=1e-3
        )
    print(name, "ok")
"""


def test_d_offsets_past_int32():
    """The launcher's offsets into D are 64-bit, checked on CPU without 6 GiB of data: the
    interpreter does int32 arithmetic in int32 too, so a wrapped offset is a wild read (a
    segfault, hence a separate process). Offsets into P, Q and the scratch rows pass 2^31
    only when those buffers really hold that much (8 GiB of fp32, far too slow to
    interpret): the GPU test covers them."""
    from conftest import run_isolated

    out = run_isolated(_PAST_INT32)
    assert "layer stride ok" in out and "pair stride ok" in out, out


_COMPILE_SM90 = """
mod = importlib.import_module("roast_vllm.kernels.grouped_css")
whole, item_sum, combine, css_sum, rows_sum = mod._kernels()
P, I, F = "*fp32", "*i32", "fp32"
cases = []
for d, bh, bn in (("*bf16", mod._block_h(576, 1024), 32), ("*bf16", mod._block_h(5120, 1024), 4)):
    for mode in (0, 1, 2):
        cases.append((whole, dict(D=d, WS=P, PERM=I, W_START=I, W_END=I, MU=P, Q=P, H="i32", n_whole="i32",
                      gpp="i32", n_prog="i32", n_rows="i32", stride_dl="i64", stride_dn="i32"),
                      dict(MODE=mode, BLOCK_N=bn, BLOCK_H=bh)))
    cases.append((item_sum, dict(D=d, WS=P, PERM=I, ITEM_START=I, ITEM_END=I, P=P, H="i32", n_items="i32",
                  stride_dl="i64", stride_dn="i32"), dict(BLOCK_N=bn, BLOCK_H=bh)))
cases.append((combine, dict(P=P, WS=P, STATS=P, M_ITEM0=I, M_NITEMS=I, M_START=I, M_END=I, H="i32",
              n_items="i32", n_multi="i32"), dict(MODE=2, BLOCK_I=4, BLOCK_H=1024, BLOCK_W=1024)))
cases.append((css_sum, dict(P=P, STATS=P, M_ITEM0=I, OUT=P, H="i32", n_items="i32", n_multi="i32",
              groups_per_split="i32", row0="i32", n_rows="i32"), dict(MODE=2, BLOCK_G=32, BLOCK_H=128)))
cases.append((rows_sum, dict(Q=P, OUT=P, H="i32", n_rows="i32", div=F), dict(BLOCK_S=32, BLOCK_H=128)))
for fn, sig, consts in cases:
    print(fn.__name__, consts, usage(fn, sig, consts))
"""


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter does not compile: here every kernel is compiled for an H100/H200
    (sm_90) with Triton's own ptxas, at the GPU block sizes of the benchmark shapes, and
    must use no local memory (register spills would turn the stream into local traffic)."""
    from conftest import assert_sm90_without_spills

    assert_sm90_without_spills(_COMPILE_SM90, 11)
