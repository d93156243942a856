"""Helpers shared by the ``roast-vllm`` commands: prompt files, layer lists, scale lists,
the data and engine options of the ROAST commands, engine and pool options from a
command's arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from roast_vllm.engine.args import add_engine_args, kv_cache_bytes

KV_CACHE_HELP = (
    "KV-cache size per engine, GiB (default 1, unless vLLM's --gpu-memory-utilization or "
    "--kv-cache-memory-bytes is given)"
)


def read_prompts(path: str) -> list[str]:
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


def parse_layers(s: str | None) -> list[int] | None:
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


def layers_arg(s: str | None) -> list[int] | None:
    """``parse_layers`` for a ``--layers`` option: a bad list exits with the expected form."""
    try:
        return parse_layers(s)
    except ValueError:
        raise SystemExit(f"error: --layers must look like '8-20' or '3,5,7', got {s!r}") from None


def floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --scales must be comma-separated numbers, got {s!r}") from None


def engine_kwargs_for(args, **ours: Any) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: the command's own settings ``ours``, the KV-cache size
    (``--kv-cache-gib``), then the vLLM options given (those win)."""
    kw = dict(ours)
    nbytes = kv_cache_bytes(getattr(args, "kv_cache_gib", None), args.engine_kwargs)
    if nbytes is not None:
        kw["kv_cache_memory_bytes"] = nbytes
    kw.update(args.engine_kwargs)
    return kw


def add_data(s, task: str | None = None) -> None:
    """``--task`` (unless the command has one ``task``), ``--data``, ``--limit`` and the
    disjoint split's options."""
    from roast_vllm.tasks import TASKS

    if task is None:
        s.add_argument("--task", required=True, choices=TASKS)
    else:
        s.set_defaults(task=task)
    s.add_argument("--data", required=True, help="data file in the format of ../shared/data/")
    s.add_argument("--limit", type=int, default=None, help="read only the first N questions")
    s.add_argument(
        "--split",
        default="all",
        choices=["all", "a", "b"],
        help="disjoint part: a = estimate/tune, b = report",
    )
    s.add_argument("--split-fraction", type=float, default=0.5, help="share of questions in part a")
    s.add_argument("--split-seed", type=int, default=0)


def data_provenance(args) -> dict:
    """The data a command read, for its output's provenance: the file, its sha256 and the
    split of :func:`add_data`'s options."""
    from roast_vllm.tasks import data_hash

    return {
        "data": str(args.data),
        "data_sha256": data_hash(args.data),
        "split": {
            "part": args.split,
            "fraction": args.split_fraction,
            "seed": args.split_seed,
            "limit": args.limit,
        },
    }


def add_engine(s) -> None:
    s.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    s.add_argument(
        "--compile", action="store_true", help="vLLM compile mode (default: eager; starts faster on CPU)"
    )
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--kv-cache-gib", type=float, default=None, help=KV_CACHE_HELP)
    s.add_argument(
        "--workers", type=int, default=1, help="Ray actors, one engine each (0: in-process, no Ray)"
    )
    s.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    s.add_argument("--cpus-per-worker", type=float, default=1.0)
    s.add_argument("--gpus-per-worker", type=float, default=0.0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_args(s)


def engine_options(args, compile_ok: bool = True, seeded: bool = False):
    """Engine and pool options from a command's arguments. ``compile_ok``: False where the
    engine must be eager (activation capture); ``seeded``: whether requests sample with
    their own seeds (``roast_vllm.engine.args.step_bounds``). The vLLM options given go to
    ``EngineOptions.extra`` and win over the command's own settings."""
    from roast_vllm.engine.args import on_cpu
    from roast_vllm.runtime.pool import EngineOptions, PoolOptions

    extra = dict(args.engine_kwargs)
    if not compile_ok and extra.get("enforce_eager") is False:
        raise SystemExit(
            f"error: `roast-vllm {args.command}` captures activations, which needs an eager "
            "engine; drop --no-enforce-eager"
        )
    nbytes = kv_cache_bytes(args.kv_cache_gib, extra)
    eng = EngineOptions(
        model=args.model,
        enforce_eager=not (args.compile and compile_ok),
        max_model_len=args.max_model_len,
        kv_cache_gib=None if nbytes is None else nbytes / (1 << 30),
        seeded=seeded,
        extra=extra,
    )
    pool = PoolOptions(
        workers=args.workers,
        address=args.address,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
    )
    # check the step settings here rather than in every worker (workers with GPUs: not CPU)
    eng.llm_kwargs(cpu=on_cpu() if args.workers == 0 or args.gpus_per_worker == 0 else False)
    return eng, pool
