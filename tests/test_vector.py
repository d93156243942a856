"""SteeringVector: construction checks, arithmetic, pickle-free save/load."""

import math

import pytest
import torch

from roast_vllm import SteeringVector, SteeringVectorError


def vec(layers=(0, 3), dim=576, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(directions={l: torch.randn(dim, generator=g) for l in layers}, **kw)


def test_save_load_roundtrip_is_exact(tmp_path):
    v = vec(model_id="smol", num_layers=30, method="caa", provenance={"seed": 42, "data": "x.csv"})
    path = v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(path)
    assert w == v
    for l in v.layers:
        assert torch.equal(w.directions[l], v.directions[l])
    assert w.provenance == {"seed": 42, "data": "x.csv"} and w.method == "caa"
    assert SteeringVector.from_bytes(v.to_bytes()) == v


def test_bf16_input_is_stored_fp32_exactly(tmp_path):
    t = torch.randn(769).to(torch.bfloat16)
    v = SteeringVector(directions={2: t})
    assert v.directions[2].dtype == torch.float32
    assert torch.equal(v.directions[2].to(torch.bfloat16), t)
    assert SteeringVector.load(v.save(tmp_path / "b.safetensors")) == v


def test_arithmetic():
    v, w = vec(seed=1), vec(layers=(3, 5), seed=2)
    s = v + w
    assert s.layers == [0, 3, 5]
    assert torch.allclose(s.directions[3], v.directions[3] + w.directions[3])
    assert torch.equal(s.directions[5], w.directions[5])
    assert torch.allclose((2.5 * v).directions[0], 2.5 * v.directions[0])
    assert torch.allclose((v * 2.5).directions[0], 2.5 * v.directions[0])
    assert torch.equal((-v).directions[0], -v.directions[0])
    d = v - v
    assert all(torch.count_nonzero(t) == 0 for t in d.directions.values())
    assert (v / 2).directions[0].allclose(v.directions[0] / 2)
    # operands are not mutated
    assert v == vec(seed=1)


def test_arithmetic_rejects_mismatch():
    with pytest.raises(SteeringVectorError, match="cannot combine"):
        vec(dim=576) + vec(dim=64)
    with pytest.raises(SteeringVectorError, match="non-finite"):
        vec() * math.inf


@pytest.mark.parametrize(
    "directions, match",
    [
        ({}, "no directions"),
        ({0: torch.tensor([1.0, float("nan")])}, "non-finite"),
        ({0: torch.tensor([1.0, float("inf")])}, "non-finite"),
        ({0: torch.zeros(4), 1: torch.zeros(5)}, "same size"),
        ({-1: torch.zeros(4)}, "non-negative"),
        ({0: torch.zeros(2, 2)}, "1-D"),
        ({0: torch.zeros(4, dtype=torch.long)}, "floating point"),
    ],
    ids=["empty", "nan", "inf", "ragged", "negative-layer", "2d", "int-dtype"],
)
def test_invalid_vectors(directions, match):
    with pytest.raises(SteeringVectorError, match=match):
        SteeringVector(directions=directions)


def test_validate_for_model():
    v = vec(layers=(0, 29), dim=576)
    v.validate_for(30, 576)
    with pytest.raises(SteeringVectorError, match="size 576.*size 64"):
        v.validate_for(30, 64)
    with pytest.raises(SteeringVectorError, match="layers \\[29\\].*24 layers"):
        v.validate_for(24, 576)


def test_load_rejects_bad_files(tmp_path):
    good = vec().save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    (tmp_path / "pickle.pt").write_bytes(__import__("pickle").dumps({"a": 1}))
    from safetensors.torch import save_file

    save_file({"layer.0": torch.zeros(4)}, str(tmp_path / "nometa.safetensors"))
    save_file(
        {"layer.0": torch.tensor([float("nan")])},
        str(tmp_path / "nan.safetensors"),
        metadata={"roast_vllm": "{}"},
    )
    for name, match in [
        ("trunc", "truncated"),
        ("junk", "truncated"),
        ("nometa", "no 'roast_vllm'"),
        ("nan", "non-finite"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(SteeringVectorError, match=match):
            SteeringVector.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(SteeringVectorError):
        SteeringVector.load(tmp_path / "pickle.pt")


def test_random_and_dense():
    v = SteeringVector.random(30, 576, layers=[1, 2], seed=3)
    assert v.method == "random" and torch.allclose(v.directions[1].norm(), torch.tensor(1.0))
    d = v.dense(30)
    assert d.shape == (30, 576) and torch.count_nonzero(d[0]) == 0 and torch.equal(d[2], v.directions[2])
