"""The concept-steering benchmark on the command line (``roast_vllm.tasks.concept``)::

    roast-vllm concept vectors --out results/concept/vectors --instructions 24 --workers 2
    roast-vllm concept eval --vectors results/concept/vectors --out results/concept/eval

``vectors``: rollouts of every concept prompt and of part a's instructions (one job set on
the Ray workers), the judge's labels (threshold chosen on part a's concepts), then per
concept a ROAST vector (``mlp_act``, grouped), an ungrouped one, a residual one, and CAA
from prompts (``roast_vllm.methods.concept``). Files: ``<method>/<concept>.safetensors``,
``labels.json``.

``eval``: one engine, every concept x instruction x condition as a request in one batch
(``roast_vllm.tasks.concept_eval``); per method the scale / layers with the best
aggregate on part a, reported on part b (held-out concepts and instructions) with
intervals over concepts and paired comparisons; table, CSV, PNG.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from roast_vllm.cli.common import add_engine, engine_options, floats, layers_arg

#: ``roast-vllm concept vectors`` methods: name -> EstimateOptions fields (CAA: from prompts)
METHODS = {
    "roast": {"method": "roast", "site": "mlp_act", "grouped": True},
    "roast_ungrouped": {"method": "roast", "site": "mlp_act", "grouped": False},
    "roast_residual": {"method": "roast", "site": "residual", "grouped": True},
    "caa": None,
}


def cmd_vectors(args) -> None:
    from roast_vllm.engine.model_prep import default_model, model_dims
    from roast_vllm.methods.concept import caa_vectors, label_rollouts, roast_vectors, sample_rollouts
    from roast_vllm.methods.estimate import EstimateOptions
    from roast_vllm.runtime.pool import WorkerPool
    from roast_vllm.tasks.concept import concepts, instructions
    from roast_vllm.tasks.concept_judge import ConceptJudge

    cs = _concepts(args.concepts)
    ins = instructions(args.data_dir, part="a", limit=args.instructions_pool)[: args.instructions]
    tune = {c.name for c in concepts(part="a")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model()
    layers = layers_arg(args.caa_layers)
    eng, pool = engine_options(args, compile_ok=False, seeded=True)
    judge = ConceptJudge()
    with WorkerPool(eng, pool) as wp:
        ro = sample_rollouts(cs, ins, wp, n=args.n, max_tokens=args.max_tokens, seed=args.seed)
        # the verifier's threshold from part a's concepts only, then applied to every concept
        cs_a = [c for c in cs if c.name in tune] or cs
        labels = label_rollouts(judge, cs, ins, ro, tune=[c.name for c in cs_a])
        print(
            f"judge threshold {labels.threshold:.3f} (balanced accuracy {labels.balanced_accuracy:.3f}); "
            f"kept {labels.counts['on_kept']}/{labels.counts['on_total']} on-concept, "
            f"{labels.counts['off_kept']}/{labels.counts['off_total']} off-concept",
            flush=True,
        )
        made = {}
        for name, fields in METHODS.items():
            if fields is None:
                vecs = caa_vectors(cs, ins, wp, model_dims(model)["num_layers"], layers, str(model))
            else:
                vecs = roast_vectors(
                    cs, ins, labels, EstimateOptions(**fields), eng, wp, progress=not args.quiet
                )
            (out / name).mkdir(exist_ok=True)
            for c, v in vecs.items():
                v.save(out / name / f"{c}.safetensors")
            made[name] = sorted(vecs)
            print(f"{name}: {len(vecs)} of {len(cs)} concepts", flush=True)
    (out / "labels.json").write_text(
        json.dumps(
            {
                "threshold": labels.threshold,
                "balanced_accuracy": labels.balanced_accuracy,
                "counts": labels.counts,
                "concepts": [c.name for c in cs],
                "tune_concepts": sorted(c.name for c in cs_a),
                "instructions": [i.qid for i in ins],
                "vectors": made,
                "rollouts": {"concept": ro.concept, "instruction": ro.instruction, "baseline": ro.baseline},
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


def _concepts(n: int | None):
    """Every concept, or the first ``n`` taken alternately from parts a and b (so a smoke
    run has concepts to tune on and to report on)."""
    from roast_vllm.tasks.concept import concepts

    if not n:
        return concepts()
    a, b = concepts(part="a"), concepts(part="b")
    mixed = [x for pair in zip(a, b) for x in pair] + a[len(b) :] + b[len(a) :]
    return mixed[:n]


def cmd_eval(args) -> None:
    import roast_vllm
    from roast_vllm.engine.llm import register_vector, shutdown
    from roast_vllm.tasks.concept import concepts, instructions
    from roast_vllm.tasks.concept_eval import (
        METRICS,
        Condition,
        generate_rows,
        grade_rows,
        markdown_table,
        paired,
        plot,
        summarize,
        tune,
    )
    from roast_vllm.tasks.concept_judge import ConceptJudge
    from roast_vllm.vector import SteeringVector

    vdir = Path(args.vectors)
    methods = [m for m in args.methods.split(",") if m]
    sweeps = {m: floats(args.scales) for m in methods}
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
        ins = instructions(args.data_dir, part=part, limit=args.instructions_pool)[: args.instructions]
        if not cs or not ins:
            raise SystemExit(
                f"error: part {part}: no concepts with vectors of every method, or no instructions"
            )
        parts[part] = (cs, ins)
    eng, _ = engine_options(args, seeded=False)
    kw = eng.llm_kwargs()
    kw["max_steering_slots"] = args.max_steering_slots
    from roast_vllm.engine.model_prep import default_model

    llm = roast_vllm.LLM(eng.model or default_model(), **kw)
    judge = ConceptJudge()
    doc = {"settings": vars_of(args), "runs": {}}
    try:
        for m in methods:
            for c in parts["a"][0] + parts["b"][0]:
                register_vector(llm, f"{m}/{c.name}", SteeringVector.load(vdir / m / f"{c.name}.safetensors"))
        name = lambda m, c: f"{m}/{c}"  # noqa: E731
        sweep = [Condition("unsteered"), Condition("prompting")]
        sweep += [Condition(m, s, ls) for m in methods for s in sweeps[m] for ls in layer_sets]
        cs, ins = parts["a"]
        rows_a, stats_a = generate_rows(llm, cs, ins, sweep, name, args.max_tokens)
        rows_a = grade_rows(judge, rows_a, cs, ins, stats_a.pop("baseline"))
        best = tune(rows_a, methods)
        print(
            f"tuned on part a ({stats_a['steering_configurations']} configurations, {stats_a['requests']} requests): {best}",
            flush=True,
        )
        chosen = [Condition("unsteered"), Condition("prompting")]
        chosen += [Condition.from_key(key) for key in best.values()]
        cs, ins = parts["b"]
        rows_b, stats_b = generate_rows(llm, cs, ins, chosen, name, args.max_tokens)
        rows_b = grade_rows(judge, rows_b, cs, ins, stats_b.pop("baseline"))
    finally:
        shutdown(llm)
    summary_a, summary_b = summarize(rows_a), summarize(rows_b)
    order = [c.key for c in chosen]
    comparisons = [
        paired(rows_b, order[k], b) for k in range(2, len(order)) for b in ("unsteered", "prompting")
    ]
    keys = order[2:]
    comparisons += [
        paired(rows_b, keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys))
    ]
    doc["runs"] = {"a": stats_a, "b": stats_b}
    doc.update(tuned=best, summary_a=summary_a, summary_b=summary_b, comparisons=comparisons)
    doc["concepts"] = {p: [c.name for c in parts[p][0]] for p in parts}
    doc["instructions"] = {p: [i.qid for i in parts[p][1]] for p in parts}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concept.json").write_text(json.dumps({**doc, "rows_b": rows_b}, indent=1))
    with open(out / "concept.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "concepts", *[f"{m}{x}" for m in METRICS for x in ("", "_lo", "_hi")]])
        for k in order:
            s = summary_b[k]
            w.writerow([k, s["concepts"], *[v for m in METRICS for v in (s[m], *s[m + "_ci95"])]])
    table = markdown_table(summary_b, order)
    (out / "concept.md").write_text(table + "\n")
    plot(summary_b, order, out / "concept.png")
    print(table)
    for cmp in comparisons:
        print(
            f"{cmp['a']} - {cmp['b']}: {cmp['mean_diff']:+.3f} [{cmp['ci95'][0]:+.3f}, {cmp['ci95'][1]:+.3f}] "
            f"({cmp['wins']}/{cmp['losses']}/{cmp['ties']} concepts, sign test p={cmp['p_sign']:.3g})"
        )
    print(f"wrote {out}/concept.{{json,csv,md,png}}")


def vars_of(args) -> dict:
    return {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "engine_kwargs", "engine_argv")
        and isinstance(v, (str, int, float, bool, type(None)))
    }


def add_commands(sub) -> None:
    c = sub.add_parser(
        "concept", help="concept-steering benchmark: vectors per concept, AxBench-style evaluation"
    )
    csub = c.add_subparsers(dest="concept_command", required=True)

    def common(s):
        s.add_argument(
            "--data-dir", default=None, help="folder with gsm8k_train.jsonl and truthfulqa_dev.csv"
        )
        s.add_argument("--instructions", type=int, default=24, help="instructions per part")
        s.add_argument(
            "--instructions-pool", type=int, default=400, help="first N instructions split into parts a / b"
        )
        s.add_argument(
            "--concepts", type=int, default=None, help="N concepts only, half from each part (smoke runs)"
        )
        s.add_argument("--max-tokens", type=int, default=64)

    s = csub.add_parser("vectors", help="rollouts, judge labels, ROAST and CAA vectors for every concept")
    common(s)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--caa-layers", default=None, help="CAA layers (default: all)")
    add_engine(s)
    s.set_defaults(func=cmd_vectors)

    s = csub.add_parser(
        "eval", help="every concept x instruction x condition in one engine run; table, CSV, PNG"
    )
    common(s)
    s.add_argument("--vectors", required=True, help="output folder of `roast-vllm concept vectors`")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--methods", default="roast,roast_ungrouped,roast_residual,caa")
    s.add_argument("--scales", default="1,2,4,8", help="scale sweep (part a) for every method")
    s.add_argument(
        "--sweep",
        default=None,
        help="per-method sweeps replacing --scales, e.g. 'roast=0.25,0.5,1;caa=0.1,0.25' "
        "(CAA vectors are raw mean differences)",
    )
    s.add_argument("--layer-sets", default="all;8-20", help="';'-separated layer sets to sweep")
    s.add_argument("--max-steering-slots", type=int, default=256)
    add_engine(s)
    s.set_defaults(func=cmd_eval)
