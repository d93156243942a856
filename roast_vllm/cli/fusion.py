"""Fusion Steering on the command line::

    roast-vllm fusion references --data truthfulqa_dev.csv --split a --out refs.safetensors --workers 2
    roast-vllm fusion search --data truthfulqa_dev.csv --split a --references refs.safetensors \\
                             --trials 5 --mode segmented --out search.json --storage search.journal

Questions are TruthfulQA rows (question as the prompt, best answer as the ground truth).
References are built on the Ray workers (each an eager engine: the capture needs one), one
shard of questions per job; the search shards prompts over the workers, every round of a
shard one batch on its engine, all studies in one resumable Optuna journal.
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


def cmd_search(args) -> None:
    from roast_vllm.methods.fusion import ReferenceSet
    from roast_vllm.runtime.pool import WorkerPool

    refs = ReferenceSet.load(args.references)
    qs = {q.qid: q for q in _questions(args)}
    missing = [k for k in qs if k not in refs.ids]
    if missing:
        raise SystemExit(
            f"error: {len(missing)} selected questions have no reference in {args.references} "
            f"(e.g. {missing[:3]}); build references with the same --data/--split/--limit"
        )
    items = {k: (q.question, q.best_answer) for k, q in qs.items()}
    eng, pool = engine_options(args)
    storage = str(Path(args.storage).resolve()) if args.storage else None
    best: dict[str, dict] = {}
    with WorkerPool(eng, pool) as wp:
        for qid in items:  # every worker gets every prompt's reference, once
            wp.broadcast("ensure_vector", f"ref/{qid}", refs.vector(qid).to_bytes())
        jobs = [
            (
                i,
                "roast_vllm.methods.fusion_search:search_job",
                (
                    {k: items[k] for k in shard},
                    "ref",
                    args.trials,
                    args.mode,
                    storage,
                    args.seed,
                    args.max_tokens,
                    args.skip_first,
                ),
            )
            for i, shard in enumerate(_shards(list(items), max(args.workers, 1)))
        ]
        for _, r in wp.run(jobs):
            best.update(r)
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


def add_commands(sub) -> None:
    from roast_vllm.methods.fusion_search import MODES

    f = sub.add_parser("fusion", help="Fusion Steering: references, per-prompt search")
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
