"""Throughput of the steering engine against stock vLLM, paired by repeat
(``benchmarks/bench_throughput.py``).

Each repeat starts **stock vLLM** (the plugin installed but not enabled: vLLM's own model
class, no tracker, no scheduler subclass) and the **steering engine** (``roast_vllm.LLM``)
one at a time, in alternating order, with the same vLLM arguments, prompts and greedy
``ignore_eos`` requests (every run makes the same number of tokens). After start each
engine makes one short untimed warm-up run per steering condition (stock: the same number
of plain runs), then times each of its conditions once. A condition's ratio in repeat ``r`` is its tokens/s over stock's
tokens/s in the same repeat; rows report the median of those paired ratios and their
min-max.

Conditions on the steering engine: nothing steered (the price of having steering
available), and every layer steered with K distinct per-request vectors for each K, at
each site (``residual``, ``mlp_act``): request ``i`` uses vector ``i mod K``.
``measure_interleaved`` is the finer design: the engines are started once and stay up
together, and rounds run every (engine, condition) back to back, so a ratio pairs runs
seconds apart on the same engine instances (``bench_throughput.py --interleaved``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
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

STOCK = "stock vLLM"
STOCK_V1 = "stock vLLM, V1 model runner"
NOTHING = "nothing steered"


def build_prompts(n: int) -> list[str]:
    return [f"Write a short essay about {TOPICS[i % len(TOPICS)]} (essay {i})." for i in range(n)]


def condition_name(k: int, site: str) -> str:
    return f"K={k} {site}, all layers"


def mixed_name(k: int) -> str:
    return f"mixed: Fusion + residual (K={k} each) + plain"


@dataclass
class BenchConfig:
    """One paired stock-vs-steering throughput benchmark."""

    model: str
    #: vLLM arguments given to both engines alike (dtype, max_model_len, max_num_seqs, ...)
    engine_kwargs: dict
    #: requests per run; K distinct vectors are all in flight only when ``num_prompts >= K``
    num_prompts: int = 256
    #: generated tokens per request (``ignore_eos``)
    max_tokens: int = 32
    #: distinct per-request vectors of the steered conditions
    ks: list[int] = field(default_factory=lambda: [1, 64, 256])
    #: steering sites of the steered conditions
    sites: list[str] = field(default_factory=lambda: ["residual", "mlp_act"])
    scale: float = 4.0
    #: engine pairs started (each repeat gives one paired ratio per condition)
    repeats: int = 3
    #: generated tokens per request in the warm-up runs (every condition once)
    warmup_tokens: int = 4
    #: a mixed condition (0: none): request ``i`` is a Fusion request (``i % 3 == 0``; one
    #: of ``mixed`` references, coefficients per third), an additive residual one (``1``;
    #: one of ``mixed`` vectors) or plain (``2``)
    mixed: int = 0
    #: the Fusion requests' coefficients (early / middle / late thirds)
    fusion_coeffs: tuple[float, float, float] = (0.1, 0.3, 0.2)

    def steered(self) -> dict[str, tuple[int, str]]:
        """``{condition name: (K, site)}`` of the steered conditions."""
        return {condition_name(k, s): (k, s) for s in self.sites for k in self.ks}

    def conditions(self) -> list[str]:
        return [NOTHING, *self.steered(), *([mixed_name(self.mixed)] if self.mixed else [])]


def _params(max_tokens: int, extra: dict | None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)


def _timed(llm, prompts: list[str], params: list) -> float:
    """Tokens/s of one run (prefix cache cleared first: every run prefills alike)."""
    llm.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def worker_procs(llm) -> list:
    """psutil handles of the processes that run a ``vllm.LLM``'s forward passes: the
    children of its engine-core process(es) (vLLM's multiprocess executor puts the model
    worker there), else the engine core itself; [] where vLLM keeps the engine in this
    process or psutil is missing (the CPU-time ratio is then left out)."""
    try:
        import psutil

        cores = [psutil.Process(p.pid) for p in llm.llm_engine.engine_core.resources.engine_manager.processes]
    except Exception:  # noqa: BLE001 - any other vLLM layout: no CPU figure, not an error
        return []
    return [c for p in cores for c in p.children(recursive=True)] or cores


def cpu_seconds(procs: list) -> float | None:
    """User + system CPU seconds the processes have used so far (None: none given)."""
    return sum(sum(p.cpu_times()[:2]) for p in procs) if procs else None


def start_stock(cfg: BenchConfig, env_runner: str | None):
    """Stock ``vllm.LLM`` on the model runner ``VLLM_USE_V2_MODEL_RUNNER=env_runner`` picks
    (None: vLLM's own default; the steering engine pins V1)."""
    import vllm

    # read by the engine core process this call starts
    if env_runner is None:
        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    else:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = env_runner
    return vllm.LLM(model=cfg.model, **cfg.engine_kwargs)


def run_stock(cfg: BenchConfig, prompts: list[str], env_runner: str | None) -> dict[str, float]:
    """Start stock vLLM, warm up, time one run, shut down; ``{STOCK: tokens/s}``."""
    from roast_vllm.engine.llm import shutdown

    llm = start_stock(cfg, env_runner)
    try:
        # as many warm-up runs as the steering engine gets (one per condition): a freshly
        # started engine speeds up over its first runs, and stock must not be timed earlier
        # in that curve than the steering engine is
        for _ in cfg.conditions():
            llm.generate(prompts, _params(cfg.warmup_tokens, None), use_tqdm=False)
        return {STOCK: _timed(llm, prompts, [_params(cfg.max_tokens, None)] * len(prompts))}
    finally:
        shutdown(llm)


def _steer_params(cfg: BenchConfig, cond: str, names: dict[str, list[str]], max_tokens: int) -> list:
    """Request ``i`` of a K-vector condition steers with vector ``i mod K`` of its site."""
    n = cfg.num_prompts
    if cond == NOTHING:
        return [_params(max_tokens, None)] * n
    if cfg.mixed and cond == mixed_name(cfg.mixed):
        k, out = cfg.mixed, []
        for i in range(n):
            if i % 3 == 0:
                e = {"steer_vector": names["fusion"][i // 3 % k], "steer_mode": "fusion"}
                e["steer_scale"] = list(cfg.fusion_coeffs)
            elif i % 3 == 1:
                e = {"steer_vector": names["residual"][i // 3 % k], "steer_scale": cfg.scale}
            else:
                e = None
            out.append(_params(max_tokens, e))
        return out
    k, site = cfg.steered()[cond]
    return [
        _params(max_tokens, {"steer_vector": names[site][i % k], "steer_scale": cfg.scale}) for i in range(n)
    ]


def start_steering(cfg: BenchConfig):
    """``(llm, names)``: the steering engine with ``max(ks)`` random vectors registered per
    site (``names[site]`` in registration order)."""
    from roast_vllm.engine.llm import LLM, register_vector, site_dim
    from roast_vllm.vector import SteeringVector

    kmax = max(cfg.ks)
    llm = LLM(
        cfg.model,
        max_steering_slots=max(kmax, 2 * cfg.mixed),
        mlp_act_site=True,  # the engine users get by default: both sites' ops in every layer
        allow_capture=False,
        **cfg.engine_kwargs,
    )
    L = llm.roast_dims["num_layers"]
    names: dict[str, list[str]] = {}
    sites = list(cfg.sites) + (["residual"] if cfg.mixed and "residual" not in cfg.sites else [])
    for site in sites:
        names[site] = []
        for i in range(max(kmax, cfg.mixed)):
            name = f"bench_{site}_{i}"
            v = SteeringVector.random(L, site_dim(llm.roast_dims, site), seed=1000 + i, site=site)
            register_vector(llm, name, v)
            names[site].append(name)
    # the mixed condition's Fusion references: random residual-sized vectors on every layer
    # (what a request costs does not depend on the reference's values)
    names["fusion"] = []
    for i in range(cfg.mixed):
        name = f"bench_fusion_{i}"
        register_vector(llm, name, SteeringVector.random(L, llm.roast_dims["hidden_size"], seed=5000 + i))
        names["fusion"].append(name)
    return llm, names


def run_steering(cfg: BenchConfig, prompts: list[str], order_rev: bool) -> dict[str, float]:
    """Start the steering engine, register ``max(ks)`` random vectors per site, warm up on
    every condition, time each once (order reversed when ``order_rev``), shut down."""
    from roast_vllm.engine.llm import shutdown

    llm, names = start_steering(cfg)
    try:
        conds = cfg.conditions()
        for cond in conds:  # warm-up: every condition once
            llm.generate(prompts, _steer_params(cfg, cond, names, cfg.warmup_tokens), use_tqdm=False)
        out = {}
        for cond in conds[::-1] if order_rev else conds:
            out[cond] = _timed(llm, prompts, _steer_params(cfg, cond, names, cfg.max_tokens))
        return out
    finally:
        shutdown(llm)


def measure_paired(cfg: BenchConfig) -> tuple[list[dict], list[dict]]:
    """Run ``cfg.repeats`` engine pairs; returns ``(rows, runs)``: one row per condition
    (stock first) with the median paired ratio and its min-max, and every run's tokens/s."""
    from tqdm import tqdm

    prompts = build_prompts(cfg.num_prompts)
    env_runner = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    runs: list[dict] = []
    for rep in tqdm(range(cfg.repeats), desc="engine pairs (stock, steering)"):
        # alternate which engine goes first, so slow drift does not favour one of them
        first_stock = rep % 2 == 0
        res: dict[str, float] = {}
        for which in ("stock", "steering") if first_stock else ("steering", "stock"):
            if which == "stock":
                res.update(run_stock(cfg, prompts, env_runner))
            else:
                res.update(run_steering(cfg, prompts, order_rev=rep % 2 == 1))
        runs.append({"repeat": rep, "stock_first": first_stock, "tokens_per_s": res})
        tqdm.write(
            f"repeat {rep + 1}: stock {res[STOCK]:.1f} tok/s; "
            + ", ".join(f"{c}: {res[c] / res[STOCK]:.3f}" for c in cfg.conditions())
        )
    return summarize(runs, [STOCK] + cfg.conditions()), runs


def measure_interleaved(cfg: BenchConfig, rounds: int) -> tuple[list[dict], list[dict]]:
    """Stock vLLM (vLLM's default model runner), stock vLLM on the V1 runner the steering
    engine uses, and the steering engine, all started once and alive together; each round
    runs every (engine, condition) once, one at a time, in an order rotated by the round.
    A round's ratios pair runs seconds apart on the same engines, so the machine's drift
    (and an engine instance's own speed, which differs between starts by more than the
    effect sought) cancels; ``rows`` has one row per condition, ``runs`` one per round.

    The V1 row separates the runner's share of a gap to stock from steering's own: the
    steering engine runs on vLLM's V1 model runner, stock by default on V2 where vLLM
    picks it."""
    from tqdm import tqdm

    from roast_vllm.engine.llm import shutdown

    prompts = build_prompts(cfg.num_prompts)
    env_runner = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    engines: dict[str, object] = {}
    try:
        engines[STOCK] = start_stock(cfg, env_runner)
        if env_runner != "0":
            engines[STOCK_V1] = start_stock(cfg, "0")
        steering, names = start_steering(cfg)
        engines["steering"] = steering
        # (name, engine, requests): stock engines get the plain requests of NOTHING
        jobs = [(c, engines[c], NOTHING) for c in engines if c != "steering"]
        jobs += [(c, steering, c) for c in cfg.conditions()]
        # worker CPU seconds per run, a second measure beside the wall clock (it leaves out
        # time the worker waits; on the 2-core CPU the two ratios agree to the third digit:
        # the worker is busy for the whole run, README "Interleaved")
        procs = {id(llm): worker_procs(llm) for llm in engines.values()}
        for _, llm, cond in tqdm(jobs, desc="warm-up (every engine and condition once)"):
            llm.generate(prompts, _steer_params(cfg, cond, names, cfg.warmup_tokens), use_tqdm=False)
        runs = []
        for r in tqdm(range(rounds), desc="interleaved rounds"):
            k = r % len(jobs)
            order = jobs[k:] + jobs[:k]
            got, cpu = {}, {}
            for name, llm, cond in order:
                c0 = cpu_seconds(procs[id(llm)])
                got[name] = _timed(llm, prompts, _steer_params(cfg, cond, names, cfg.max_tokens))
                if c0 is not None:
                    cpu[name] = round(cpu_seconds(procs[id(llm)]) - c0, 3)
            tps = {name: got[name] for name, _, _ in jobs}  # one fixed key order for every round
            names_in_order = [name for name, _, _ in order]
            run = {
                "repeat": r,
                "order": names_in_order,
                "stock_first": names_in_order.index(STOCK) < names_in_order.index(NOTHING),
                "tokens_per_s": tps,
            }
            if len(cpu) == len(jobs):
                run["worker_cpu_s"] = {name: cpu[name] for name, _, _ in jobs}
            runs.append(run)
            tqdm.write(
                f"round {r + 1}: stock {tps[STOCK]:.1f} tok/s; "
                + ", ".join(f"{c}: {tps[c] / tps[STOCK]:.3f}" for c in tps if c != STOCK)
            )
    finally:
        for llm in engines.values():
            shutdown(llm)
    conds = [STOCK] + [c for c in engines if c not in (STOCK, "steering")] + cfg.conditions()
    return summarize(runs, conds), runs


def summarize(runs: list[dict], conditions: list[str]) -> list[dict]:
    """Per condition: median tokens/s, and median / min / max of the per-repeat paired
    ratios ``tokens_per_s[cond] / tokens_per_s[stock]`` of the same repeat.

    ``ratio_balanced`` corrects for engine order: on a shared machine the engine that runs
    second in a repeat may run faster or slower for reasons of its own (measured here: ~10%),
    and with an odd number of repeats one order has more votes. It is the geometric mean of
    the two orders' geometric-mean ratios (stock first / steering first); with one order
    only, the plain geometric mean.

    Where every run recorded its engine's worker CPU seconds (``worker_cpu_s``; same tokens
    in every run), ``cpu_ratio`` is the median of ``cpu[stock] / cpu[cond]`` per repeat,
    with its min-max: like the tokens/s ratio, 1.0 = as cheap as stock, lower = costlier."""
    rows = []
    with_cpu = bool(runs) and all("worker_cpu_s" in r for r in runs)
    for cond in conditions:
        tps = [r["tokens_per_s"][cond] for r in runs]
        ratios = [r["tokens_per_s"][cond] / r["tokens_per_s"][STOCK] for r in runs]
        by_order: dict[bool, list[float]] = {}
        for r, x in zip(runs, ratios):
            by_order.setdefault(bool(r.get("stock_first", True)), []).append(math.log(x))
        balanced = math.exp(statistics.mean(statistics.mean(v) for v in by_order.values()))
        rows.append(
            {
                "condition": cond,
                "tokens_per_s": round(statistics.median(tps), 2),
                "ratio": round(statistics.median(ratios), 4),
                "ratio_balanced": round(balanced, 4),
                "ratio_min": round(min(ratios), 4),
                "ratio_max": round(max(ratios), 4),
                "repeats": len(runs),
                "paired_ratios": [round(x, 4) for x in ratios],
            }
        )
        if with_cpu:
            cr = [r["worker_cpu_s"][STOCK] / r["worker_cpu_s"][cond] for r in runs]
            rows[-1].update(
                cpu_ratio=round(statistics.median(cr), 4),
                cpu_ratio_min=round(min(cr), 4),
                cpu_ratio_max=round(max(cr), 4),
            )
    return rows


FIELDS = ["condition", "tokens_per_s", "ratio", "ratio_balanced", "ratio_min", "ratio_max", "repeats"]
CPU_FIELDS = ["cpu_ratio", "cpu_ratio_min", "cpu_ratio_max"]


def write_results(rows: list[dict], runs: list[dict], meta: dict, out: Path, stem: str) -> None:
    """``<stem>.csv``, ``<stem>.json`` (with every run) and ``<stem>.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        fields = FIELDS + (CPU_FIELDS if rows and "cpu_ratio" in rows[0] else [])
        w = csv.DictWriter(f, fieldnames=fields + ["paired_ratios"])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in fields}, "paired_ratios": " ".join(map(str, r["paired_ratios"]))})
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.8))
    rr = rows[::-1]
    y = list(range(len(rr)))
    ax.barh(
        y,
        [r["ratio"] for r in rr],
        color=["#999" if r["condition"] in (STOCK, STOCK_V1) else "#4c72b0" for r in rr],
        xerr=[[r["ratio"] - r["ratio_min"] for r in rr], [r["ratio_max"] - r["ratio"] for r in rr]],
        capsize=4,
        ecolor="#555",
    )
    for r, yi in zip(rr, y):  # every paired ratio as a dot, the order-balanced one as a diamond
        ax.plot(r["paired_ratios"], [yi] * len(r["paired_ratios"]), "k.", ms=4)
        ax.plot([r["ratio_balanced"]], [yi], "D", color="#dd8452", ms=5)
        if "cpu_ratio" in r:  # worker CPU seconds, stock / condition
            ax.plot([r["cpu_ratio"]], [yi], "x", color="#2a9d2a", ms=7, mew=2)
        ax.text(1.3, yi, f"{r['ratio']:.3f}  ({r['tokens_per_s']:.0f} tok/s)", va="center", fontsize=9)
    ax.set_yticks(y, [r["condition"] for r in rr])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(0.99, color="g", ls="--", lw=0.8, label="0.99 goal (nothing steered)")
    ax.axvline(0.97, color="r", ls="--", lw=0.8, label="0.97 goal (K=64)")
    ax.set_xlim(0.5, 1.6)
    ax.set_xlabel(
        f"throughput / stock vLLM, same {meta.get('unit', 'engine pairs').rstrip('s')}\n(bar: median; "
        "whiskers: min-max; dots: repeats; diamond: order-balanced"
        + ("; x: worker CPU-time ratio)" if any("cpu_ratio" in r for r in rr) else ")"),
        fontsize=8,
    )
    ax.set_title(
        f"roast-vllm vs stock vLLM, {meta['mode']} mode, {meta['device']}\n{meta['num_prompts']} prompts x "
        f"{meta['max_tokens']} tokens, {meta['repeats']} {meta.get('unit', 'engine pairs')}",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], meta: dict) -> None:
    print(
        f"\n{meta['mode']} mode, {meta['num_prompts']} prompts x {meta['max_tokens']} tokens, "
        f"{meta['repeats']} {meta.get('unit', 'engine pairs')}, {meta['machine']}"
    )
    cpu = bool(rows) and "cpu_ratio" in rows[0]
    print(
        f"{'condition':<32} {'tokens/s':>9} {'median':>7} {'balanced':>8}  min-max of paired ratios"
        + ("   worker CPU ratio (min-max)" if cpu else "")
    )
    for r in rows:
        print(
            f"{r['condition']:<32} {r['tokens_per_s']:>9.1f} {r['ratio']:>7.3f} {r['ratio_balanced']:>8.3f}  "
            f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}"
            + (f"   {r['cpu_ratio']:.3f} ({r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f})" if cpu else "")
        )
