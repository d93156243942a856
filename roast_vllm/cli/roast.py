"""ROAST end to end on the command line::

    roast-vllm rollout  --task truthfulqa_mc --data truthfulqa_dev.csv --split a --n 8 --out r.jsonl --workers 2
    roast-vllm estimate --task truthfulqa_mc --data truthfulqa_dev.csv --rollouts r.jsonl --out roast.safetensors
    roast-vllm estimate ... --method caa --out caa.safetensors
    roast-vllm eval     --task truthfulqa_mc --data truthfulqa_dev.csv --split b \\
                        --vector roast.safetensors --scales 0,0.5,1,2 --out results.json
"""

from __future__ import annotations

import json
from pathlib import Path

from roast_vllm.cli.common import (
    add_concept_eval,
    add_data,
    add_engine,
    data_provenance,
    engine_options,
    floats,
    layers_arg,
    run_concept_eval,
)


def cmd_rollout(args) -> None:
    from roast_vllm.runtime.rollout import RolloutConfig, read_records, run_rollouts
    from roast_vllm.tasks import get_task

    cfg = RolloutConfig(
        task=args.task,
        data=args.data,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        shard_size=args.shard_size,
        limit=args.limit,
        split=args.split,
        split_fraction=args.split_fraction,
        split_seed=args.split_seed,
        model=args.model,
        vector=args.vector,
        scale=args.scale,
        layers=layers_arg(args.layers),
        positions=args.positions,
    )
    # every sample carries its own seed (temperature > 0): no chunked prefill on CPU
    eng, pool = engine_options(args, seeded=args.temperature > 0)
    out = run_rollouts(cfg, args.out, eng, pool, overwrite=args.overwrite, progress=not args.quiet)
    rows = read_records(out)
    if not get_task(args.task).has_verifier:
        toks = sum(r["completion_tokens"] for r in rows)
        print(
            f"wrote {out}: {len(rows)} responses ({toks} tokens) to {len({r['qid'] for r in rows})} prompts"
        )
        return
    by_q: dict[str, list[bool]] = {}
    for r in rows:
        by_q.setdefault(r["qid"], []).append(bool(r["correct"]))
    mixed = sum(any(v) and not all(v) for v in by_q.values())
    print(
        f"wrote {out}: {len(rows)} responses to {len(by_q)} questions; "
        f"{sum(sum(v) for v in by_q.values()) / max(len(rows), 1):.3f} correct; "
        f"{sum(any(v) for v in by_q.values())} questions with a correct and "
        f"{sum(not all(v) for v in by_q.values())} with an incorrect response ({mixed} with both)"
    )


def cmd_estimate(args) -> None:
    from roast_vllm.methods.estimate import EstimateOptions, estimate_from_rollouts
    from roast_vllm.runtime.rollout import manifest, read_records
    from roast_vllm.tasks import data_hash, get_task

    if not get_task(args.task).has_verifier:
        raise SystemExit(
            f"error: task {args.task!r} has no verifier, so its rollouts have no correct/incorrect pairs"
        )
    rollouts = read_records(args.rollouts)
    if not rollouts:
        raise SystemExit(f"error: {args.rollouts} has no rollouts")
    qids = {str(r.get("qid")) for r in rollouts}
    questions = [q for q in get_task(args.task).load(args.data) if q.qid in qids]
    if not questions:
        raise SystemExit(
            f"error: none of the {len(qids)} question ids in {args.rollouts} are in {args.data} "
            f"(task {args.task}); estimate with the data file the rollouts were made from"
        )
    opts = EstimateOptions(
        method=args.method,
        site=args.site,
        layers=layers_arg(args.layers),
        css=args.css,
        grouped=not args.no_grouped,
        recss=args.recss,
        reread_weight=args.reread_weight,
        gold_fallback=not args.no_gold_fallback,
        wrong_fallback=not args.no_wrong_fallback,
        max_pairs_per_question=args.max_pairs_per_question,
        seed=args.seed,
        pooling=args.pooling,
    )
    man = manifest(args.rollouts)
    prov = {
        "task": args.task,
        "data": str(args.data),
        "data_sha256": data_hash(args.data),
        "rollouts": str(args.rollouts),
        "rollouts_sha256": data_hash(args.rollouts),
        "n_questions": len(questions),
        "n_rollouts": len(rollouts),
        "rollout_settings": {
            k: man.get(k)
            for k in (
                "n",
                "temperature",
                "top_p",
                "max_tokens",
                "seed",
                "split",
                "split_fraction",
                "split_seed",
                "limit",
            )
        },
    }
    eng, pool = engine_options(args, compile_ok=False)  # capture needs an eager engine
    vec = estimate_from_rollouts(
        questions, rollouts, opts, eng, pool, provenance=prov, progress=not args.quiet
    )
    vec.save(args.out)
    st = vec.provenance["pairs"]
    norms = [round(float(t.norm()), 3) for t in vec.directions.values()]
    print(
        f"wrote {args.out}: {vec.method} at {vec.site}, {len(vec.layers)} layers, dim {vec.hidden_size}; "
        f"{st['pairs']} pairs from {st['used']} of {st['questions']} questions "
        f"(gold fallback {st['gold_fallback']}, known-wrong fallback {st['wrong_fallback']}, "
        f"skipped {st['skipped_no_negative'] + st['skipped_no_positive']}); norms {norms[:4]}..."
    )


def cmd_eval(args) -> None:
    from roast_vllm.runtime.pool import WorkerPool
    from roast_vllm.tasks import select
    from roast_vllm.tasks.evaluate import evaluate
    from roast_vllm.vector import SteeringVector

    if args.task == "concept":
        return _eval_concept(args)
    if args.vectors is not None:
        raise SystemExit("error: --vectors is for --task concept; give one vector with --vector")
    scales = floats(args.scales) if args.scales else [args.scale]
    vec = None
    if args.vector:
        vec = SteeringVector.load(args.vector)
    elif any(s != 0 for s in scales):
        raise SystemExit("error: a nonzero --scale/--scales needs --vector")
    layers = layers_arg(args.layers)
    if vec is not None and layers is not None:
        missing = [l for l in layers if l not in vec.directions]
        if missing:
            raise SystemExit(f"error: --layers {missing} are not in the vector (it has {vec.layers})")
    questions = select(args.task, args.data, args.split, args.split_fraction, args.split_seed, args.limit)
    if not questions:
        raise SystemExit("error: no questions selected")
    eng, pool = engine_options(args)
    with WorkerPool(eng, pool) as wp:
        if vec is not None:
            wp.broadcast("ensure_vector", "eval", vec.to_bytes())
        results = evaluate(
            args.task,
            questions,
            wp,
            scales,
            vector_name="eval" if vec is not None else None,
            layers=layers,
            positions=args.positions,
            max_tokens=args.max_tokens,
            mc=not args.no_mc,
            progress=not args.quiet,
        )
    head = {k: v for k, v in results[0].items() if k != "per_question"}
    doc = {
        "task": args.task,
        **data_provenance(args),
        "vector": str(args.vector) if args.vector else None,
        "vector_method": vec.method if vec is not None else None,
        "vector_site": vec.site if vec is not None else None,
        "layers": layers,
        "positions": args.positions,
        **head,
        "sweep": [{k: v for k, v in r.items() if k != "per_question"} for r in results],
        "per_question": {str(r["scale"]): r["per_question"] for r in results},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    for r in doc["sweep"]:
        line = f"scale {r['scale']:g}: accuracy {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']})"
        if "mc1" in r:
            line += f"  MC1 {r['mc1']:.3f}  MC2 {r['mc2']:.3f}"
        print(line)
    if len(results) > 1:
        png = out.with_suffix(".png")
        plot_sweep(doc, png)
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out}")


def _eval_concept(args) -> None:
    """``eval --task concept``: the concept benchmark (``roast-vllm concept eval``); its
    parts are fixed (tuned on a, reported on b) and every concept has its own vector."""
    given = [
        flag
        for flag, bad in (
            ("--vector", args.vector is not None),
            ("--scale", args.scale != 0.0),
            ("--layers", args.layers is not None),
            ("--split", args.split != "all"),
            ("--limit", args.limit is not None),
        )
        if bad
    ]
    if given:
        raise SystemExit(
            f"error: --task concept does not take {', '.join(given)}: it tunes on part a and reports on "
            "part b, each concept with its own vector from --vectors DIR (`roast-vllm concept vectors`); "
            "sweep with --scales / --sweep and --layer-sets"
        )
    if args.vectors is None:
        raise SystemExit(
            "error: --task concept needs --vectors DIR (the output of `roast-vllm concept vectors`)"
        )
    data = Path(args.data)
    run_concept_eval(args, str(data if data.is_dir() else data.parent))


def plot_sweep(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = doc["sweep"]
    xs = [r["scale"] for r in sw]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, ci in (("accuracy", "ci95"), ("mc1", "mc1_ci95"), ("mc2", "mc2_ci95")):
        if key not in sw[0]:
            continue
        ys = [r[key] for r in sw]
        err = [[y - r[ci][0] for y, r in zip(ys, sw)], [r[ci][1] - y for y, r in zip(ys, sw)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=key)
    ax.set_xlabel("steering scale")
    ax.set_ylabel("score (95% CI)")
    ax.set_title(
        f"{doc['task']}: {doc.get('vector_method') or 'baseline'} ({doc['split']['part']}, n={sw[0]['n']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def add_commands(sub) -> None:
    from roast_vllm.engine.spec import POSITIONS
    from roast_vllm.runtime.jobs import POOLINGS
    from roast_vllm.tasks import TASKS

    s = sub.add_parser("rollout", help="sample n responses per question and verify them (Ray, resumable)")
    add_data(s)
    s.add_argument("--out", required=True, help="output .jsonl or .parquet (shards go to OUT.shards/)")
    s.add_argument("--n", type=int, default=8, help="samples per question")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--max-tokens", type=int, default=None, help="default: the task's")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--shard-size", type=int, default=16, help="questions per checkpointed shard")
    s.add_argument("--overwrite", action="store_true", help="discard finished shards of an earlier run")
    s.add_argument("--vector", default=None, help="steer the rollouts with this vector file")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--layers", default=None, help="steer only these layers of the vector")
    s.add_argument("--positions", default="all", choices=list(POSITIONS))
    add_engine(s)
    s.set_defaults(func=cmd_rollout)

    s = sub.add_parser("estimate", help="ROAST (or CAA) steering vector from rollouts")
    s.add_argument("--task", required=True, choices=TASKS)
    s.add_argument("--data", required=True)
    s.add_argument("--rollouts", required=True, help="output of `roast-vllm rollout`")
    s.add_argument("--out", required=True, help="vector file (.safetensors)")
    s.add_argument("--method", choices=["roast", "caa"], default="roast")
    s.add_argument(
        "--site", choices=["mlp_act", "residual"], default="mlp_act", help="ROAST site (caa: residual)"
    )
    s.add_argument("--layers", default=None, help="e.g. '8-20' (default: all)")
    s.add_argument("--css", choices=["max_norm", "l2", "softmax", "none"], default="max_norm")
    s.add_argument(
        "--no-grouped", action="store_true", help="pool all pairs instead of one vote per question"
    )
    s.add_argument("--recss", action="store_true", help="re-apply CSS to the merged vector")
    s.add_argument(
        "--pooling",
        choices=list(POOLINGS),
        default="last",
        help="a text's activation: its last token (ROC) or the mean over its response tokens",
    )
    s.add_argument("--reread-weight", type=float, default=1.0, help="weight of gold-answer fallback pairs")
    s.add_argument("--no-gold-fallback", action="store_true")
    s.add_argument("--no-wrong-fallback", action="store_true")
    s.add_argument("--max-pairs-per-question", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    add_engine(s)
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser(
        "eval",
        help="greedy accuracy (+ TruthfulQA MC1/MC2), optionally steered / swept; "
        "--task concept: the concept-steering benchmark",
    )
    add_data(s)
    s.add_argument(
        "--out", required=True, help="results .json (a sweep also writes .png); --task concept: a folder"
    )
    s.add_argument("--vector", default=None)
    s.add_argument("--scale", type=float, default=0.0)
    s.add_argument("--scales", default=None, help="comma-separated sweep, e.g. 0,0.5,1,2")
    s.add_argument("--layers", default=None, help="steer only these layers of the vector")
    s.add_argument("--positions", default="last_prompt_and_generated", choices=list(POSITIONS))
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--no-mc", action="store_true", help="skip MC1/MC2 (truthfulqa_mc)")
    add_concept_eval(s, standalone=False)
    add_engine(s)
    s.set_defaults(func=cmd_eval)
