"""The concept-steering benchmark on the command line (``roast_vllm.tasks.concept``)::

    roast-vllm concept vectors --out results/concept/vectors --instructions 24 --workers 2
    roast-vllm concept eval --vectors results/concept/vectors --out results/concept/eval

``vectors``: rollouts of every concept prompt and of part a's instructions (one job set on
the Ray workers), the judge's labels (threshold chosen on part a's concepts), then per
concept a ROAST vector (``mlp_act``, grouped), an ungrouped one, a residual one, and CAA
from prompts (``roast_vllm.methods.concept``). Files: ``<method>/<concept>.safetensors``,
``labels.json``.

``eval`` (also ``roast-vllm eval --task concept --data DATA_DIR --vectors DIR --out DIR``):
one engine, every concept x instruction x condition as a request in one batch
(``roast_vllm.tasks.concept_eval``); per method the scale / layers with the best
aggregate on part a, reported on part b (held-out concepts and instructions) with
intervals over concepts and paired comparisons; table, CSV, PNG, and part a's sweep.
"""

from __future__ import annotations

import json
from pathlib import Path

from roast_vllm.cli.common import (
    add_concept_eval,
    add_engine,
    engine_options,
    layers_arg,
    run_concept_eval,
)


def cmd_vectors(args) -> None:
    from roast_vllm.methods.concept import FAMILIES, concept_vectors, label_rollouts, sample_rollouts
    from roast_vllm.methods.estimate import EstimateOptions
    from roast_vllm.runtime.pool import WorkerPool
    from roast_vllm.tasks.concept import concepts, instructions
    from roast_vllm.tasks.concept_judge import ConceptJudge

    cs = _concepts(args.concepts)
    ins = instructions(args.data_dir, part="a", limit=args.instructions_pool)[: args.instructions]
    tune = {c.name for c in concepts(part="a")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in FAMILIES]
    if unknown or not methods:
        raise SystemExit(f"error: --methods {unknown or args.methods!r}: choose from {list(FAMILIES)}")
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
        chosen = {m: (None if FAMILIES[m] is None else EstimateOptions(**FAMILIES[m])) for m in methods}
        vecs = concept_vectors(cs, ins, labels, chosen, eng, wp, caa_layers=layers, progress=not args.quiet)
    made = {}
    for name, by_concept in vecs.items():
        (out / name).mkdir(exist_ok=True)
        for c, v in by_concept.items():
            v.save(out / name / f"{c}.safetensors")
        made[name] = sorted(by_concept)
        print(f"{name}: {len(by_concept)} of {len(cs)} concepts", flush=True)
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
    run_concept_eval(args, args.data_dir)


def add_commands(sub) -> None:
    from roast_vllm.methods.concept import FAMILIES

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
    s.add_argument(
        "--methods",
        default=",".join(FAMILIES),
        help=f"vector families to make, from {list(FAMILIES)} (one capture job set for all)",
    )
    add_engine(s)
    s.set_defaults(func=cmd_vectors)

    s = csub.add_parser(
        "eval", help="every concept x instruction x condition in one engine run; table, CSV, PNG"
    )
    common(s)
    s.add_argument("--out", required=True, help="output folder")
    add_concept_eval(s, standalone=True)
    add_engine(s)
    s.set_defaults(func=cmd_eval)
