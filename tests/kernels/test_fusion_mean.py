"""fusion_mean: the reference against the definition (a mean recomputed from scratch at
every position), chunk independence, the CPU rows path bit for bit, the Triton kernel
(interpreted) and the custom op inside inductor."""

from __future__ import annotations

import importlib

import pytest
import torch
from roast_vllm.kernels.dispatch import triton_on_cpu
from roast_vllm.kernels.fusion_mean import (
    fusion_mean,
    fusion_mean_ref,
    fusion_mean_rows,
    fusion_mean_triton,
)

mod = importlib.import_module("roast_vllm.kernels.fusion_mean")

S, K = 4, 6  # slots (0 unused), running states (0 unused)
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def make(H, dtype, segs, T=None, seed=0):
    """``segs``: ``(start, n, state, slot, count0)`` per request; the rest of the ``T``
    rows belong to no Fusion request. Returns h, res, table, coef, msum, meta."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(s + n for s, n, *_ in segs) + 2
    h = (2 * torch.randn(T, H, generator=g)).to(dtype)
    res = (3 * torch.randn(T, H, generator=g)).to(dtype)
    table = torch.randn(S, H, generator=g)
    table[0] = 0
    coef = torch.tensor([0.0, 0.7, -1.3, 0.25])
    msum = 5 * torch.randn(K, H, generator=g)
    meta = torch.zeros(5, 8, dtype=torch.long)  # J = 8 entries, the rest idle
    for j, seg in enumerate(segs):
        meta[:, j] = torch.tensor(seg)
    return h, res, table, coef, msum, meta


def by_definition(h, res, table, coef, msum, meta):
    """Position by position, the mean recomputed from the whole prefix (no running sum)."""
    h, msum = h.clone(), msum.clone()
    for start, n, k, s, c0 in meta.t().tolist():
        if n == 0:
            continue
        xs = [(h[start + i].double() + res[start + i].double()) for i in range(n)]
        out = []
        for i in range(n):
            m = (msum[k].double() + torch.stack(xs[: i + 1]).sum(0)) / (c0 + i + 1)
            out.append(h[start + i].double() + table[s].double() - coef[s].double() * m)
        for i, y in enumerate(out):
            h[start + i] = y.to(h.dtype)
        msum[k] = (msum[k].double() + torch.stack(xs).sum(0)).float()
    return h, msum


def bits(x):
    return x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)


SEGS = {
    "decodes": [(0, 1, 1, 1, 7), (1, 1, 2, 2, 0), (3, 1, 3, 1, 40)],
    "prefill": [(2, 37, 4, 2, 0)],
    "mixed": [(0, 1, 1, 1, 7), (1, 21, 3, 3, 0), (22, 1, 2, 2, 11), (25, 40, 5, 1, 19)],
}


@pytest.mark.parametrize("case", list(SEGS))
def test_reference_is_the_definition(case):
    h, res, table, coef, msum, meta = make(64, torch.float32, SEGS[case])
    want_h, want_m = by_definition(h, res, table, coef, msum, meta)
    m = msum.clone()
    got = fusion_mean_ref(h.clone(), res, table, coef, m, meta)
    torch.testing.assert_close(got, want_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, want_m, atol=1e-4, rtol=1e-5)


def test_chunks_and_steps_equal_one_pass():
    """A request's 30 tokens in one call, or as chunks 11 + 9 + 1 + 1 + ... with the
    running state carried: the same outputs and final sum."""
    H = 96
    h, res, table, coef, msum, _ = make(H, torch.float32, [(0, 30, 1, 1, 0)], T=30)
    msum[1] = 0
    one = torch.zeros(5, 1, dtype=torch.long)
    one[:, 0] = torch.tensor([0, 30, 1, 1, 0])
    m1 = msum.clone()
    whole = fusion_mean_ref(h.clone(), res, table, coef, m1, one)
    parts, m2, done = h.clone(), msum.clone(), 0
    for n in (11, 9, 1, 1, 4, 1, 3):
        meta = torch.tensor([[0], [n], [1], [1], [done]])
        sl = slice(done, done + n)
        out = parts[sl].clone()
        fusion_mean_rows(out, res[sl].clone(), table, coef, m2, meta)
        parts[sl] = out
        done += n
    assert done == 30
    torch.testing.assert_close(parts, whole, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(m2, m1, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(SEGS))
@pytest.mark.parametrize("H", [576, 769], ids=lambda h: f"H{h}")
def test_rows_path_is_the_reference_bit_for_bit(H, case, dtype):
    h, res, table, coef, msum, meta = make(H, dtype, SEGS[case])
    m_ref, m_rows = msum.clone(), msum.clone()
    ref = fusion_mean_ref(h.clone(), res, table, coef, m_ref, meta)
    out = fusion_mean_rows(h.clone(), res, table, coef, m_rows, meta)
    assert torch.equal(bits(out), bits(ref)) and torch.equal(m_rows, m_ref)
    covered = torch.zeros(h.shape[0], dtype=torch.bool)
    for start, n, *_ in SEGS[case]:
        covered[start : start + n] = True
    assert torch.equal(bits(out[~covered]), bits(h[~covered])), "other rows must be untouched"
    assert (out[covered] != h[covered]).any(-1).all(), "every Fusion row must change"
    used = sorted({seg[2] for seg in SEGS[case]})
    idle = [k for k in range(K) if k not in used]
    assert torch.equal(m_rows[idle], msum[idle]), "other running states must be untouched"


def test_rows_path_idle_step_only_scans_lengths():
    from conftest import aten_ops

    h, res, table, coef, msum, meta = make(64, torch.float32, [(0, 3, 1, 1, 0)])
    meta[1] = 0
    x, m = h.clone(), msum.clone()
    with aten_ops() as seen:
        fusion_mean_rows(x, res, table, coef, m, meta)
    assert torch.equal(x, h) and torch.equal(m, msum)
    assert set(seen.ops) <= {"select", "_local_scalar_dense"}, seen.ops


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(SEGS))
@pytest.mark.parametrize("H", [576, 769, 5120], ids=lambda h: f"H{h}")
def test_kernel_matches_reference(H, case, dtype):
    h, res, table, coef, msum, meta = make(H, dtype, SEGS[case])
    m_ref, m_tri = msum.clone(), msum.clone()
    ref = fusion_mean_ref(h.clone(), res, table, coef, m_ref, meta)
    out = fusion_mean_triton(h.clone(), res, table, coef, m_tri, meta)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(m_tri, m_ref, atol=1e-4, rtol=1e-5)
    covered = torch.zeros(h.shape[0], dtype=torch.bool)
    for start, n, *_ in SEGS[case]:
        covered[start : start + n] = True
    assert torch.equal(bits(out[~covered]), bits(h[~covered])), "other rows must be untouched"


def test_kernel_tiles_of_other_sizes():
    """Segments shorter than, equal to and longer than a tile, several tiles each."""
    h, res, table, coef, msum, meta = make(130, torch.float32, SEGS["mixed"])
    ref_m = msum.clone()
    ref = fusion_mean_ref(h.clone(), res, table, coef, ref_m, meta)
    for bt in (1, 4, 64):
        m = msum.clone()
        out = fusion_mean_triton(h.clone(), res, table, coef, m, meta, block_t=bt)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(m, ref_m, atol=1e-4, rtol=1e-5)


def _compiled_step(x, res, table, coef, msum, meta):
    y = x * 2.0  # an intermediate of the graph, as a layer's output is
    fusion_mean(y, res, table, coef, msum, meta, 1)  # msum [L, K, H], layer 1
    return y


@pytest.mark.parametrize("triton", [False, True], ids=["cpu-path", "triton-interpreted"])
def test_custom_op_inside_inductor(count_launches, triton):
    """The op as the engine runs it in compile mode: opaque in the graph, mutating both the
    graph's buffer and the running sums; on CUDA the Triton launch (here interpreted)."""
    from conftest import compile_and_run

    launches = count_launches(mod, "fusion_mean_triton")
    h, res, table, coef, msum, meta = make(576, torch.float32, SEGS["mixed"])
    want_m = msum.clone()
    want = fusion_mean_ref(h.clone() * 2.0, res, table, coef, want_m, meta)
    m = torch.stack([msum, msum.clone()])  # [L = 2, K, H]; the op updates layer 1
    ctx = triton_on_cpu() if triton else torch.no_grad()
    with ctx:
        _, out, src, _ = compile_and_run(_compiled_step, h.clone(), res, table, coef, m, meta)
    assert "roast_vllm.fusion_mean" in src
    # the running sums are updated where they live: no clone of the buffer, no copy back
    assert "clone" not in src and "copy_" not in src, src
    assert len(launches) == int(triton)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    torch.testing.assert_close(m[1], want_m, atol=1e-4, rtol=1e-5)
    assert torch.equal(m[0], msum), "another layer's sums must be untouched"


def test_validation():
    h, res, table, coef, msum, meta = make(64, torch.float32, SEGS["decodes"])
    with pytest.raises(ValueError, match=r"\[5, J\]"):
        fusion_mean_ref(h, res, table, coef, msum, meta[:4])
    with pytest.raises(ValueError, match="float32"):
        fusion_mean_ref(h, res, table.double(), coef, msum, meta)
    with pytest.raises(ValueError, match="need H"):
        fusion_mean_triton(h, res, table[:, :32], coef, msum, meta)


_COMPILE_SM90 = """
fn = importlib.import_module("roast_vllm.kernels.fusion_mean")._kernel()
for d in ("*bf16", "*fp16", "*fp32"):
    sig = dict(Hp=d, RES=d, TABLE="*fp32", COEF="*fp32", MSUM="*fp32", META="*i64", n_cols="i32",
               stride_h="i32", stride_r="i32", stride_t="i32", stride_m="i32", J="i32")
    print(d, usage(fn, sig, dict(BLOCK_T=16, BLOCK_H=256)))
"""


def test_kernel_compiles_for_sm90_without_spills():
    """The interpreter does not compile: the kernel compiled for an H100/H200 (sm_90) with
    Triton's own ptxas at the launcher's block sizes, for each activation dtype, with no
    local memory (spills)."""
    from conftest import assert_sm90_without_spills

    print("\n".join(assert_sm90_without_spills(_COMPILE_SM90, 3)))
