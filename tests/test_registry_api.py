"""The vector registry's HTTP routes (``roast_vllm.engine.registry_api``) on a bare app with
a recording stand-in for vLLM's engine client (no engine): formats, errors, ordering and
vLLM's API-key middleware. The live server runs them in tests/test_serve.py."""

from __future__ import annotations

import asyncio
import json
from argparse import Namespace

import pytest
import torch

from roast_vllm import SteeringVector
from roast_vllm.engine import registry
from roast_vllm.engine.registry_api import ROUTE, RegistryPlugin

L, H, I = 30, 576, 1536


class FakeEngine:
    """Records ``collective_rpc`` calls (what the workers would be asked); may fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.fail = False

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if self.fail:
            raise RuntimeError("worker said no")
        self.calls.append((method, args))
        return [None]


@pytest.fixture
def server(monkeypatch, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    allowed = tmp_path / "vectors"
    allowed.mkdir()
    SteeringVector.random(L, H, seed=1).save(allowed / "start.safetensors")
    cfg = {
        "vectors": {"start": str(allowed / "start.safetensors")},
        "num_layers": L,
        "hidden_size": H,
        "mlp_size": I,
        "vector_dirs": [str(allowed)],
    }
    monkeypatch.setenv("ROAST_VLLM_CONFIG", json.dumps(cfg))
    registry.reset()
    app = FastAPI()
    plugin = RegistryPlugin()
    plugin.attach_router(app)
    engine = FakeEngine()
    asyncio.run(plugin.init_state(engine, app.state, Namespace(api_server_count=1)))
    app.add_middleware(AuthenticationMiddleware, tokens=["sekrit"])  # as vllm serve --api-key
    client = TestClient(app, headers={"Authorization": "Bearer sekrit"})
    yield client, engine, allowed
    registry.reset()


def _upload(client, name, data, filename="v.safetensors"):
    return client.post(ROUTE, data={"name": name}, files={"file": (filename, data)})


def test_list_shows_what_each_vector_is(server):
    client, _, _ = server
    r = client.get(ROUTE)
    assert r.status_code == 200
    (entry,) = r.json()["data"]
    assert entry["name"] == "start" and entry["site"] == "residual" and entry["layers"] == list(range(L))
    assert (
        entry["dims"] == H
        and "method" in entry
        and "provenance" in entry
        and entry["source"].startswith("config")
    )
    assert client.get(ROUTE + "/start").json()["digest"] == entry["digest"]
    assert client.get(ROUTE + "/nope").status_code == 404


@pytest.mark.parametrize("form", ["multipart", "raw", "gguf", "path"])
def test_register_in_every_form_workers_first(server, form, tmp_path):
    client, engine, allowed = server
    vec = SteeringVector.random(L, H, layers=list(range(4, 20)), seed=7, method="caa")
    if form == "multipart":
        r = _upload(client, "new", vec.to_bytes())
    elif form == "raw":
        r = client.post(ROUTE, params={"name": "new"}, content=vec.to_bytes())
    elif form == "gguf":
        path = vec.save_gguf(tmp_path / "new.gguf")
        r = _upload(client, "new", path.read_bytes(), "new.gguf")
    else:
        vec.save(allowed / "new.safetensors")
        r = client.post(ROUTE, json={"name": "new", "path": str(allowed / "new.safetensors")})
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == list(range(4, 20)) and r.json()["digest"] == vec.digest()
    method, (name, payload) = engine.calls[-1]
    assert method == "roast_register_vector" and name == "new"
    assert SteeringVector.from_bytes(payload) == vec  # the workers get exactly this vector
    assert registry.check(_spec("new")) == vec.digest()  # and requests may name it now


def _spec(name):
    from roast_vllm.engine.spec import SteerSpec

    return SteerSpec(name)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("garbage", "safetensors"),
        ("bad-gguf", "GGUF"),
        ("wrong-width", "576"),
        ("too-many-layers", "layer"),
        ("nan", "finite"),
        ("no-name", "'name'"),
        ("comma-name", "may not contain"),
        ("empty", "empty upload"),
        ("outside", "outside the allowed vector_dirs"),
        ("traversal", "outside the allowed vector_dirs"),
        ("missing-file", "no such vector file"),
        ("bad-json", "not valid JSON"),
    ],
)
def test_bad_upload_is_400_with_the_reason_and_changes_nothing(server, case, expect, tmp_path):
    client, engine, allowed = server
    before = client.get(ROUTE).json()
    good = SteeringVector.random(L, H, seed=3).to_bytes()
    if case == "garbage":
        r = _upload(client, "x", b"not a vector at all")
    elif case == "bad-gguf":
        r = _upload(client, "x", b"GGUF" + b"\x00" * 64, "x.gguf")
    elif case == "wrong-width":
        r = _upload(client, "x", SteeringVector.random(L, 100, seed=3).to_bytes())
    elif case == "too-many-layers":
        r = _upload(client, "x", SteeringVector.random(L + 5, H, layers=[L + 2], seed=3).to_bytes())
    elif case == "nan":
        v = SteeringVector.random(L, H, seed=3)
        d = dict(v.directions)
        d[3] = d[3].clone()
        d[3][0] = float("nan")
        r = _upload(client, "x", _raw_safetensors(v, d))
    elif case == "no-name":
        r = client.post(ROUTE, files={"file": ("v.safetensors", good)})
    elif case == "comma-name":
        r = _upload(client, "a,b", good)
    elif case == "empty":
        r = client.post(ROUTE, params={"name": "x"}, content=b"")
    elif case == "outside":
        SteeringVector.random(L, H, seed=3).save(tmp_path / "elsewhere.safetensors")
        r = client.post(ROUTE, json={"name": "x", "path": str(tmp_path / "elsewhere.safetensors")})
    elif case == "traversal":
        SteeringVector.random(L, H, seed=3).save(tmp_path / "elsewhere.safetensors")
        r = client.post(ROUTE, json={"name": "x", "path": str(allowed / ".." / "elsewhere.safetensors")})
    elif case == "missing-file":
        r = client.post(ROUTE, json={"name": "x", "path": str(allowed / "nope.safetensors")})
    else:
        r = client.post(ROUTE, content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (case, r.status_code, r.text)
    assert expect in r.json()["error"]["message"], r.json()
    assert engine.calls == [] and client.get(ROUTE).json() == before


def _raw_safetensors(v: SteeringVector, directions: dict) -> bytes:
    """``v``'s file with other tensors (to smuggle a NaN past ``SteeringVector``'s own checks)."""
    from safetensors.torch import load, save

    data = v.to_bytes()
    tensors = load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
    for k in tensors:
        tensors[k] = directions[int(k.split(".")[-1])].float() if k.startswith("layer.") else tensors[k]
    return save(tensors, metadata=meta)


def test_api_key_guards_every_route(server):
    client, engine, _ = server
    good = SteeringVector.random(L, H, seed=3).to_bytes()
    for call in (
        lambda h: client.get(ROUTE, headers=h),
        lambda h: client.post(ROUTE, params={"name": "k"}, content=good, headers=h),
        lambda h: client.delete(ROUTE + "/start", headers=h),
    ):
        assert call({"Authorization": "Bearer wrong"}).status_code == 401
        assert call({"Authorization": ""}).status_code == 401
    assert engine.calls == [] and registry.names() == ["start"]


def test_delete_then_requests_naming_it_are_refused(server):
    from roast_vllm.engine.spec import SteeringRequestError

    client, engine, _ = server
    assert client.delete(ROUTE + "/start").json() == {"deleted": "start"}
    assert engine.calls == [("roast_unregister_vector", ("start",))]
    with pytest.raises(SteeringRequestError, match="unknown steering vector 'start'"):
        registry.check(_spec("start"))
    assert client.delete(ROUTE + "/start").status_code == 404
    assert client.get(ROUTE).json()["data"] == []


def test_worker_refusal_changes_nothing_here(server):
    client, engine, _ = server
    engine.fail = True
    r = _upload(client, "x", SteeringVector.random(L, H, seed=3).to_bytes())
    assert r.status_code == 500 and "worker said no" in r.json()["error"]["message"]
    assert registry.names() == ["start"]


def test_mlp_act_vector_width_is_the_mlp_width(server):
    client, _, _ = server
    ok = SteeringVector.random(L, I, layers=[5], seed=3, site="mlp_act")
    assert _upload(client, "m", ok.to_bytes()).status_code == 201
    bad = SteeringVector.random(L, H, layers=[5], seed=3, site="mlp_act")
    r = _upload(client, "m2", bad.to_bytes())
    assert r.status_code == 400 and str(I) in r.json()["error"]["message"]


def test_engine_side_unregister_keeps_pinned_versions():
    """A worker forgets the name, but a request pinned to its version still gets a slot
    (it was accepted before the DELETE)."""
    from roast_vllm.engine.spec import SteerSpec
    from roast_vllm.engine.state import SteeringState, SteeringVectorError

    st = SteeringState(4, 8, max_slots=2, max_num_seqs=2, max_num_tokens=8, dtype=torch.float32)
    digest = st.register_vector("a", SteeringVector(directions={1: torch.ones(8)}))
    assert st.unregister_vector("a") and not st.unregister_vector("a")
    i = st.acquire(SteerSpec("a", 2.0, digest=digest))
    assert torch.equal(st.table[1, i], torch.ones(8))
    with pytest.raises(SteeringVectorError, match="unknown steering vector"):
        st.acquire(SteerSpec("a", 3.0))
