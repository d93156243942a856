"""Quiet by default (``roast_vllm.runtime.quiet``): our output on the terminal, everything
else (descriptor writes, vLLM-style loggers, child processes, warnings) in the log file
whose path is printed; ``--verbose`` shows it all; a failure shows the log's tail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import roast_cli

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from roast_vllm.runtime.quiet import quiet_logs

    with quiet_logs("t", verbose=len(sys.argv) > 2, path=sys.argv[1]) as log:
        print("OUR RESULT")
        os.write(1, b"NOISE fd1\\n")
        os.write(2, b"NOISE fd2\\n")
        # vLLM configures its handler from VLLM_LOGGING_STREAM when first imported
        import logging.config
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
            "handlers": {"h": {"class": "logging.StreamHandler", "stream": os.environ.get("VLLM_LOGGING_STREAM", "ext://sys.stdout")}},
            "loggers": {"fake_vllm": {"handlers": ["h"], "level": "INFO"}}})
        logging.getLogger("fake_vllm").info("NOISE logger")
        subprocess.run([sys.executable, "-c", "print('NOISE child'); import sys; print('NOISE child err', file=sys.stderr)"])
        warnings.warn("NOISE warning")
        from tqdm import tqdm
        for _ in tqdm(range(3), desc="OUR BAR"):
            pass
    print("AFTER", log is not None)
    os.write(1, b"AFTER fd1\\n")
    """
)


def _run(tmp_path, *extra):
    log = tmp_path / "x.log"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log), *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr, log


def test_our_output_on_the_terminal_the_rest_in_the_log(tmp_path):
    seen, log = _run(tmp_path)
    assert "OUR RESULT" in seen and "OUR BAR" in seen and str(log) in seen
    assert "NOISE" not in seen, seen
    text = log.read_text()
    for noise in (
        "NOISE fd1",
        "NOISE fd2",
        "NOISE logger",
        "NOISE child",
        "NOISE child err",
        "NOISE warning",
    ):
        assert noise in text, noise
    # everything is restored afterwards
    assert "AFTER True" in seen and "AFTER fd1" in seen and "AFTER" not in text


def test_verbose_shows_everything(tmp_path):
    seen, log = _run(tmp_path, "--verbose")
    assert "OUR RESULT" in seen and "NOISE fd1" in seen and "NOISE child" in seen and "NOISE logger" in seen
    assert not log.exists()


def test_a_failure_shows_the_log_tail(tmp_path):
    log = tmp_path / "f.log"
    code = (
        "import os\nfrom roast_vllm.runtime.quiet import quiet_logs\n"
        f"with quiet_logs('t', path={str(log)!r}):\n"
        "    os.write(2, b'engine said: the real cause\\n')\n"
        "    raise RuntimeError('boom')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "the real cause" in r.stderr and "boom" in r.stderr and str(log) in r.stderr


@pytest.mark.engine
def test_generate_is_quiet(model_dir, tmp_path):
    """A real command: ``roast-vllm generate`` prints the prompt and its output and the log
    path; vLLM's engine logs (front end and engine core) are in the log only."""
    log = tmp_path / "gen.log"
    args = ["generate", "The capital of France is", "--model", model_dir, "--max-tokens", "4", "--eager"]
    args += ["--kv-cache-gib", "1", "--log-file", str(log)]
    env = {k: v for k, v in os.environ.items() if k != "ROAST_VLLM_VERBOSE"}
    r = subprocess.run(roast_cli(*args), capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = r.stdout + r.stderr
    assert "=== The capital of France is" in seen and str(log) in seen
    assert "INFO" not in seen and "EngineCore" not in seen, seen[-3000:]
    text = log.read_text()
    assert "INFO" in text and "EngineCore" in text


@pytest.mark.engine
def test_roast_vllm_serve_is_quiet_says_when_ready_and_stops_on_ctrl_c(model_dir, tmp_path):
    """``roast-vllm serve`` runs the stock server with its output in the log: it prints the
    command, the log path and one line when the server answers (URL, vectors, registry
    route); the server steers and lists the vector; Ctrl-C stops it cleanly."""
    import json
    import signal
    import socket
    import time
    import urllib.request

    from roast_vllm import SteeringVector

    vec = SteeringVector.random(30, 576, seed=0).save(tmp_path / "v.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    args = ["serve", "--model", model_dir, "--vector", f"v={vec}", "--log-file", str(log), "--"]
    args += [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(1 << 30),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("ROAST_VLLM_VERBOSE", "ROAST_VLLM_CONFIG")}
    proc = subprocess.Popen(
        roast_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready in"):
            break
    assert lines and lines[-1].startswith("ready in"), "".join(lines) + log.read_text()[-3000:]
    base = f"http://127.0.0.1:{port}"
    assert f"{base}/v1/steering/vectors" in lines[-1] and "vectors: v" in lines[-1]
    with urllib.request.urlopen(base + "/v1/steering/vectors", timeout=30) as r:
        assert [e["name"] for e in json.loads(r.read())["data"]] == ["v"]
    body = {"model": model_dir, "prompt": "Hi", "max_tokens": 4, "vllm_xargs": {"steer_vector": "v"}}
    req = urllib.request.Request(
        base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    seen = "".join(lines) + rest
    assert proc.returncode == 0 and "server stopped" in rest, seen
    assert str(log) in seen and "INFO" not in seen, seen
    assert "INFO" in log.read_text()
