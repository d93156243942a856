"""steer_apply: Triton kernel (interpreted) vs torch reference; slot 0 is bit-identical."""

from __future__ import annotations

import importlib

import pytest
import torch
from roast_vllm.kernels.dispatch import triton_on_cpu
from roast_vllm.kernels.steer_apply import (
    steer_apply,
    steer_apply_ref,
    steer_apply_rows,
    steer_apply_triton,
)

# the module itself: the package attribute roast_vllm.kernels.steer_apply is the op
mod = importlib.import_module("roast_vllm.kernels.steer_apply")

S = 5
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.bfloat16: dict(atol=0, rtol=8e-3),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}


def make(T, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(T, H, generator=g)).to(dtype)
    table = torch.randn(S, H, generator=g)
    table[0] = 0
    slot = torch.randint(0, S, (T,), generator=g)
    slot[0] = S - 1  # at least one steered row, also when T == 1
    if T > 1:
        slot[-1] = 0  # and at least one unsteered row
    scale = torch.tensor([0.0, 1.5, -2.0, 0.25, 4.0])
    return h, table, slot, scale


def bits(x):
    return x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)


@pytest.mark.parametrize("energy", [False, True], ids=["add", "energy"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("T", [1, 63])
@pytest.mark.parametrize("H", [64, 576, 769, 5120], ids=lambda h: f"H{h}")
def test_kernel_matches_reference(H, T, dtype, energy):
    h, table, slot, scale = make(T, H, dtype)
    orig = h.clone()
    ref = steer_apply_ref(h.clone(), table, slot, scale, energy)
    out = h.clone()
    steer_apply_triton(out, table, slot, scale, energy)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    idle, busy = slot == 0, slot != 0
    assert busy.any()
    for res in (out, ref):
        assert torch.equal(bits(res[idle]), bits(orig[idle])), "slot-0 rows must be bit-identical"
        assert (res[busy] != orig[busy]).any(dim=-1).all(), "every steered row must change"
    if energy:
        n0, n1 = orig.float().norm(dim=-1), ref.float().norm(dim=-1)
        torch.testing.assert_close(n1, n0, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0)


@pytest.mark.parametrize("energy", [False, True], ids=["add", "energy"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("T", [1, 63])
@pytest.mark.parametrize("H", [576, 769, 5120], ids=lambda h: f"H{h}")
def test_rows_path_matches_reference(H, T, dtype, energy):
    """The CPU path computes the reference's math: bit for bit, whichever way it takes
    (T = 1: every row steered, one in-place pass; T = 63: most rows steered, in place for
    fp32 and gathered for 16-bit dtypes)."""
    h, table, slot, scale = make(T, H, dtype)
    ref = steer_apply_ref(h.clone(), table, slot, scale, energy)
    out = steer_apply_rows(h.clone(), table, slot, scale, energy)
    assert torch.equal(bits(out), bits(ref))
    idle = slot == 0
    assert torch.equal(bits(out[idle]), bits(h[idle])), "slot-0 rows must be bit-identical"
    assert (out[~idle] != h[~idle]).any(dim=-1).all(), "every steered row must change"


def test_rows_path_skips_unsteered_step():
    """No steered token: one scan of ``slot``, nothing read from ``h`` or the table, nothing
    written; one steered token: only that row is gathered and written back."""
    from conftest import aten_ops

    h, table, slot, scale = make(63, 576, torch.bfloat16)
    x, zeros = h.clone(), torch.zeros_like(slot)
    with aten_ops() as seen:
        out = steer_apply_rows(x, table, zeros, scale)
    assert torch.equal(bits(out), bits(h))
    assert set(seen.ops) <= {"nonzero", "squeeze"}, seen.ops
    one = torch.zeros_like(slot)
    one[5] = 2
    x = h.clone()
    with aten_ops() as seen:
        steer_apply_rows(x, table, one, scale)
    assert "index_copy_" in seen.ops and "copy_" not in seen.ops and "where" not in seen.ops
    changed = (bits(x) != bits(h)).any(-1).nonzero().flatten().tolist()
    assert changed == [5]


def _specials(h: torch.Tensor) -> torch.Tensor:
    """``h`` with -0.0, +-inf and nan in its last row (an unsteered one in ``make``)."""
    h[-1, :4] = torch.tensor([-0.0, float("inf"), -float("inf"), float("nan")], dtype=h.dtype)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_path_ways(dtype):
    """Every row steered: one in-place pass, no row gather or scatter. Most rows steered
    (fp32): the same pass, unsteered rows get ``+ (-0.0)``, which keeps -0.0, inf and nan
    bit for bit. A nonzero ``table[0]`` (that trick would not hold), a 16-bit ``h`` or few
    steered rows: the gather/scatter way. Each way bit for bit equal to the reference."""
    from conftest import aten_ops

    h, table, slot, scale = make(63, 576, dtype)
    _specials(h)
    every = torch.randint(1, S, (63,), generator=torch.Generator().manual_seed(1))
    few = torch.zeros_like(slot)
    few[[3, 40]] = 2
    dirty = table.clone()
    dirty[0, 7] = -0.0  # bits, not value: -0.0 * -0.0 would be +0.0
    cases = [
        ("every", every, table, "in place"),
        ("most", slot, table, "in place" if dtype == torch.float32 else "gather"),
        ("most, table[0] not +0.0", slot, dirty, "gather"),
        ("few", few, table, "gather"),
    ]
    for name, sl, tab, way in cases:
        x = h.clone()
        with aten_ops() as seen:
            steer_apply_rows(x, tab, sl, scale)
        gathered = "index_copy_" in seen.ops
        assert gathered == (way == "gather"), (name, seen.ops)
        assert torch.equal(bits(x), bits(steer_apply_ref(h.clone(), tab, sl, scale))), name
        idle = sl == 0
        assert torch.equal(bits(x[idle]), bits(h[idle])), name


def test_reference_math():
    h = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    out = steer_apply_ref(h.clone(), table, torch.tensor([1, 0, 1]), torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0], [3.0, 4.0], [2.0, 1.0]]))
    e = steer_apply_ref(h.clone(), table, torch.tensor([0, 1, 0]), torch.tensor([0.0, 2.0]), True)
    torch.testing.assert_close(e[1].norm(), torch.tensor(5.0))


def test_scale_zero_is_identity_but_not_skipped():
    h, table, slot, scale = make(63, 576, torch.bfloat16)
    out = steer_apply_ref(h.clone(), table, slot, torch.zeros(S))
    assert torch.equal(bits(out), bits(h))


@pytest.fixture
def launches(count_launches):
    return count_launches(mod, "steer_apply_triton")


@pytest.fixture
def row_calls(count_launches):
    return count_launches(mod, "steer_apply_rows")


def test_dispatch_takes_each_path(launches, row_calls):
    """``steer_apply`` on CPU tensors runs the rows path; inside ``triton_on_cpu`` it runs
    the custom op and the Triton kernel: both agree with the reference."""
    h, table, slot, scale = make(63, 769, torch.bfloat16)
    by_ref = steer_apply(h.clone(), table, slot, scale)
    assert launches == [] and row_calls == [h.shape]
    torch.testing.assert_close(
        by_ref.float(), steer_apply_ref(h.clone(), table, slot, scale).float(), atol=1e-6, rtol=1e-6
    )
    with triton_on_cpu():
        by_triton = steer_apply(h.clone(), table, slot, scale)
    assert launches == [h.shape] and len(row_calls) == 1
    torch.testing.assert_close(by_triton.float(), by_ref.float(), **TOL[torch.bfloat16])
    assert not torch.equal(by_triton, h)


def _compiled_step(x, table, slot, scale):
    # the op steers an intermediate of the graph, as in the model (a layer's output); x * 2
    # is exact in every dtype, so eager and inductor code agree on it bit for bit
    y = x * 2.0
    steer_apply(y, table, slot, scale)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_custom_op_triton_path_inside_inductor(launches, dtype):
    """The engine's CUDA path: the in-place custom op holding the Triton launch, inside an
    inductor-compiled graph; here on CPU tensors under Triton's interpreter."""
    from conftest import compile_and_run

    h, table, slot, scale = make(63, 576, dtype)
    want = steer_apply_ref(h.clone() * 2.0, table, slot, scale)
    with triton_on_cpu():
        _, out, src, _ = compile_and_run(_compiled_step, h.clone(), table, slot, scale)
    assert "roast_vllm.steer_apply" in src, "the custom op must be in the compiled graph"
    assert len(launches) == 1, "the Triton launcher must run (not the reference)"
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    idle = slot == 0
    plain = h * 2.0
    assert torch.equal(bits(out[idle]), bits(plain[idle])), "slot-0 rows must be untouched"
    assert not torch.equal(out[~idle], plain[~idle])


def _layer_then_norm(x, r, table, slot, scale, steer=True):
    # as in the model: a layer's output (x * 2, exact in every dtype) is steered, then the
    # next layer adds the residual and normalizes (vLLM's fused_add_rms_norm, traced)
    y = x * 2.0
    if steer:
        y = steer_apply(y, table, slot, scale)
    z = y + r
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_cpu_compile_traces_the_reference_fused(launches, row_calls):
    """The engine's CPU path in compile mode: the reference traced into the graph, which
    inductor fuses into the loop that already reads the layer's output (no op call, no
    kernel of its own, so no extra pass over ``h``, steered or not); unsteered rows are
    bit-identical to the graph without steering, steered rows match the reference run
    eagerly, and with no steered token the whole output equals the unsteered graph's."""
    from conftest import compile_and_run

    h, table, slot, scale = make(63, 576, torch.float32)
    r = torch.randn_like(h)
    _, plain, _, k_plain = compile_and_run(
        lambda *a: _layer_then_norm(*a, steer=False), h, r, table, slot, scale
    )
    f, out, src, k_steer = compile_and_run(_layer_then_norm, h, r, table, slot, scale)
    assert "roast_vllm.steer_apply" not in src and launches == [] and row_calls == []
    assert k_steer == k_plain, f"steering added {k_steer - k_plain} kernel(s) (passes)"
    y = steer_apply_ref(h * 2.0, table, slot, scale) + r
    want = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    idle = slot == 0
    assert torch.equal(bits(out[idle]), bits(plain[idle])), "slot-0 rows must be untouched"
    assert not torch.allclose(out[~idle], plain[~idle], atol=1e-3), "steered rows must change"
    out0 = f(h, r, table, torch.zeros_like(slot), scale)  # the same compiled graph
    assert torch.equal(bits(out0), bits(plain))


def test_validation():
    h, table, slot, scale = make(4, 64, torch.float32)
    with pytest.raises(ValueError, match="share H"):
        steer_apply_triton(h, table[:, :32], slot, scale)
    with pytest.raises(ValueError, match="slot must be"):
        steer_apply_triton(h, table, slot[:2], scale)


_PAST_INT32 = """
import torch
from roast_vllm.kernels.steer_apply import steer_apply_ref, steer_apply_triton


# three rows 1.5 * 2^30 elements apart (a strided view of one 6 GiB bf16 buffer whose pages
# are mostly never touched): row 2 starts past 2^31 elements while the row stride itself
# still fits int32, so int32 row offsets wrap (and Triton does not widen them for us)
dev = "cuda" if torch.cuda.is_available() else "cpu"
H, S = 64, 3 * 2**29
h = torch.empty(2 * S + H, dtype=torch.bfloat16, device=dev).as_strided((3, H), (S, 1))
for i in range(3):
    h[i].fill_(float(i))
g = torch.Generator().manual_seed(0)
table = torch.randn(2, H, generator=g).to(dev)
slot = torch.tensor([1, 1, 1], device=dev)
scale = torch.tensor([0.0, 1.0], device=dev)
want = steer_apply_ref(h.clone(), table, slot, scale)
steer_apply_triton(h, table, slot, scale)
# within one bf16 ulp of the reference (the interpreter truncates where CUDA rounds)
err = (h.float() - want.float()).abs() - want.float().abs() * 2**-7
print("excess", float(err.max()))
"""


def test_row_offsets_past_int32():
    """Tokens x hidden >= 2^31 (e.g. 420k tokens at H = 5120): int32 offsets wrapped to a
    wild address (a segfault in the interpreter, an illegal access on CUDA)."""
    from conftest import run_isolated

    out = run_isolated(_PAST_INT32)
    assert float(out.split("excess")[1]) <= 1e-6, out
