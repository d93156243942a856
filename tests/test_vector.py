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


# ------------------------------------------------------------------ llama.cpp / repeng GGUF
def test_gguf_round_trip_is_exact_and_in_llama_cpp_layout(tmp_path):
    """save_gguf writes what llama.cpp's control-vector loader reads (architecture
    `controlvector`, F32 1-D `direction.<l>` tensors, l >= 1) plus repeng's metadata keys;
    load_gguf gives back the same vector, bit for bit, metadata included."""
    import gguf

    v = SteeringVector.random(30, 576, layers=[1, 5, 29], seed=3, model_id="smol", provenance={"k": 1})
    path = v.save_gguf(tmp_path / "v.gguf", model_hint="llama")
    assert SteeringVector.load_gguf(path) == v
    r = gguf.GGUFReader(str(path))
    assert [(t.name, t.tensor_type.name, int(t.n_elements)) for t in r.tensors] == [
        ("direction.1", "F32", 576),
        ("direction.5", "F32", 576),
        ("direction.29", "F32", 576),
    ]

    def field(key):
        f = r.get_field(key)
        return f.parts[-1]

    assert bytes(field("general.architecture")).decode() == "controlvector"
    assert bytes(field("controlvector.model_hint")).decode() == "llama"
    assert int(field("controlvector.layer_count")[0]) == 3


def test_gguf_refuses_layer0_and_other_sites_and_reads_foreign_files(tmp_path):
    import gguf
    import numpy as np

    v = SteeringVector.random(30, 576, layers=[0, 4], seed=1)
    with pytest.raises(SteeringVectorError, match="layer 0"):
        v.save_gguf(tmp_path / "a.gguf")
    w = SteeringVector.load_gguf(v.save_gguf(tmp_path / "a.gguf", drop_layer0=True))
    assert w.layers == [4] and torch.equal(w.directions[4], v.directions[4])
    assert w.provenance["dropped_layers"] == [0]
    m = SteeringVector.random(30, 1536, layers=[3], site="mlp_act")
    with pytest.raises(SteeringVectorError, match="residual"):
        m.save_gguf(tmp_path / "m.gguf")
    # a file written as repeng's export_gguf does (no roast metadata): model_hint -> model_id
    wr = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "controlvector")
    wr.add_string("controlvector.model_hint", "llama")
    wr.add_uint32("controlvector.layer_count", 2)
    wr.add_tensor("direction.3", np.ones(8, np.float32))
    wr.add_tensor("direction.7", np.arange(8, dtype=np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    f = SteeringVector.load_gguf(tmp_path / "r.gguf")
    assert f.layers == [3, 7] and f.model_id == "llama" and f.site == "residual"
    assert torch.equal(f.directions[7], torch.arange(8, dtype=torch.float32))
    # not a control vector / not GGUF at all
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SteeringVectorError, match="not a GGUF file"):
        SteeringVector.load_gguf(tmp_path / "bad.gguf")
    wm = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    wm.add_tensor("token_embd.weight", np.ones((2, 8), np.float32))
    wm.write_header_to_file()
    wm.write_kv_data_to_file()
    wm.write_tensors_to_file()
    wm.close()
    with pytest.raises(SteeringVectorError, match="not a control vector"):
        SteeringVector.load_gguf(tmp_path / "model.gguf")


def test_load_reads_gguf_control_vectors_too(tmp_path):
    """``load`` (config ``vectors``, ``--vector``, ``register_vector`` paths) takes a
    llama.cpp / repeng GGUF file as well, whatever its suffix."""
    v = SteeringVector.random(30, 576, layers=list(range(1, 30)), seed=4)
    path = v.save_gguf(tmp_path / "cv.gguf")
    assert SteeringVector.load(path) == v
    renamed = path.rename(tmp_path / "cv.bin")
    assert SteeringVector.load(renamed) == v
