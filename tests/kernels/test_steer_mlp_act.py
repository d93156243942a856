"""steer_mlp_act: Triton kernel (interpreted) vs torch reference vs fp64; slot 0 is bit-identical.

``up`` is always passed as the strided view ``gate_up[:, I:]`` the model hands over, and its
unsteered rows hold inf/nan, which must not leak into ``act``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from roast_vllm.kernels.dispatch import triton_on_cpu
from roast_vllm.kernels.steer_mlp_act import (
    steer_mlp_act,
    steer_mlp_act_ref,
    steer_mlp_act_rows,
    steer_mlp_act_triton,
)

# the module itself: the package attribute roast_vllm.kernels.steer_mlp_act is the op
mod = importlib.import_module("roast_vllm.kernels.steer_mlp_act")

S = 5
SCALE = torch.tensor([0.0, 1.5, -2.0, 0.25, 4.0])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Kernel vs reference. Both compute in fp32 in the same order and round once, and are
# bitwise equal in the interpreter for fp32/fp16; bf16 differs by up to 1 ulp because the
# interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest even.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-6),
    torch.bfloat16: dict(atol=0, rtol=2**-7),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
# Against fp64: |out - exact| <= UNIT * |exact| + 4 * 2^-24 * (|act| + |delta * up|) + ATOL.
# UNIT is the final rounding to the dtype (a full ulp for bf16: interpreter truncation), the
# middle term the three fp32 roundings before it, ATOL fp16's subnormal spacing.
UNIT = {torch.float32: 2**-24, torch.bfloat16: 2**-7, torch.float16: 2**-11}
ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2**-24}

# Interpreter time grows with T * ceil(I / 1024) programs, so the widest width gets T <= 7.
CASES = [
    pytest.param(I, T, dt, id=f"I{I}-T{T}-{name}")
    for I, Ts in [(769, (1, 7, 63)), (1536, (1, 7, 63)), (13824, (1, 7, 63)), (27648, (1, 7))]
    for T in Ts
    for name, dt in DTYPES.items()
]


def make(T, I, dtype, seed=0, slot_dtype=torch.int64):
    """act, up = gate_up[:, I:], table, slot, scale. Row 0 is always steered (so T = 1 cases
    steer), the last row unsteered when T > 1; unsteered rows of up hold inf/nan."""
    g = torch.Generator().manual_seed(seed)
    act = (2 * torch.randn(T, I, generator=g)).to(dtype)
    gate_up = (2 * torch.randn(T, 2 * I, generator=g)).to(dtype)
    table = torch.randn(S, I, generator=g)
    table[0] = 0
    slot = torch.randint(0, S, (T,), generator=g)
    slot[0] = S - 1
    if T > 1:
        slot[-1] = 0
    up = gate_up[:, I:]
    idle = (slot == 0).nonzero().flatten()
    up[idle, 0::3] = float("inf")
    up[idle, 1::3] = float("nan")
    up[idle, 2::3] = -float("inf")
    return act, gate_up, up, table, slot.to(slot_dtype), SCALE.clone()


def bits(x):
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_near_fp64(out, act, up, table, slot, scale):
    rows = slot != 0
    s = slot[rows].long()
    a = act[rows].double()
    du = table.double()[s] * scale.double()[s][:, None] * up[rows].double()
    want = a + du
    err = (out[rows].double() - want).abs()
    bound = UNIT[act.dtype] * want.abs() + 4 * 2**-24 * (a.abs() + du.abs()) + ATOL[act.dtype]
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} elements off fp64; worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("I, T, dtype", CASES)
def test_kernel_matches_reference(I, T, dtype):
    act, gate_up, up, table, slot, scale = make(T, I, dtype)
    assert up.stride() == (2 * I, 1) and up.data_ptr() == gate_up.data_ptr() + I * gate_up.element_size()
    gate_up_before = gate_up.clone()
    out = steer_mlp_act_triton(act.clone(), up, table, slot, scale)
    ref = steer_mlp_act_ref(act.clone(), up, table, slot, scale)

    torch.testing.assert_close(out, ref, **TOL[dtype], equal_nan=False)
    idle, busy = slot == 0, slot != 0
    assert busy.any()
    for res in (out, ref):
        assert torch.equal(bits(res[idle]), bits(act[idle])), "slot-0 rows must be bit-identical"
        assert not torch.equal(res[busy], act[busy]), "steered rows must change"
        assert_near_fp64(res, act, up, table, slot, scale)
    assert torch.equal(bits(gate_up), bits(gate_up_before)), "up (gate_up) must not be written"


@pytest.mark.parametrize(
    "I, T, dtype",
    [
        pytest.param(769, 7, torch.bfloat16, id="I769-T7-bf16"),
        pytest.param(13824, 7, torch.float16, id="I13824-T7-fp16"),
        pytest.param(27648, 1, torch.float32, id="I27648-T1-fp32"),
    ],
)
def test_int32_slot_and_contiguous_up(I, T, dtype):
    """int32 slots and a dense copy of up give the same bits as int64 slots and the view."""
    act, _, up, table, slot, scale = make(T, I, dtype)
    assert slot.dtype == torch.int64
    want_kernel = steer_mlp_act_triton(act.clone(), up, table, slot, scale)
    want_ref = steer_mlp_act_ref(act.clone(), up, table, slot, scale)
    for sl, u in [(slot.int(), up), (slot, up.contiguous())]:
        assert torch.equal(bits(steer_mlp_act_triton(act.clone(), u, table, sl, scale)), bits(want_kernel))
        assert torch.equal(bits(steer_mlp_act_ref(act.clone(), u, table, sl, scale)), bits(want_ref))


def test_reference_math():
    """The reference against an explicit fp64 loop, including inf/nan in unsteered rows of up."""
    T, I = 5, 3
    g = torch.Generator().manual_seed(1)
    act = torch.randn(T, I, generator=g)
    up = torch.randn(T, I, generator=g)
    table = torch.randn(3, I, generator=g)
    table[0] = 0
    scale = torch.tensor([0.0, 2.0, -0.5])
    slot = torch.tensor([1, 0, 2, 0, 1], dtype=torch.int32)
    up[1] = float("nan")
    up[3] = float("inf")
    want = act.double().clone()
    for t in range(T):
        s = int(slot[t])
        if s:
            for i in range(I):
                want[t, i] += float(scale[s]) * float(table[s, i]) * float(up[t, i])
    out = steer_mlp_act_ref(act.clone(), up, table, slot, scale)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[[1, 3]], act[[1, 3]])


@pytest.mark.parametrize("I, T, dtype", CASES)
def test_rows_path_matches_reference(I, T, dtype):
    """The CPU path (steered rows only; a fused multiply-add, so not bitwise the
    reference's separate multiply and add) is within the fp64 bound, as the reference is."""
    act, _, up, table, slot, scale = make(T, I, dtype)
    ref = steer_mlp_act_ref(act.clone(), up, table, slot, scale)
    out = steer_mlp_act_rows(act.clone(), up, table, slot, scale)
    assert_near_fp64(out, act, up, table, slot, scale)
    assert_near_fp64(ref, act, up, table, slot, scale)
    idle = slot == 0
    assert torch.equal(bits(out[idle]), bits(act[idle])), "slot-0 rows must be bit-identical"


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_rows_path_every_token_steered(dtype):
    """A batch where every token is steered takes the in-place path (no row gather)."""
    act, _, up, table, slot, scale = make(63, 1536, dtype, seed=3)
    slot = torch.arange(63) % (S - 1) + 1
    up = up.nan_to_num(0.0, 1.0, -1.0)  # make() puts inf/nan in rows it left unsteered
    ref = steer_mlp_act_ref(act.clone(), up, table, slot, scale)
    out = steer_mlp_act_rows(act.clone(), up, table, slot, scale)
    assert_near_fp64(out, act, up, table, slot, scale)
    assert_near_fp64(ref, act, up, table, slot, scale)
    assert (out != act).any(dim=-1).all()


def test_rows_path_skips_unsteered_step():
    """No steered token: ``act`` untouched (its inf/nan ``up`` rows never read)."""
    from conftest import aten_ops

    act, _, up, table, slot, scale = make(7, 769, torch.bfloat16)
    x, zeros = act.clone(), torch.zeros_like(slot)
    with aten_ops() as seen:
        out = steer_mlp_act_rows(x, up, table, zeros, scale)
    assert torch.equal(bits(out), bits(act))
    assert set(seen.ops) <= {"nonzero", "squeeze"}, seen.ops


def test_scale_zero_is_identity():
    act, _, up, table, slot, _ = make(7, 769, torch.bfloat16)
    zero = torch.zeros(S)
    assert torch.equal(bits(steer_mlp_act_triton(act.clone(), up, table, slot, zero)), bits(act))
    assert torch.equal(bits(steer_mlp_act_ref(act.clone(), up, table, slot, zero)), bits(act))


@pytest.fixture
def launches(count_launches):
    return count_launches(mod, "steer_mlp_act_triton")


@pytest.fixture
def row_calls(count_launches):
    return count_launches(mod, "steer_mlp_act_rows")


def test_dispatch_takes_each_path(launches, row_calls):
    """CPU tensors run the rows path; inside ``triton_on_cpu`` the custom op runs the Triton
    kernel: both agree with the reference."""
    act, _, up, table, slot, scale = make(7, 769, torch.bfloat16)
    by_ref = steer_mlp_act(act.clone(), up, table, slot, scale)
    assert launches == [] and row_calls == [act.shape]
    torch.testing.assert_close(
        by_ref, steer_mlp_act_ref(act.clone(), up, table, slot, scale), **TOL[torch.bfloat16]
    )
    with triton_on_cpu():
        by_triton = steer_mlp_act(act.clone(), up, table, slot, scale)
    assert launches == [act.shape] and len(row_calls) == 1
    torch.testing.assert_close(by_triton, by_ref, **TOL[torch.bfloat16])
    assert not torch.equal(by_triton, act)


def _compiled_mlp(gate_up, table, slot, scale, steer=True):
    # as in the steered MLP: the op corrects SiluAndMul's output with the view up = gate_up[:, I:]
    width = gate_up.shape[-1] // 2
    act = torch.nn.functional.silu(gate_up[:, :width]) * gate_up[:, width:]
    if steer:
        act = steer_mlp_act(act, gate_up[:, width:], table, slot, scale)
    return act * 3.0


def _mlp_case():
    T, I = 7, 769
    _, gate_up, _, table, slot, scale = make(T, I, torch.float32)
    gate_up = gate_up.clamp(-8, 8).nan_to_num()  # finite: the plain act below reads every row
    plain = torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:]
    want = steer_mlp_act_ref(plain.clone(), gate_up[:, I:], table, slot, scale) * 3.0
    return gate_up, table, slot, scale, plain, want


def test_triton_custom_op_inside_inductor(launches, row_calls):
    """The engine's CUDA path: the in-place custom op holding the Triton launch (here under
    Triton's interpreter on CPU tensors) inside an inductor-compiled graph, against the
    reference run eagerly. The op steers the graph's buffer in place (no copy of ``act``)."""
    from conftest import compile_and_run

    gate_up, table, slot, scale, plain, want = _mlp_case()
    with triton_on_cpu():
        _, out, src, _ = compile_and_run(_compiled_mlp, gate_up, table, slot, scale)
    assert "roast_vllm.steer_mlp_act" in src
    assert "clone" not in src and "copy_" not in src, src
    assert len(launches) == 1 and row_calls == []
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    busy = slot != 0
    assert not torch.allclose(out[busy], plain[busy] * 3.0, atol=1e-3), "steered rows must change"
    torch.testing.assert_close(out[~busy], plain[~busy] * 3.0, atol=1e-6, rtol=1e-6)


def test_cpu_compile_traces_the_reference_fused(launches, row_calls):
    """The engine's CPU path in compile mode: the reference traced into the graph and fused
    by inductor into the SiluAndMul loop (no op call and no kernel of its own: the
    correction adds no pass over ``[T, I]``); steered rows match the reference run eagerly,
    unsteered rows are bit-identical to the graph without steering, and so is everything
    when no token is steered."""
    from conftest import compile_and_run

    gate_up, table, slot, scale, plain, want = _mlp_case()
    _, base, _, k_plain = compile_and_run(
        lambda *a: _compiled_mlp(*a, steer=False), gate_up, table, slot, scale
    )
    f, out, src, k_steer = compile_and_run(_compiled_mlp, gate_up, table, slot, scale)
    assert "roast_vllm.steer_mlp_act" not in src and launches == [] and row_calls == []
    assert k_steer == k_plain, f"steering added {k_steer - k_plain} kernel(s) (passes)"
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    busy = slot != 0
    assert not torch.allclose(out[busy], plain[busy] * 3.0, atol=1e-3), "steered rows must change"
    assert torch.equal(bits(out[~busy]), bits(base[~busy])), "slot-0 rows must be untouched"
    out0 = f(gate_up, table, torch.zeros_like(slot), scale)  # the same compiled graph
    assert torch.equal(bits(out0), bits(base))


def test_reference_traces_without_graph_breaks():
    """The reference has no data-dependent shapes: one graph, no breaks."""
    act, _, up, table, slot, scale = make(7, 769, torch.float32)
    want = steer_mlp_act_ref(act.clone(), up, table, slot, scale)
    ref_c = torch.compile(steer_mlp_act_ref, fullgraph=True, backend="eager")
    torch.testing.assert_close(ref_c(act.clone(), up, table, slot, scale), want, atol=0, rtol=0)


def test_validation():
    act, gate_up, up, table, slot, scale = make(4, 64, torch.float32)
    with pytest.raises(ValueError, match="share I"):
        steer_mlp_act_triton(act, up, table[:, :32], slot, scale)
    with pytest.raises(ValueError, match="share I"):
        steer_mlp_act_triton(act[0], up, table, slot, scale)
    with pytest.raises(ValueError, match="up must have act's shape"):
        steer_mlp_act_triton(act, up[:3], table, slot, scale)
    with pytest.raises(ValueError, match="up must have act's dtype"):
        steer_mlp_act_triton(act, up.double(), table, slot, scale)
    with pytest.raises(ValueError, match="slot must be \\[T"):
        steer_mlp_act_triton(act, up, table, slot[:2], scale)
    with pytest.raises(ValueError, match="integer"):
        steer_mlp_act_triton(act, up, table, slot.float(), scale)
    with pytest.raises(ValueError, match="scale must be"):
        steer_mlp_act_triton(act, up, table, slot, scale[:2])
    with pytest.raises(ValueError, match="act must be contiguous along I"):
        steer_mlp_act_triton(gate_up[:, ::2], up, table, slot, scale)
    with pytest.raises(ValueError, match="up must have unit stride"):
        steer_mlp_act_triton(act, torch.randn(64, 4).t(), table, slot, scale)
    with pytest.raises(ValueError, match="table must be contiguous"):
        steer_mlp_act_triton(act, up, torch.randn(64, S).t(), slot, scale)
    empty = torch.empty(0, 64)
    assert steer_mlp_act_triton(empty, empty, table, slot[:0], scale) is empty


_PAST_INT32 = """
import torch
from roast_vllm.kernels.steer_mlp_act import steer_mlp_act_ref, steer_mlp_act_triton


# act rows 1.5 * 2^30 elements apart (see test_steer_apply.py): row 2 starts past 2^31
dev = "cuda" if torch.cuda.is_available() else "cpu"
I, S = 64, 3 * 2**29
act = torch.empty(2 * S + I, dtype=torch.bfloat16, device=dev).as_strided((3, I), (S, 1))
for i in range(3):
    act[i].fill_(float(i))
up = torch.full((3, I), 0.5, dtype=torch.bfloat16, device=dev)
g = torch.Generator().manual_seed(0)
table = torch.randn(2, I, generator=g).to(dev)
slot = torch.tensor([1, 1, 1], device=dev)
scale = torch.tensor([0.0, 1.0], device=dev)
want = steer_mlp_act_ref(act.clone(), up, table, slot, scale)
steer_mlp_act_triton(act, up, table, slot, scale)
# within one bf16 ulp of the reference (the interpreter truncates where CUDA rounds)
err = (act.float() - want.float()).abs() - want.float().abs() * 2**-7
print("excess", float(err.max()))
"""


def test_row_offsets_past_int32():
    """Tokens x I >= 2^31 (77k tokens at I = 27648): offsets are int64."""
    from conftest import run_isolated

    out = run_isolated(_PAST_INT32)
    assert float(out.split("excess")[1]) <= 1e-6, out
