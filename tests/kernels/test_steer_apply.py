"""steer_apply: Triton kernel (interpreted) vs torch reference; slot 0 is bit-identical."""

from __future__ import annotations

import pytest
import torch
from roast_vllm.kernels.steer_apply import steer_apply, steer_apply_ref, steer_apply_triton

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
    idle = slot == 0
    for res in (out, ref):
        assert torch.equal(bits(res[idle]), bits(orig[idle])), "slot-0 rows must be bit-identical"
    if energy:
        n0, n1 = orig.float().norm(dim=-1), ref.float().norm(dim=-1)
        torch.testing.assert_close(n1, n0, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0)


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


def test_custom_op_compiles_and_matches():
    """The op the engine uses on CUDA is an in-place custom op torch.compile can hold."""
    h, table, slot, scale = make(63, 576, torch.float32)
    want = steer_apply_ref(h.clone(), table, slot, scale)

    def f(x):
        x = x * 1.0
        torch.ops.roast_vllm.steer_apply(x, table, slot, scale, False)
        return x

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(h.clone()), want)
    torch.testing.assert_close(steer_apply(h.clone(), table, slot, scale), want)


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
