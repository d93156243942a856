"""Steered-vs-unsteered throughput measurement, shared by ``benchmarks/bench_throughput.py``
and the demo. Every condition runs the same prompts, greedy, with ``ignore_eos`` so each
run generates the same number of tokens; conditions are interleaved across repeats so
drift on a shared machine hits them alike (forward, then reversed order)."""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path

TOPICS = [
    "the history of the printing press",
    "how volcanoes form",
    "a recipe for bread",
    "the rules of chess",
    "why the sky is blue",
    "how a bicycle works",
    "the life of a honeybee",
    "the water cycle",
    "how to learn a language",
    "the first moon landing",
    "how batteries store energy",
    "the Roman empire",
]


def build_prompts(n: int) -> list[str]:
    return [f"Write a short essay about {TOPICS[i % len(TOPICS)]} (essay {i})." for i in range(n)]


def register_random_vectors(llm, n: int, prefix: str = "bench") -> list[str]:
    """Register ``n`` distinct unit-norm random all-layer vectors; return their names."""
    from tqdm import tqdm

    import roast_vllm
    from roast_vllm import SteeringVector

    L, H = llm.roast_dims["num_layers"], llm.roast_dims["hidden_size"]
    names = [f"{prefix}{i}" for i in range(n)]
    for i, name in enumerate(tqdm(names, desc="registering vectors")):
        roast_vllm.register_vector(llm, name, SteeringVector.random(L, H, seed=1000 + i))
    return names


def measure(
    llm,
    prompts: list[str],
    ks: list[int],
    names: list[str],
    max_tokens: int,
    scale: float = 4.0,
    repeats: int = 3,
    extra_conditions: dict[str, dict] | None = None,
) -> list[dict]:
    """Rows ``{condition, tokens_per_s, ratio, runs}``: unsteered, one shared vector on
    every layer, and K distinct per-request vectors on every layer for each K in ``ks``;
    plus ``{name: steer_* args}`` of ``extra_conditions`` (every request steered alike)."""
    from tqdm import tqdm
    from vllm import SamplingParams

    def params(extra):
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    conditions = [
        ("unsteered", [params(None)] * len(prompts)),
        (
            "shared vector, all layers",
            [params({"steer_vector": names[0], "steer_scale": scale})] * len(prompts),
        ),
    ]
    for k in ks:
        if k > len(names):
            raise ValueError(f"K={k} needs {k} registered vectors, got {len(names)}")
        conditions.append(
            (
                f"K={k} distinct vectors, all layers",
                [params({"steer_vector": names[i % k], "steer_scale": scale}) for i in range(len(prompts))],
            )
        )
    for name, extra in (extra_conditions or {}).items():
        conditions.append((name, [params(extra)] * len(prompts)))
    llm.generate(prompts[: min(8, len(prompts))], params(None), use_tqdm=False)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name, _ in conditions}
    for rep in range(repeats):
        # alternate the order so slow drift (thermal, neighbours) does not favour a condition
        order = conditions if rep % 2 == 0 else conditions[::-1]
        for name, sps in tqdm(order, desc=f"throughput, repeat {rep + 1}/{repeats}"):
            llm.reset_prefix_cache()
            t = time.perf_counter()
            outs = llm.generate(prompts, sps, use_tqdm=False)
            dt = time.perf_counter() - t
            timings[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    base = statistics.median(timings["unsteered"])
    return [
        {
            "condition": name,
            "tokens_per_s": round(statistics.median(timings[name]), 2),
            "ratio": round(statistics.median(timings[name]) / base, 4),
            "runs": len(timings[name]),
            "all_tokens_per_s": [round(x, 2) for x in timings[name]],
        }
        for name, _ in conditions
    ]


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    """``throughput.csv``, ``throughput.json`` and ``throughput.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["condition", "tokens_per_s", "ratio", "runs"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in w.fieldnames})
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.6))
    names = [r["condition"] for r in rows][::-1]
    ratios = [r["ratio"] for r in rows][::-1]
    base = rows[0]["tokens_per_s"] / rows[0]["ratio"]  # median unsteered tokens/s
    lo = [max(0.0, r["ratio"] - min(r["all_tokens_per_s"]) / base) for r in rows][::-1]
    hi = [max(0.0, max(r["all_tokens_per_s"]) / base - r["ratio"]) for r in rows][::-1]
    ax.barh(names, ratios, color="#4c72b0", xerr=[lo, hi], capsize=4, ecolor="#555")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(0.95, color="r", ls="--", lw=0.8, label="0.95 target")
    for i, r in enumerate(rows[::-1]):
        ax.text(1.3, i, f"{r['ratio']:.3f}  ({r['tokens_per_s']:.0f} tok/s)", va="center")
    ax.set_xlim(0, 1.75)
    ax.set_xlabel("throughput / median unsteered (bar: median of runs; whiskers: min-max run)")
    ax.set_title(
        f"roast-vllm, {meta['mode']} mode, {meta['num_prompts']} prompts x {meta['max_tokens']} tokens, "
        f"{meta['device']}",
        fontsize=10,
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], meta: dict) -> None:
    print(
        f"\n{meta['mode']} mode, {meta['num_prompts']} prompts x {meta['max_tokens']} tokens, {meta['machine']}"
    )
    print(f"{'condition':<36} {'tokens/s':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['condition']:<36} {r['tokens_per_s']:>10.1f} {r['ratio']:>7.3f}")
