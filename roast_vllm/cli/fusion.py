"""Fusion Steering on the command line::

    roast-vllm fusion references --data truthfulqa_dev.csv --split a --out refs.safetensors --workers 2
    roast-vllm fusion search --data truthfulqa_dev.csv --split a --references refs.safetensors \\
                             --trials 5 --mode segmented --out search.json --storage search.journal
    roast-vllm fusion eval --data truthfulqa_dev.csv --references refs.safetensors --out results/fusion/eval

Questions are TruthfulQA rows (question as the prompt, best answer as the ground truth).
References are built on the Ray workers (each an eager engine: the capture needs one), one
shard of questions per job; the search shards prompts over the workers, every round of a
shard one batch on its engine, all studies in one resumable Optuna journal.

``eval`` (``roast_vllm.tasks.fusion_eval``): on part ``--split`` (default b) the unsteered
baseline and, per mode, each question's own search then its answer with the best
coefficients, judged by an independent embedding model; ``--skip-first auto`` picks the
``skip_first`` setting per mode on ``--tune-split`` (default a) first. The references must
cover both parts (``fusion references --split all``).
"""

from __future__ import annotations

import json
from pathlib import Path

from roast_vllm.cli.common import add_data, add_engine, data_provenance, engine_options

TASK = "truthfulqa_mc"


def _questions(args):
    from roast_vllm.tasks import select

    qs = select(TASK, args.data, args.split, args.split_fraction, args.split_seed, args.limit)
    if not qs:
        raise SystemExit("error: no questions selected")
    return qs


def _shards(items: list, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


def cmd_references(args) -> None:
    import torch
    from tqdm import tqdm

    from roast_vllm.methods.fusion import ReferenceSet
    from roast_vllm.runtime.pool import WorkerPool

    qs = _questions(args)
    items = [(q.qid, q.question, q.best_answer) for q in qs]
    eng, pool = engine_options(args, compile_ok=False)  # the capture needs an eager engine
    shards = _shards(items, max(args.workers, 1) * 4)
    got: dict[str, tuple] = {}
    with WorkerPool(eng, pool) as wp:
        jobs = [
            (i, "roast_vllm.methods.fusion:references_job", (s, args.explain_tokens))
            for i, s in enumerate(shards)
        ]
        bar = tqdm(total=len(items), desc="references", unit="question", disable=args.quiet)
        for _, r in wp.run(jobs):
            for j, qid in enumerate(r["ids"]):
                got[qid] = (r["vectors"][j], r["explanations"][qid])
            bar.update(len(r["ids"]))
        bar.close()
    ids = [qid for qid, _, _ in items]
    prov = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        **data_provenance(args),
        "explain_tokens": args.explain_tokens,
        "decoding": "greedy",
        "explanations": {qid: got[qid][1] for qid in ids},
    }
    refs = ReferenceSet(ids, torch.stack([got[qid][0] for qid in ids]), prov)
    refs.save(args.out)
    print(
        f"wrote {args.out}: {len(ids)} questions x {refs.vectors.shape[1]} layers x {refs.vectors.shape[2]}"
    )


def _check_covered(refs, qids, path) -> None:
    missing = [k for k in qids if k not in refs.ids]
    if missing:
        raise SystemExit(
            f"error: {len(missing)} selected questions have no reference in {path} "
            f"(e.g. {missing[:3]}); build references with the same --data/--limit and a "
            "--split that covers them (--split all covers both parts)"
        )


def _broadcast_references(wp, refs, qids) -> None:
    for qid in qids:  # every worker gets every prompt's reference, once
        wp.broadcast("ensure_vector", f"ref/{qid}", refs.vector(qid).to_bytes())


def _items(qs) -> dict[str, tuple[str, str]]:
    """``{qid: (question, best answer)}``: what the search and the answers take."""
    return {q.qid: (q.question, q.best_answer) for q in qs}


def _sharded(wp, job: str, items: dict, workers: int, job_args) -> dict[str, dict]:
    """Run ``job`` on the pool over one shard of ``items`` per worker
    (``job_args(shard)``: the job's arguments) and merge the per-key results."""
    jobs = [(i, job, job_args(shard)) for i, shard in enumerate(_shards(list(items), max(workers, 1)))]
    out: dict[str, dict] = {}
    for _, r in wp.run(jobs):
        out.update(r)
    return out


def _search(wp, items: dict, args, mode: str, skip_first: bool, storage, prefix: str) -> dict[str, dict]:
    """The per-prompt search of ``items`` (``{qid: (question, best answer)}``) on the
    pool: one shard of prompts per worker, every round of a shard one batch."""
    return _sharded(
        wp,
        "roast_vllm.methods.fusion_search:search_job",
        items,
        args.workers,
        lambda shard: (
            {k: items[k] for k in shard},
            "ref",
            args.trials,
            mode,
            storage,
            args.seed,
            args.max_tokens,
            skip_first,
            prefix,
        ),
    )


def _answers(wp, items: dict, params: dict, args, skip_first: bool, min_tokens: int = 0) -> dict[str, dict]:
    """One greedy answer per question with its parameters (None: unsteered), sharded."""
    return _sharded(
        wp,
        "roast_vllm.methods.fusion_search:answers_job",
        items,
        args.workers,
        lambda shard: (
            {k: items[k] for k in shard},
            "ref",
            {k: params[k] for k in shard},
            args.max_tokens,
            skip_first,
            min_tokens,
        ),
    )


def cmd_search(args) -> None:
    from roast_vllm.methods.fusion import ReferenceSet
    from roast_vllm.runtime.pool import WorkerPool

    refs = ReferenceSet.load(args.references)
    items = _items(_questions(args))
    _check_covered(refs, items, args.references)
    eng, pool = engine_options(args)
    storage = str(Path(args.storage).resolve()) if args.storage else None
    with WorkerPool(eng, pool) as wp:
        _broadcast_references(wp, refs, items)
        best = _search(wp, items, args, args.mode, args.skip_first, storage, "fusion")
    doc = {
        "references": str(args.references),
        "mode": args.mode,
        "trials": args.trials,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "skip_first": args.skip_first,
        "best": best,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    vals = [b["value"] for b in best.values() if b["value"] is not None]
    print(f"wrote {out}: {len(best)} prompts, mean best objective {sum(vals) / max(len(vals), 1):.3f}")


def cmd_eval(args) -> None:
    import csv

    from tqdm import tqdm

    from roast_vllm.methods.fusion import ReferenceSet
    from roast_vllm.runtime.pool import WorkerPool
    from roast_vllm.tasks import fusion_eval as fe
    from roast_vllm.tasks import select
    from roast_vllm.tasks.judge import EmbeddingJudge

    refs = ReferenceSet.load(args.references)
    report_qs = _questions(args)
    tune = args.skip_first == "auto"
    tune_qs = (
        select(TASK, args.data, args.tune_split, args.split_fraction, args.split_seed, args.limit)
        if tune
        else []
    )
    if tune and {q.qid for q in tune_qs} & {q.qid for q in report_qs}:
        raise SystemExit("error: --tune-split and --split overlap; tune on one part, report on the other")
    if tune and not tune_qs:
        raise SystemExit(f"error: no questions in --tune-split {args.tune_split}")
    _check_covered(refs, [q.qid for q in tune_qs + report_qs], args.references)
    judge = EmbeddingJudge()
    judge.embed(["load the judge before the engine starts"])  # a missing extra fails here, fast
    modes = [m for m in args.modes.split(",") if m]
    from roast_vllm.methods.fusion_search import MODES

    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"error: --modes takes a comma list of {MODES}, got {args.modes!r}")

    if not 0 <= args.baseline_min_tokens <= args.max_tokens:
        raise SystemExit(
            f"error: --baseline-min-tokens {args.baseline_min_tokens} must be in 0..--max-tokens "
            f"({args.max_tokens})"
        )

    eng, pool = engine_options(args)
    storage = str(Path(args.storage).resolve()) if args.storage else None
    stages = (2 * len(modes) if tune else 0) + 1 + bool(args.baseline_min_tokens) + len(modes)
    bar = tqdm(total=stages, desc="fusion eval", unit="stage", disable=args.quiet)
    tuning, chosen, rows_of = [], {}, {}

    def condition(qs, part, mode, skip):
        items = _items(qs)
        best = _search(wp, items, args, mode, skip, storage, f"eval-{part}-skip{int(skip)}")
        params = {k: best[k]["params"] for k in items if best[k]["params"] is not None}
        rows = _answers(wp, {k: items[k] for k in params}, params, args, skip)
        for k, r in rows.items():
            r["params"] = params[k]
        bar.update(1)
        return fe.judge_rows(rows, qs, judge)

    with WorkerPool(eng, pool) as wp:
        _broadcast_references(wp, refs, [q.qid for q in tune_qs + report_qs])
        for mode in modes:
            if not tune:
                chosen[mode] = args.skip_first == "on"
                continue
            scored = {}
            for skip in (False, True):
                bar.set_postfix_str(f"tune {mode} skip_first={skip}")
                s = fe.summarize(condition(tune_qs, args.tune_split, mode, skip))
                tuning.append({"mode": mode, "skip_first": skip, **s})
                scored[skip] = (s["accuracy"], s["composite"])
            chosen[mode] = scored[True] > scored[False]
        bar.set_postfix_str("baseline")
        items = _items(report_qs)
        base_rows = _answers(wp, items, dict.fromkeys(items), args, False)
        rows_of["baseline"] = fe.judge_rows(base_rows, report_qs, judge)
        bar.update(1)
        if args.baseline_min_tokens:  # a baseline that cannot go silent (see fusion_eval)
            bar.set_postfix_str("answering baseline")
            rows = _answers(wp, items, dict.fromkeys(items), args, False, args.baseline_min_tokens)
            rows_of[fe.ANSWERING] = fe.judge_rows(rows, report_qs, judge)
            bar.update(1)
        for mode in modes:
            bar.set_postfix_str(f"{mode} skip_first={chosen[mode]}")
            rows_of[mode] = condition(report_qs, args.split, mode, chosen[mode])
    bar.close()

    base = rows_of["baseline"]
    report = {"baseline": fe.summarize(base)}
    answering = rows_of.get(fe.ANSWERING)
    if answering is not None:
        report[fe.ANSWERING] = fe.summarize(answering, base)
    for mode in modes:
        keys = rows_of[mode]
        report[mode] = fe.summarize(keys, {k: base[k] for k in keys})
        if answering is not None:
            report[mode]["vs_answering"] = fe.paired(keys, {k: answering[k] for k in keys})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "references": str(args.references),
        **data_provenance(args),
        "tune_split": args.tune_split if tune else None,
        "trials": args.trials,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "baseline_min_tokens": args.baseline_min_tokens,
        "skip_first": {m: chosen[m] for m in modes},
        "skip_first_from": "tuned on --tune-split" if tune else "given",
        "judge": fe.JUDGE,
        "threshold": fe.THRESHOLD,
        "oracle": "reads the ground truth at test time (reference and search): an upper bound",
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
    }
    per_q = []
    for q in report_qs:
        e = {"qid": q.qid, "question": q.question, "best_answer": q.best_answer}
        for c, rows in rows_of.items():
            if q.qid in rows:
                e[c] = {k: v for k, v in rows[q.qid].items() if k != "objective"}
        per_q.append(e)
    doc = {"settings": settings, "tuning": tuning, "report": report, "per_question": per_q}
    (out / "eval.json").write_text(json.dumps(doc, indent=1))
    with open(out / "eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fe.CSV_FIELDS)
        w.writeheader()
        for c, s in report.items():
            w.writerow(fe.csv_row(c, s, chosen.get(c)))
    title = (
        f"Fusion Steering, TruthfulQA part {args.split} (oracle: reads the ground truth); "
        f"{args.trials} trials/prompt"
    )
    fe.plot(report, out / "eval.png", title)
    print(fe.markdown_table(report))
    print(f"wrote {out}/eval.json, eval.csv, eval.png")


def add_commands(sub) -> None:
    from roast_vllm.methods.fusion_search import MODES

    f = sub.add_parser("fusion", help="Fusion Steering: references, per-prompt search, evaluation")
    fsub = f.add_subparsers(dest="fusion_command", required=True)

    s = fsub.add_parser(
        "references", help="per-question reference vectors (explanation, captured in the engine)"
    )
    add_data(s, TASK)
    s.add_argument("--out", required=True, help="reference file (.safetensors)")
    s.add_argument("--explain-tokens", type=int, default=64)
    add_engine(s)
    s.set_defaults(func=cmd_references)

    s = fsub.add_parser("search", help="per-prompt Optuna search of the coefficients (batched rounds)")
    add_data(s, TASK)
    s.add_argument("--references", required=True, help="output of `roast-vllm fusion references`")
    s.add_argument("--out", required=True, help="best parameters per prompt (.json)")
    s.add_argument("--trials", type=int, default=5, help="trials per prompt")
    s.add_argument("--mode", choices=list(MODES), default="segmented")
    s.add_argument("--storage", default=None, help="Optuna journal file (resume an interrupted search)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-tokens", type=int, default=48)
    s.add_argument("--skip-first", action="store_true", help="leave position 0 out of the mean")
    add_engine(s)
    s.set_defaults(func=cmd_search)

    s = fsub.add_parser(
        "eval",
        help="baseline vs full-layer vs segmented on TruthfulQA generation (search per prompt, judge, table, PNG)",
    )
    add_data(s, TASK)
    s.set_defaults(split="b")
    s.add_argument(
        "--references", required=True, help="output of `roast-vllm fusion references` (both parts)"
    )
    s.add_argument("--out", required=True, help="output folder: eval.json, eval.csv, eval.png")
    s.add_argument("--modes", default="full,segmented", help="comma list of full, segmented")
    s.add_argument("--trials", type=int, default=5, help="search trials per prompt")
    s.add_argument(
        "--skip-first",
        choices=["auto", "on", "off"],
        default="auto",
        help="leave position 0 out of the mean; auto: whichever scores better on --tune-split",
    )
    s.add_argument(
        "--tune-split", choices=["a", "b"], default="a", help="part that --skip-first auto tunes on"
    )
    s.add_argument("--storage", default=None, help="Optuna journal file (resume an interrupted evaluation)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-tokens", type=int, default=48)
    s.add_argument(
        "--baseline-min-tokens",
        type=int,
        default=8,
        help="also report an unsteered baseline that may not end before this many tokens "
        "(the plain one often answers nothing at all); 0: leave it out",
    )
    add_engine(s)
    s.set_defaults(func=cmd_eval)
