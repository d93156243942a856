"""Online serving: `roast-vllm serve`, which runs stock `vllm serve MODEL
--additional-config '{"roast": {...}}'` and nothing else of ours (the plugin switches
steering on from that entry), steers per request through `vllm_xargs`, rejects bad
steering with HTTP 400, and keeps serving. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import roast_cli

from roast_vllm import SteeringVector

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    vec = tmp_path_factory.mktemp("vec") / "rnd.safetensors"
    SteeringVector.random(30, 576, seed=0).save(vec)
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc = subprocess.Popen(
        roast_cli(
            "serve",
            "--model",
            model_dir,
            "--vector",
            f"rnd={vec}",
            "--max-steering-slots",
            "8",
            "--",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # no --enforce-eager: vLLM's default compile mode, what `vllm serve` users get
            "--kv-cache-memory-bytes",
            str(1 << 30),
            "--max-model-len",
            "1024",
            "--seed",
            "0",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # a compiled engine start: ~2 min here, more on slow CPUs
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        raise TimeoutError(f"server did not come up; see {log.name}")
    yield base, model_dir, log.name
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def complete(base, model, xargs=None, prompt="Q: What is 12 + 30? A:"):
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return _post(base + "/v1/completions", body)


def test_server_runs_in_compile_mode(server):
    """The served engine is compiled (vLLM's default), not eager: steering above holds there."""
    _, _, log = server
    text = open(log).read()
    assert "enforce_eager=False" in text or "torch.compile" in text, text[-2000:]
    assert "enforce_eager=True" not in text


def test_serve_steers_per_request_and_rejects_bad_steering(server):
    base, model, _ = server
    code, plain = complete(base, model)
    assert code == 200
    code, steered = complete(base, model, {"steer_vector": "rnd", "steer_scale": 6.0})
    assert code == 200 and steered["choices"][0]["text"] != plain["choices"][0]["text"]
    # vllm_xargs arrive as strings / lists: "3,4" layer lists and numeric strings work
    code, _ = complete(base, model, {"steer_vector": "rnd", "steer_scale": "2.5", "steer_layers": "3,4"})
    assert code == 200
    for bad, msg in [
        ({"steer_vector": "nope"}, "unknown steering vector"),
        ({"steer_vector": "rnd", "steer_layers": [31]}, "out of range"),
        ({"steer_vector": "rnd", "steer_positions": "middle"}, "not one of"),
        ({"steer_vector": "rnd", "steer_scale": "nan"}, "finite"),
    ]:
        code, err = complete(base, model, bad)
        assert code == 400, (bad, code, err)
        assert msg in json.dumps(err), err
    # concurrent good and bad requests: the bad ones fail alone
    jobs = [None, {"steer_vector": "rnd", "steer_scale": 6.0}, {"steer_vector": "nope"}] * 3
    with ThreadPoolExecutor(9) as pool:
        codes = [c for c, _ in pool.map(lambda x: complete(base, model, x), jobs)]
    assert codes == [200, 200, 400] * 3
    code, again = complete(base, model)
    assert code == 200 and again["choices"][0]["text"] == plain["choices"][0]["text"]


def test_nastiest_requests_get_400_and_the_server_keeps_serving(server, tmp_path):
    """Through the ``openai`` client: values that once passed validation and then
    overflowed a tensor write in the engine core (killing every request), keys internal to
    roast-vllm, and steering with beam search (which vLLM runs without vllm_xargs, so it
    answered 200 unsteered). Each is refused with 400 naming the key; the engine is alive
    and steers as before afterwards."""
    import openai

    base, model, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

    def ask(xargs=None, **kw):
        body = {"vllm_xargs": xargs} if xargs is not None else {}
        r = client.completions.create(
            model=model,
            prompt="Q: What is 12 + 30? A:",
            max_tokens=8,
            temperature=0.0,
            extra_body={**body, **kw},
        )
        return r.choices[0].text

    steered = ask({"steer_vector": "rnd", "steer_scale": 6.0})
    for xargs, extra, key in [
        ({"steer_vector": "rnd", "steer_scale": 1e39}, {}, "steer_scale"),
        ({"steer_vector": "rnd", "steer_start": "99999999999999999999"}, {}, "steer_start"),
        ({"steer_vector": "rnd", "steer_start": 5000}, {}, "steer_start"),  # > max-model-len
        ({"steer_vector": "rnd", "steer_layers": "Infinity"}, {}, "steer_layers"),
        ({"roast_capture": "grab"}, {}, "roast_capture"),
        ({"roast_vector_digest": "0123456789abcdef"}, {}, "roast_vector_digest"),
        ({"steer_vector": "rnd", "steer_scale": 6.0}, {"use_beam_search": True, "n": 2}, "use_beam_search"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(xargs, **extra)
        assert key in str(e.value), (xargs, str(e.value))
    # beam search without steering still works, and steering is unchanged
    assert isinstance(ask(None, use_beam_search=True, n=2), str)
    assert ask({"steer_vector": "rnd", "steer_scale": 6.0}) == steered
