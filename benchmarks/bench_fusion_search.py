"""Fusion Steering's per-prompt search on the engine: every prompt's trial of a round in one
batch, against a one-prompt-at-a-time loop on the same engine.

The first ``--n`` TruthfulQA dev questions (best answer as ground truth): references built
in the engine (the model's own explanation, captured over the answer positions), then the
same seeded segmented search (``--trials`` per prompt, TPE) twice: batched (each round one
``generate`` of one Fusion request per prompt) and one prompt at a time (one study after
the other, each trial a one-request ``generate``). The studies' seeds depend on the prompt
only, so both runs ask the same parameters and run the same requests; only the batching
differs. Writes ``results/fusion/search_throughput.{json,csv,png}``.

    python benchmarks/bench_fusion_search.py --n 16 --trials 3
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="questions (first n rows of the dev file)")
    p.add_argument("--trials", type=int, default=3, help="trials per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--explain-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "fusion")
    args = p.parse_args()

    import roast_vllm
    from roast_vllm import envs
    from roast_vllm.engine.llm import shutdown
    from roast_vllm.methods import fusion as fu
    from roast_vllm.methods import fusion_search as fs
    from roast_vllm.tasks import data_hash, read_csv

    data = envs.data_dir() / "truthfulqa_dev.csv"
    rows = [
        (f"q{i}", r["Question"].strip(), r["Best Answer"].strip())
        for i, (_, _, r) in enumerate(read_csv(data, ("Question", "Best Answer"), args.n))
    ]
    # eager: the reference capture needs it; both search runs use this same engine
    llm = roast_vllm.LLM(
        max_steering_slots=max(64, args.n),
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        kv_cache_memory_bytes=1 << 30,
    )
    try:
        t0 = time.perf_counter()
        refs = fu.build_references(
            llm, rows, args.explain_tokens, {"data_sha256": data_hash(data)}, progress=False
        )
        refs.register(llm, "tqa")
        t_refs = time.perf_counter() - t0
        items = {k: (q, gt) for k, q, gt in rows}
        evaluate = fs.engine_evaluator(llm, items, "tqa", args.max_tokens)
        keys = list(items)
        evaluate([(k, {"alpha": 0.5, "gamma": 0.5}) for k in keys])  # warm-up: every request shape once
        t0 = time.perf_counter()
        batched = fs.search(keys, evaluate, args.trials, "segmented", None, seed=0, study_prefix="batched")
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = {}
        for k in keys:
            single.update(
                fs.search(
                    [k],
                    evaluate,
                    args.trials,
                    "segmented",
                    None,
                    seed=0,
                    study_prefix="single",
                    progress=False,
                )
            )
        t_single = time.perf_counter() - t0
    finally:
        shutdown(llm)
    n_trials = args.trials * len(keys)
    same = sum(batched[k]["params"] == single[k]["params"] for k in keys)
    res = {
        "questions": len(keys),
        "trials_per_prompt": args.trials,
        "max_tokens": args.max_tokens,
        "references_s": round(t_refs, 2),
        "batched": {"seconds": round(t_batched, 2), "trials_per_s": round(n_trials / t_batched, 3)},
        "one_at_a_time": {"seconds": round(t_single, 2), "trials_per_s": round(n_trials / t_single, 3)},
        "speedup": round(t_single / t_batched, 2),
        "same_best_params": f"{same}/{len(keys)}",
        "best": {k: {"value": batched[k]["value"], "params": batched[k]["params"]} for k in keys},
        "command": f"python benchmarks/bench_fusion_search.py --n {args.n} --trials {args.trials} --max-tokens {args.max_tokens}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_throughput.json").write_text(json.dumps(res, indent=1))
    with open(args.out / "search_throughput.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loop", "seconds", "trials", "trials_per_s"])
        for name in ("batched", "one_at_a_time"):
            w.writerow([name, res[name]["seconds"], n_trials, res[name]["trials_per_s"]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["batched (one round = one batch)", "one prompt at a time"]
    vals = [res["batched"]["trials_per_s"], res["one_at_a_time"]["trials_per_s"]]
    ax.barh(names, vals, color=["tab:blue", "tab:gray"])
    ax.set_xlabel("trials / s")
    ax.set_title(
        f"Fusion search, {len(keys)} prompts x {args.trials} trials, {args.max_tokens} tokens", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(args.out / "search_throughput.png", dpi=120)
    print(json.dumps({k: v for k, v in res.items() if k != "best"}, indent=1))


if __name__ == "__main__":
    main()
