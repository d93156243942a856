"""The vector registry over HTTP, beside the OpenAI routes of stock ``vllm serve``.

A vLLM *endpoint plugin* (entry point ``vllm.endpoint_plugins``, name ``roast_vllm``):
vLLM attaches its routes to the API server's app and hands it the engine client. vLLM
loads endpoint plugins only when they are named in ``VLLM_PLUGINS`` (they widen the
network surface), so a server with the registry API is started as::

    VLLM_PLUGINS=roast_vllm vllm serve MODEL --additional-config '{"roast": {...}}' [--api-key KEY]

(``roast-vllm serve`` sets it). Routes, all under ``/v1`` so vLLM's ``--api-key`` /
``VLLM_API_KEY`` guards them like the OpenAI routes (401 without the key):

``GET    /v1/steering/vectors``         every registered vector: name, site, layers, dims,
                                        method, provenance, digest, ...
``GET    /v1/steering/vectors/{name}``  one of them (404 if unknown)
``POST   /v1/steering/vectors``         register (201): a safetensors or llama.cpp / repeng
                                        GGUF file as ``multipart/form-data`` (fields
                                        ``name``, ``file``) or as the raw body with
                                        ``?name=``; or JSON ``{"name", "path"}`` for a file
                                        inside one of the roast config's ``vector_dirs``
``DELETE /v1/steering/vectors/{name}``  unregister (404 if unknown)

Registering checks the file completely in this process (format, no pickle, finite values,
the model's layer count and widths) before any worker sees it: a bad upload gets 400 with
the reason and changes nothing. Workers get the vector first, then this process's
registry, so a request is stamped with a version only once every worker holds it.
Requests already accepted keep the version they were stamped with (pinned by digest,
``SteeringState``); a re-registered name steers only requests submitted afterwards; an
unregistered one is refused from then on. Registering runs between engine steps (a
``collective_rpc`` that stores the tensors); it never stalls or fails running requests.

Registered vectors live in memory: a restarted server has the roast config's ``vectors``
only. One API server process (``--api-server-count 1``, the default): each API process
validates against its own registry, so with several the routes answer 501.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from roast_vllm.engine import registry
from roast_vllm.engine.spec import MAX_NAME_LEN
from roast_vllm.vector import SteeringVector, SteeringVectorError

ROUTE = "/v1/steering/vectors"
#: Largest vector file accepted (a 64-layer model's vector at both sites is ~10 MB).
MAX_UPLOAD_BYTES = 256 << 20

router = APIRouter()


class RegistryError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    # vLLM's own error body (ErrorResponse), so OpenAI clients raise their usual errors
    kind = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError"}.get(status, "Error")
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": None, "code": status}},
    )


def read_vector(data: bytes, source: str) -> SteeringVector:
    """A vector from file bytes: llama.cpp / repeng GGUF (magic ``GGUF``) or safetensors."""
    if data[:4] == b"GGUF":
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "upload.gguf"
            path.write_bytes(data)
            try:
                return SteeringVector.load_gguf(path)
            except SteeringVectorError as e:
                raise SteeringVectorError(str(e).replace(str(path), source)) from None
    return SteeringVector.from_bytes(data, source=source)


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LEN:
        raise RegistryError(
            400, f"'name' must be a vector name of 1..{MAX_NAME_LEN} characters, got {name!r:.80}"
        )
    if any(c in name for c in ",:@") or name != name.strip():
        # the compact steer_vectors form splits on these
        raise RegistryError(
            400, f"vector name {name!r:.80} may not contain ',', ':' or '@' or surrounding spaces"
        )
    return name


def _check_fits(vec: SteeringVector) -> None:
    m = registry.model()
    if m is None:
        return
    width = m.mlp_size if vec.site == "mlp_act" else m.hidden_size
    if vec.site == "mlp_act" and m.mlp_size == 0:
        raise RegistryError(
            400, "this is an mlp_act vector and the server's mlp_act site is off (roast config mlp_act_site)"
        )
    if m.num_layers is not None and width:
        try:
            vec.validate_for(m.num_layers, width)
        except SteeringVectorError as e:
            raise RegistryError(400, str(e)) from None


def _allowed_path(path) -> Path:
    m = registry.model()
    dirs = m.vector_dirs if m is not None else ()
    if not isinstance(path, str) or not path:
        raise RegistryError(400, f"'path' must be a file path on the server, got {path!r:.80}")
    if not dirs:
        raise RegistryError(
            400,
            "registering by server path is off: start the server with the roast config's "
            '"vector_dirs": ["/folder/with/vectors"], or upload the file',
        )
    real = Path(os.path.realpath(path))
    for d in dirs:
        root = Path(os.path.realpath(d))
        if real == root or root in real.parents:
            if not real.is_file():
                raise RegistryError(400, f"no such vector file: {path}")
            return real
    raise RegistryError(400, f"path {path!r} is outside the allowed vector_dirs {list(dirs)}")


class _Registry:
    """Per app: the engine client and one lock, so registrations apply in order."""

    def __init__(self, engine_client, api_server_count: int) -> None:
        self.engine = engine_client
        self.lock = asyncio.Lock()
        self.api_server_count = api_server_count


def _state(request: Request) -> _Registry:
    st = getattr(request.app.state, "roast_registry", None)
    if st is None or st.engine is None:
        raise RegistryError(404, "this server has no engine")
    if st.api_server_count > 1:
        raise RegistryError(
            501,
            "the vector registry API needs a single API server process (--api-server-count 1): "
            "each process validates requests against its own registry",
        )
    if not registry.known():
        raise RegistryError(
            404,
            "steering is off on this server: start it with --additional-config '{\"roast\": {}}'",
        )
    return st


async def _payload(request: Request) -> tuple[str, bytes, str]:
    """``(name, file bytes, source)`` of a registration request."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_UPLOAD_BYTES + (1 << 16):
        raise RegistryError(413, f"vector file larger than {MAX_UPLOAD_BYTES >> 20} MiB")
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict) or set(body) - {"name", "path"}:
            raise RegistryError(400, 'JSON body must be {"name": ..., "path": ...} (a file in vector_dirs)')
        name = _check_name(body.get("name"))
        path = _allowed_path(body.get("path"))
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise RegistryError(413, f"{path}: larger than {MAX_UPLOAD_BYTES >> 20} MiB")
        return name, path.read_bytes(), str(path)
    if ctype == "multipart/form-data":
        form = await request.form()
        name = _check_name(form.get("name"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RegistryError(400, "multipart upload needs a 'file' field holding the vector file")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        source = f"upload {upload.filename or name!r}"
    else:
        name = _check_name(request.query_params.get("name"))
        data = await request.body()
        source = f"upload {name!r}"
    if len(data) > MAX_UPLOAD_BYTES:
        raise RegistryError(413, f"vector file larger than {MAX_UPLOAD_BYTES >> 20} MiB")
    if not data:
        raise RegistryError(400, "empty upload: send a .safetensors or .gguf vector file")
    return name, data, source


def _not_found(name: str) -> RegistryError:
    return RegistryError(404, f"no steering vector named {name!r}; registered: {registry.names()}")


@router.get(ROUTE)
async def list_vectors(request: Request):
    _state(request)
    return {"object": "list", "data": registry.describe()}


@router.get(ROUTE + "/{name:path}")
async def get_vector(name: str, request: Request):
    _state(request)
    found = registry.describe(name)
    if not found:
        raise _not_found(name)
    return found[0]


@router.post(ROUTE)
async def register_vector(request: Request):
    st = _state(request)
    name, data, source = await _payload(request)
    try:
        vec = read_vector(data, source)
    except SteeringVectorError as e:
        raise RegistryError(400, str(e)) from None
    _check_fits(vec)
    async with st.lock:
        # workers first: a request is stamped with this version only once they hold it
        try:
            await st.engine.collective_rpc("roast_register_vector", args=(name, vec.to_bytes()))
        except Exception as e:  # a worker refused it (checked above, so unexpected)
            raise RegistryError(500, f"the engine refused vector {name!r}: {e}") from None
        registry.add(name, vec, source=source)
    return JSONResponse(status_code=201, content=registry.describe(name)[0])


@router.delete(ROUTE + "/{name:path}")
async def unregister_vector(name: str, request: Request):
    st = _state(request)
    async with st.lock:
        if not registry.remove(name):  # this process first: no new request can name it
            raise _not_found(name)
        await st.engine.collective_rpc("roast_unregister_vector", args=(name,))
    return {"deleted": name}


async def _on_registry_error(request: Request, exc: RegistryError) -> JSONResponse:
    return _error(exc.status, str(exc))


class RegistryPlugin:
    """The endpoint plugin object vLLM instantiates (``vllm.endpoint_plugins``)."""

    name = "roast_vllm"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        # every route reports its RegistryError (status, reason) as vLLM's error body
        app.add_exception_handler(RegistryError, _on_registry_error)

    async def init_state(self, engine_client, state, args) -> None:
        state.roast_registry = _Registry(engine_client, int(getattr(args, "api_server_count", 1) or 1))
