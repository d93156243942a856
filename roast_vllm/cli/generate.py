"""``roast-vllm generate``: generate, optionally steered, or both side by side."""

from __future__ import annotations

import json
from pathlib import Path

from roast_vllm.cli.common import KV_CACHE_HELP, engine_kwargs_for, parse_layers, read_prompts
from roast_vllm.engine.args import add_engine_args, step_bounds
from roast_vllm.tasks import chat_prompts


def cmd_generate(args) -> None:
    from vllm import SamplingParams

    import roast_vllm
    from roast_vllm.engine.model_prep import default_model

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise SystemExit("error: give a prompt, several, or --prompts-file FILE")
    vectors = _named_vectors(args.vector or [])
    if args.compare and not vectors:
        raise SystemExit("error: --compare needs --vector")
    if args.steer and not vectors:
        raise SystemExit("error: --steer combines vectors given with --vector NAME=PATH")
    if len(vectors) > 1 and not args.steer:
        raise SystemExit(
            "error: several --vector files: say how to combine them with --steer, e.g. "
            f"--steer '{','.join(f'{n}:1.0' for n in vectors)}'"
        )
    steer = None
    if args.steer:
        steer = {"steer_vectors": args.steer, "steer_positions": args.positions}
    elif vectors:
        steer = {
            "steer_vector": next(iter(vectors)),
            "steer_scale": args.scale,
            "steer_positions": args.positions,
        }
        if args.layers:
            steer["steer_layers"] = parse_layers(args.layers)
    if steer is not None:  # the request's form, before an engine starts for it
        from roast_vllm.engine.spec import SteeringRequestError, parse_steer_args

        try:
            parse_steer_args(steer)
        except SteeringRequestError as e:
            raise SystemExit(f"error: {e}") from None
    model = args.model or default_model()
    kw = engine_kwargs_for(args, max_model_len=args.max_model_len, seed=args.seed)
    if args.eager:
        kw.setdefault("enforce_eager", True)
    # only requests that sample (temperature > 0) use their seed; greedy ones are unseeded
    kw = step_bounds(kw, seeded=args.temperature > 0)
    llm = roast_vllm.LLM(model, vectors=vectors or None, **kw)
    if args.chat:
        prompts_in = chat_prompts(llm.get_tokenizer(), prompts)
    else:
        prompts_in = prompts
    base = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
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
            how = args.steer or f"scale {args.scale}"
            print(
                f"=== {p}\n--- unsteered\n{rec['unsteered'].strip()}\n--- steered ({how})\n{rec['steered'].strip()}\n"
            )
        else:
            rec = {"prompt": p, "output": outs[i].outputs[0].text}
            print(f"=== {p}\n{rec['output'].strip()}\n")
        records.append(rec)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {args.out}")


def _named_vectors(items: list[str]) -> dict[str, str]:
    """``--vector`` values, ``NAME=PATH`` or ``PATH`` (named after the file's stem)."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        name, path = (name, path) if eq else (Path(item).stem, item)
        if name in out:
            raise SystemExit(f"error: two --vector files named {name!r}; write NAME=PATH")
        out[name] = path
    return out


def add_commands(sub) -> None:
    from roast_vllm.engine.spec import POSITIONS

    s = sub.add_parser("generate", help="generate, optionally steered, or --compare both")
    s.add_argument("prompt", nargs="*")
    s.add_argument("--prompts-file", default=None)
    s.add_argument("--model", default=None)
    s.add_argument(
        "--vector",
        action="append",
        default=None,
        help="a vector file (.safetensors or llama.cpp/repeng .gguf), as PATH or NAME=PATH; repeat to combine",
    )
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument(
        "--steer",
        default=None,
        help="combine the --vector files: 'happy:0.5,sad:-0.3@8-20' (name:scale@layers, comma separated)",
    )
    s.add_argument("--layers", default=None, help="e.g. '8-20' (default: every layer of the vector)")
    s.add_argument("--positions", default="all", choices=list(POSITIONS))
    s.add_argument("--compare", action="store_true", help="print unsteered and steered side by side")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat", action="store_true", help="apply the chat template")
    s.add_argument("--eager", action="store_true", help="enforce_eager (faster start, slower steps)")
    s.add_argument("--kv-cache-gib", type=float, default=None, help=KV_CACHE_HELP)
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--out", default=None, help="also write JSONL here")
    add_engine_args(s)
    s.set_defaults(func=cmd_generate)
