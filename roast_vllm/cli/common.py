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


# ------------------------------------------------------------ the concept benchmark
#: ``concept eval``'s default families: the first benchmark run's four (every
#: ``concept vectors`` output has them; ``methods.concept.FAMILIES`` lists all)
CONCEPT_METHODS = "roast,roast_ungrouped,roast_residual,caa"
#: ``concept eval``'s default scale sweep for every family
CONCEPT_SCALES = "1,2,4,8"


def add_concept_eval(s, standalone: bool) -> None:
    """The concept benchmark's evaluation options: on ``roast-vllm concept eval``
    (``standalone``) and, as a group for ``--task concept``, on ``roast-vllm eval``."""
    g = s if standalone else s.add_argument_group("--task concept", "the concept-steering benchmark")
    g.add_argument(
        "--vectors",
        required=standalone,
        default=None,
        help="output folder of `roast-vllm concept vectors`" + ("" if standalone else " (--task concept)"),
    )
    g.add_argument("--methods", default=CONCEPT_METHODS, help="vector families to evaluate (subfolders)")
    if standalone:
        g.add_argument("--scales", default=CONCEPT_SCALES, help="scale sweep (part a) for every method")
    g.add_argument(
        "--sweep",
        default=None,
        help="per-method sweeps replacing --scales, e.g. 'roast=0.25,0.5,1;caa=0.1,0.25' "
        "(CAA vectors are raw mean differences)",
    )
    g.add_argument("--layer-sets", default="all;8-20", help="';'-separated layer sets to sweep")
    g.add_argument("--max-steering-slots", type=int, default=256)
    if not standalone:
        g.add_argument("--instructions", type=int, default=24, help="instructions per part")
        g.add_argument(
            "--instructions-pool", type=int, default=400, help="first N instructions split into parts a / b"
        )


def run_concept_eval(args, data_dir: str | None) -> None:
    """The concept benchmark's evaluation (``roast_vllm.tasks.concept_eval``) from a
    command's arguments: the parts with vectors of every method, one engine, the report
    into ``args.out`` (a folder)."""
    import roast_vllm
    from roast_vllm.engine.llm import register_vector, shutdown
    from roast_vllm.engine.model_prep import default_model
    from roast_vllm.tasks.concept import concepts, instructions
    from roast_vllm.tasks.concept_eval import evaluate_concepts, write_report
    from roast_vllm.tasks.concept_judge import ConceptJudge
    from roast_vllm.vector import SteeringVector

    vdir = Path(args.vectors)
    methods = [m for m in args.methods.split(",") if m]
    missing = [m for m in methods if not (vdir / m).is_dir()]
    if missing:
        raise SystemExit(
            f"error: {vdir} has no {missing} folders: make them with `roast-vllm concept vectors`"
        )
    sweeps = {m: floats(args.scales or CONCEPT_SCALES) for m in methods}
    for part in (p for p in (args.sweep or "").split(";") if p.strip()):
        m, _, vals = part.partition("=")
        if m.strip() not in sweeps or not vals:
            raise SystemExit(f"error: --sweep {part!r}: give METHOD=s1,s2,... for one of {methods}")
        sweeps[m.strip()] = floats(vals)
    layer_sets = [x for x in args.layer_sets.split(";") if x]
    parts = {}
    for part in ("a", "b"):
        cs = [
            c
            for c in concepts(part=part)
            if all((vdir / m / f"{c.name}.safetensors").is_file() for m in methods)
        ]
        ins = instructions(data_dir, part=part, limit=args.instructions_pool)[: args.instructions]
        if not cs or not ins:
            raise SystemExit(
                f"error: part {part}: no concepts with vectors of every method, or no instructions"
            )
        parts[part] = (cs, ins)
    eng, _ = engine_options(args, seeded=False)
    kw = eng.llm_kwargs()
    kw["max_steering_slots"] = args.max_steering_slots
    llm = roast_vllm.LLM(eng.model or default_model(), **kw)
    try:
        report, rows_a, rows_b = evaluate_concepts(
            llm,
            register_vector,
            lambda m, c: SteeringVector.load(vdir / m / f"{c}.safetensors"),
            parts,
            methods,
            sweeps,
            layer_sets,
            ConceptJudge(),
            max_tokens=args.max_tokens or 64,
        )
    finally:
        shutdown(llm)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "engine_kwargs", "engine_argv")
        and isinstance(v, (str, int, float, bool, type(None)))
    }
    for line in write_report(report, rows_a, rows_b, args.out, settings):
        print(line)
