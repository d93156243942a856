"""ROAST vs CAA vs baseline on disjoint splits (README "ROAST results").

For each task: rollouts on part ``a`` of the dev data -> vectors (ROAST grouped, ROAST
ungrouped, CAA) from the same pairs -> scale (and layer set) tuned by greedy accuracy on
part ``a`` -> the chosen configuration reported on part ``b`` (accuracy with a 95% Wilson
interval; TruthfulQA also MC1/MC2). One pool of Ray workers serves every step.

    python benchmarks/bench_roast.py                       # both tasks, defaults below
    python benchmarks/bench_roast.py --tasks truthfulqa_mc --workers 2

Writes results/roast/<task>/{rollouts.jsonl, <method>.safetensors, tune.csv, report.json}
and results/roast/summary.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from roast_vllm.envs import data_dir

DATA = data_dir()

# per task: data file, rows read, rollout size, tuning questions, report questions, max
# tokens, and the tuning grid (GSM8K answers are ~16x longer: a smaller grid on CPU)
TASKS = {
    "truthfulqa_mc": dict(
        data="truthfulqa_dev.csv", limit=None, n=8, tune_q=None, report_q=None, max_tokens=16, grid="full"
    ),
    "gsm8k": dict(
        data="gsm8k_train.jsonl", limit=600, n=4, tune_q=48, report_q=160, max_tokens=256, grid="small"
    ),
}
SMALL_GRID = {"roast_grouped": [0.5, 2.0, 8.0], "roast_ungrouped": [0.1, 0.5, 2.0], "caa": [0.05, 0.25, 1.0]}
METHODS = {
    # name: (EstimateOptions kwargs, tuning grid of (layers, scale))
    # Each grid runs from "no visible effect" to "answers collapse" for that method: the
    # grouped vector is a mean of unit-max votes that partly cancel, so it is smaller than
    # the ungrouped one and needs larger scales; CAA's raw mean difference is larger still.
    "roast_grouped": (dict(method="roast", site="mlp_act", grouped=True), [0.5, 1.0, 2.0, 4.0, 8.0]),
    "roast_ungrouped": (dict(method="roast", site="mlp_act", grouped=False), [0.1, 0.2, 0.5, 1.0, 2.0]),
    "caa": (dict(method="caa"), [0.05, 0.1, 0.25, 0.5, 1.0]),
}
LAYER_SETS = {"all": None, "mid": list(range(10, 20))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="truthfulqa_mc,gsm8k")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results/roast")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--gsm8k-rollout-q", type=int, default=64, help="part-a questions sampled for GSM8K")
    from roast_vllm.engine import args as engine_args

    engine_args.add_engine_args(p)  # any vLLM engine argument (e.g. --dtype bfloat16) reaches every worker
    args = engine_args.parse_args(p)

    from roast_vllm.methods.estimate import EstimateOptions, estimate_from_rollouts
    from roast_vllm.runtime.pool import EngineOptions, PoolOptions, WorkerPool
    from roast_vllm.runtime.rollout import RolloutConfig, read_records, run_rollouts
    from roast_vllm.tasks import data_hash, select
    from roast_vllm.tasks.evaluate import evaluate

    out_root = Path(args.out)
    summary = []
    engine = EngineOptions(enforce_eager=True, max_model_len=2048, kv_cache_gib=1.0, extra=args.engine_kwargs)
    with WorkerPool(engine, PoolOptions(workers=args.workers)) as pool:
        for task in args.tasks.split(","):
            t0 = time.time()
            spec = TASKS[task]
            data = str(Path(args.data_dir) / spec["data"])
            od = out_root / task
            od.mkdir(parents=True, exist_ok=True)
            part_a = select(task, data, "a", 0.5, 0, spec["limit"])
            part_b = select(task, data, "b", 0.5, 0, spec["limit"])
            roll_q = part_a if task != "gsm8k" else part_a[: args.gsm8k_rollout_q]
            tune_q = part_a if spec["tune_q"] is None else part_a[: spec["tune_q"]]
            report_q = part_b if spec["report_q"] is None else part_b[: spec["report_q"]]
            # 1. rollouts on part a (resumable: reruns skip finished shards)
            cfg = RolloutConfig(
                task=task,
                data=data,
                n=spec["n"],
                max_tokens=spec["max_tokens"],
                split="a",
                limit=spec["limit"],
            )
            rpath = od / "rollouts.jsonl"
            if task == "gsm8k":
                run_rollouts_subset(cfg, roll_q, rpath, pool)
            else:
                run_rollouts(cfg, rpath, engine, pool)
            rollouts = read_records(rpath)
            # 2. vectors from the same pairs
            vecs = {}
            for name, (kw, _) in METHODS.items():
                vpath = od / f"{name}.safetensors"
                prov = {
                    "task": task,
                    "data": data,
                    "data_sha256": data_hash(data),
                    "rollouts": str(rpath),
                    "rollouts_sha256": data_hash(rpath),
                }
                v = estimate_from_rollouts(
                    roll_q, rollouts, EstimateOptions(**kw), engine, pool, provenance=prov
                )
                v.save(vpath)
                vecs[name] = v
                pool.broadcast("ensure_vector", name, v.to_bytes())
            # 3. tune (layers, scale) on part a by greedy accuracy
            tune_rows = []
            base_a = evaluate(task, tune_q, pool, [0.0], mc=False, max_tokens=spec["max_tokens"])[0]
            tune_rows.append(
                {"method": "baseline", "layers": "-", "scale": 0.0, "accuracy": base_a["accuracy"]}
            )
            best = {}
            for name, (_, grid) in METHODS.items():
                layer_sets = LAYER_SETS if spec["grid"] == "full" else {"all": None}
                grid = grid if spec["grid"] == "full" else SMALL_GRID[name]
                for lname, layers in layer_sets.items():
                    res = evaluate(
                        task,
                        tune_q,
                        pool,
                        grid,
                        vector_name=name,
                        layers=layers,
                        mc=False,
                        max_tokens=spec["max_tokens"],
                    )
                    for r in res:
                        row = {
                            "method": name,
                            "layers": lname,
                            "scale": r["scale"],
                            "accuracy": r["accuracy"],
                        }
                        tune_rows.append(row)
                        if name not in best or row["accuracy"] > best[name]["accuracy"]:
                            best[name] = row
            with open(od / "tune.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(tune_rows[0]))
                w.writeheader()
                w.writerows(tune_rows)
            # 4. report on part b
            report = {
                "task": task,
                "n_tune": len(tune_q),
                "n_report": len(report_q),
                "n_rollout_q": len(roll_q),
            }
            rows = []
            r = evaluate(task, report_q, pool, [0.0], max_tokens=spec["max_tokens"])[0]
            rows.append(_row(task, "baseline", "-", 0.0, r))
            for name, b in best.items():
                layers = LAYER_SETS[b["layers"]]
                r = evaluate(
                    task,
                    report_q,
                    pool,
                    [b["scale"]],
                    vector_name=name,
                    layers=layers,
                    max_tokens=spec["max_tokens"],
                )[0]
                rows.append(_row(task, name, b["layers"], b["scale"], r))
            report["rows"] = rows
            report["rollout_accuracy"] = sum(x["correct"] for x in rollouts) / len(rollouts)
            report["pairs"] = {k: v.provenance["pairs"] for k, v in vecs.items()}
            report["seconds"] = round(time.time() - t0)
            (od / "report.json").write_text(json.dumps(report, indent=1))
            summary.extend(rows)
            print(json.dumps(rows, indent=1))
    # the summary covers every task run so far (tasks can be run one at a time)
    rows = [r for f in sorted(out_root.glob("*/report.json")) for r in json.loads(f.read_text())["rows"]]
    write_summary(rows or summary, out_root)


def run_rollouts_subset(cfg, questions, out, pool) -> None:
    """Rollouts for an explicit question list (GSM8K: a budget-sized subset of part a)."""
    from roast_vllm.runtime.rollout import write_records

    if Path(out).exists():
        return
    recs = []
    chunk = 16
    for _, res in pool.run(
        [
            (
                i,
                "sample",
                (
                    cfg.task,
                    questions[i : i + chunk],
                    cfg.n,
                    cfg.temperature,
                    cfg.top_p,
                    cfg.max_tokens,
                    cfg.seed,
                ),
            )
            for i in range(0, len(questions), chunk)
        ]
    ):
        recs.extend(res)
    order = {q.qid: k for k, q in enumerate(questions)}
    recs.sort(key=lambda r: (order[r["qid"]], r["sample"]))
    write_records(recs, out)


def _row(task, method, layers, scale, r) -> dict:
    row = {
        "task": task,
        "method": method,
        "layers": layers,
        "scale": scale,
        "n": r["n"],
        "accuracy": round(r["accuracy"], 4),
        "ci_lo": round(r["ci95"][0], 4),
        "ci_hi": round(r["ci95"][1], 4),
    }
    for k in ("mc1", "mc2"):
        if k in r:
            row[k] = round(r[k], 4)
            row[f"{k}_lo"], row[f"{k}_hi"] = (round(x, 4) for x in r[f"{k}_ci95"])
    return row


def write_summary(rows: list[dict], out_root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "summary.json").write_text(json.dumps(rows, indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out_root / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    metrics = [
        (t, m)
        for t in tasks
        for m in ("accuracy", "mc1", "mc2")
        if any(m in r for r in rows if r["task"] == t)
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
    for ax, (t, m) in zip(axes[0], metrics):
        rs = [r for r in rows if r["task"] == t]
        lo = "ci_lo" if m == "accuracy" else f"{m}_lo"
        hi = "ci_hi" if m == "accuracy" else f"{m}_hi"
        ys = [r[m] for r in rs]
        err = [[y - r[lo] for y, r in zip(ys, rs)], [r[hi] - y for y, r in zip(ys, rs)]]
        ax.bar(range(len(rs)), ys, yerr=err, capsize=3, color=["#888", "#c44", "#e99", "#48c"][: len(rs)])
        ax.set_xticks(range(len(rs)), [r["method"].replace("roast_", "ROAST\n") for r in rs], fontsize=8)
        ax.set_title(f"{t}: {m} (n={rs[0]['n']})", fontsize=9)
        ax.set_ylim(0, 1)
    fig.suptitle("SmolLM2-135M-Instruct, report split (95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_root / "summary.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
