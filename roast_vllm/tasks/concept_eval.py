"""Concept-steering evaluation (AxBench-style) in one engine run.

Every concept x instruction x condition is one request; the conditions are the unsteered
answer, the prompting baseline (the instruction asking to weave the concept in) and, per
method, each ``(scale, layers)`` of a sweep with the concept's own vector: hundreds of
distinct steering configurations in one continuous batch. Each output is graded by
:class:`~roast_vllm.tasks.concept_judge.ConceptJudge` (concept, relevance, fluency and their
harmonic mean, calibrated against the same instruction's unsteered answer); fluency needs
the unsteered model's per-token log-likelihood of the output, a second (prompt-logprob)
pass on the same engine.

Per method the ``(scale, layers)`` with the best mean aggregate on part a is kept and
reported on part b: per concept the mean over its instructions, then the mean over
concepts with a 95% interval (concepts are the unit: instructions of one concept are not
independent), and paired comparisons between methods over concepts (mean difference with
its interval, exact two-sided sign test).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from roast_vllm.tasks.evaluate import mean_ci, sign_test

#: Row keys of the judge's scores (a row's ``concept`` is the concept's name).
METRICS = ("concept_score", "relevance", "fluency", "aggregate")


@dataclass(frozen=True)
class Condition:
    """How a request is made: ``method`` ``unsteered`` / ``prompting`` / a vector family
    (``roast``, ``caa``, ...) at ``scale`` on ``layers`` (a label like ``"6-20"``)."""

    method: str
    scale: float = 0.0
    layers: str = "all"

    @property
    def key(self) -> str:
        if self.method in ("unsteered", "prompting"):
            return self.method
        return f"{self.method}@{self.scale:g}/{self.layers}"

    @classmethod
    def from_key(cls, key: str) -> Condition:
        """The condition a :attr:`key` names (its inverse)."""
        method, at, rest = key.partition("@")
        if not at:
            return cls(method)
        scale, _, layers = rest.partition("/")
        return cls(method, float(scale), layers)


def parse_layers(label: str, num_layers: int) -> list[int] | None:
    """``"all"`` -> None (every layer of the vector); ``"6-20"`` -> [6..20]; ``"3,5"``."""
    if label == "all":
        return None
    out: list[int] = []
    for part in label.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    if any(not 0 <= l < num_layers for l in out):
        raise ValueError(f"layers {label!r} out of range 0..{num_layers - 1}")
    return out


def per_concept(rows: Sequence[dict], condition: str) -> dict[str, dict[str, float]]:
    """``{concept: {metric: mean over its instructions}}`` of one condition's rows."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["condition"] == condition:
            for m in METRICS:
                acc[r["concept"]][m].append(r[m])
    return {c: {m: sum(v) / len(v) for m, v in d.items()} for c, d in acc.items()}


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """Per condition: each metric's mean over concepts (of per-concept means) with a 95%
    interval, and the number of concepts and rows."""
    out = {}
    for cond in dict.fromkeys(r["condition"] for r in rows):
        pc = per_concept(rows, cond)
        entry = {"concepts": len(pc), "rows": sum(r["condition"] == cond for r in rows)}
        for m in METRICS:
            xs = [v[m] for v in pc.values()]
            entry[m] = sum(xs) / len(xs)
            entry[f"{m}_ci95"] = mean_ci(xs)
        out[cond] = entry
    return out


def tune(rows: Sequence[dict], methods: Sequence[str]) -> dict[str, str]:
    """Per method, the condition key with the best mean aggregate (ties: the smaller
    scale, then the first seen)."""
    summary = summarize(rows)
    best = {}
    for m in methods:
        cands = [(k, v) for k, v in summary.items() if k.startswith(m + "@")]
        if not cands:
            raise ValueError(f"no condition of method {m!r} in the rows")
        best[m] = max(cands, key=lambda kv: (kv[1]["aggregate"], -Condition.from_key(kv[0]).scale))[0]
    return best


def paired(rows: Sequence[dict], a: str, b: str, metric: str = "aggregate") -> dict:
    """Condition ``a`` minus ``b`` over the concepts both have: mean difference with a 95%
    interval, wins / losses / ties, sign-test p."""
    pa, pb = per_concept(rows, a), per_concept(rows, b)
    common = sorted(set(pa) & set(pb))
    d = [pa[c][metric] - pb[c][metric] for c in common]
    wins, losses = sum(x > 1e-12 for x in d), sum(x < -1e-12 for x in d)
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "n": len(d),
        "mean_diff": sum(d) / len(d) if d else float("nan"),
        "ci95": mean_ci(d) if d else [float("nan")] * 2,
        "wins": wins,
        "losses": losses,
        "ties": len(d) - wins - losses,
        "p_sign": sign_test(wins, losses),
    }


def markdown_table(summary: dict[str, dict], order: Sequence[str]) -> str:
    lines = [
        "| condition | concept score | relevance | fluency | aggregate (harmonic mean) | concepts |",
        "|---|---|---|---|---|---|",
    ]
    for k in order:
        s = summary[k]
        cells = [f"{s[m]:.3f} [{s[m + '_ci95'][0]:.3f}, {s[m + '_ci95'][1]:.3f}]" for m in METRICS]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {s['concepts']} |")
    return "\n".join(lines)


def plot(summary: dict[str, dict], order: Sequence[str], path) -> None:
    """Grouped bars: each metric per condition, 95% intervals over concepts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(order) + 3, 4))
    w = 0.8 / len(METRICS)
    for j, m in enumerate(METRICS):
        xs = [i + (j - 1.5) * w for i in range(len(order))]
        ys = [summary[k][m] for k in order]
        err = [
            [y - summary[k][m + "_ci95"][0] for k, y in zip(order, ys)],
            [summary[k][m + "_ci95"][1] - y for k, y in zip(order, ys)],
        ]
        ax.bar(xs, ys, w, yerr=err, capsize=2, label=m)
    ax.set_xticks(range(len(order)), order, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (95% CI over concepts)")
    ax.set_title("Concept steering, held-out concepts x instructions (part b)")
    ax.legend(ncol=4, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the engine run
def _mean_logprob(prompt_logprobs, start: int, ids: Sequence[int]) -> float:
    """Mean log-prob of ``ids`` at prompt positions ``start ..`` (vLLM ``prompt_logprobs``)."""
    if not ids:
        return float("nan")
    lps = [prompt_logprobs[start + k][t].logprob for k, t in enumerate(ids)]
    return sum(lps) / len(lps)


def generate_rows(
    llm, cs, ins, conditions, vector_name, max_tokens: int = 64, min_tokens: int = 8, positions: str = "all"
) -> tuple[list[dict], dict]:
    """Every concept x instruction x condition as one request, all in one ``generate``
    call (one continuous batch), then the unsteered model's per-token log-likelihood of
    each output after its plain instruction (one prompt-logprob pass). The unsteered
    answer is one request per instruction, shared by the concepts. ``vector_name(method,
    concept)``: the registered vector of that method and concept. Returns the rows
    (``concept``, ``instruction``, ``condition`` ..., ``output``, ``lp``) and run stats."""
    import time

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from roast_vllm.tasks import chat_prompts
    from roast_vllm.tasks.concept import prompting_baseline

    tok = llm.get_tokenizer()
    num_layers = llm.roast_dims["num_layers"]

    def ids_of(text):  # the chat template's ids, as the rollouts' prompts (runtime.jobs.prompt_ids)
        return tok(chat_prompts(tok, [text])[0], add_special_tokens=False).input_ids

    plain = {i.qid: ids_of(i.text) for i in ins}
    reqs, keys, configs = [], [], set()
    base = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=min_tokens)
    for i in ins:
        reqs.append((plain[i.qid], base))
        keys.append((None, i, Condition("unsteered")))
    for c in cs:
        for i in ins:
            for cond in conditions:
                if cond.method == "unsteered":
                    continue
                if cond.method == "prompting":
                    reqs.append((ids_of(prompting_baseline(c, i.text)), base))
                else:
                    extra = {
                        "steer_vector": vector_name(cond.method, c.name),
                        "steer_scale": cond.scale,
                        "steer_positions": positions,
                    }
                    layers = parse_layers(cond.layers, num_layers)
                    if layers is not None:
                        extra["steer_layers"] = layers
                    configs.add((extra["steer_vector"], cond.scale, cond.layers))
                    reqs.append(
                        (
                            plain[i.qid],
                            SamplingParams(
                                temperature=0.0,
                                max_tokens=max_tokens,
                                min_tokens=min_tokens,
                                extra_args=extra,
                            ),
                        )
                    )
                keys.append((c, i, cond))
    t0 = time.perf_counter()
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=True
    )
    gen_s = time.perf_counter() - t0
    gen_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # fluency: the plain model's log-likelihood of each output after its plain instruction
    score_prompts = [plain[i.qid] + list(o.outputs[0].token_ids) for (_, i, _), o in zip(keys, outs)]
    sp1 = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    scored = llm.generate([TokensPrompt(prompt_token_ids=p) for p in score_prompts], sp1, use_tqdm=True)
    rows, baseline = [], {}
    for (c, i, cond), o, s in zip(keys, outs, scored):
        ids = list(o.outputs[0].token_ids)
        lp = _mean_logprob(s.prompt_logprobs, len(plain[i.qid]), ids)
        row = {
            "instruction": i.qid,
            "condition": cond.key,
            "method": cond.method,
            "scale": cond.scale,
            "layers": cond.layers,
            "output": o.outputs[0].text,
            "lp": lp,
            "tokens": len(ids),
        }
        if c is None:
            baseline[i.qid] = row
        else:
            rows.append({"concept": c.name, **row})
    for c in cs:  # the shared unsteered answer, once per concept (its concept score is 0)
        for i in ins:
            rows.append({"concept": c.name, **baseline[i.qid]})
    stats = {
        "requests": len(reqs),
        "steering_configurations": len(configs),
        "generated_tokens": gen_tokens,
        "generate_seconds": round(gen_s, 1),
        "tokens_per_second": round(gen_tokens / gen_s, 1) if gen_s > 0 else None,
        "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
    }
    return rows, {**stats, "baseline": baseline}


def grade_rows(judge, rows: list[dict], cs, ins, baseline: dict) -> list[dict]:
    """Add concept, relevance, fluency and aggregate to each row (``judge``: a
    ``ConceptJudge``), calibrated against the instruction's unsteered answer."""
    desc = {c.name: c.description for c in cs}
    text = {i.qid: i.text for i in ins}
    g = judge.grade(
        [r["output"] for r in rows],
        [desc[r["concept"]] for r in rows],
        [text[r["instruction"]] for r in rows],
        [baseline[r["instruction"]]["output"] for r in rows],
        [r["lp"] for r in rows],
        [baseline[r["instruction"]]["lp"] for r in rows],
    )
    return [{**r, **x} for r, x in zip(rows, g)]


def evaluate_concepts(
    llm,
    register,
    load,
    parts: dict[str, tuple[list, list]],
    methods: Sequence[str],
    sweeps: dict[str, Sequence[float]],
    layer_sets: Sequence[str],
    judge,
    max_tokens: int = 64,
) -> tuple[dict, list[dict], list[dict]]:
    """The benchmark on an open engine: register every concept's vector of every method
    (``register(llm, "method/concept", load(method, concept))``), run part a's sweep
    (unsteered, prompting, each method x scale x layer set) in one batch, keep each
    method's best condition on part a (``tune``), run those on part b, and compare.

    ``parts``: ``{"a": (concepts, instructions), "b": ...}``. Returns the report (``tuned``,
    part a's and b's summaries, the paired comparisons on b, run stats), part a's rows and
    part b's rows.
    """
    for m in methods:
        for c in parts["a"][0] + parts["b"][0]:
            register(llm, f"{m}/{c.name}", load(m, c.name))
    name = lambda m, c: f"{m}/{c}"  # noqa: E731
    sweep = [Condition("unsteered"), Condition("prompting")]
    sweep += [Condition(m, s, ls) for m in methods for s in sweeps[m] for ls in layer_sets]
    cs, ins = parts["a"]
    rows_a, stats_a = generate_rows(llm, cs, ins, sweep, name, max_tokens)
    rows_a = grade_rows(judge, rows_a, cs, ins, stats_a.pop("baseline"))
    best = tune(rows_a, methods)
    print(
        f"tuned on part a ({stats_a['steering_configurations']} configurations, "
        f"{stats_a['requests']} requests): {best}",
        flush=True,
    )
    chosen = [Condition("unsteered"), Condition("prompting")]
    chosen += [Condition.from_key(best[m]) for m in methods]
    cs, ins = parts["b"]
    rows_b, stats_b = generate_rows(llm, cs, ins, chosen, name, max_tokens)
    rows_b = grade_rows(judge, rows_b, cs, ins, stats_b.pop("baseline"))
    order = [c.key for c in chosen]
    keys = order[2:]
    comparisons = [paired(rows_b, k, b) for k in keys for b in ("unsteered", "prompting")]
    comparisons += [
        paired(rows_b, keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys))
    ]
    summary_a = summarize(rows_a)
    report = {
        "runs": {"a": stats_a, "b": stats_b},
        "tuned": best,
        "order": order,
        "summary_a": summary_a,
        "summary_b": summarize(rows_b),
        "sweep_a": sweep_table(summary_a),
        "comparisons": comparisons,
        "concepts": {p: [c.name for c in parts[p][0]] for p in parts},
        "instructions": {p: [i.qid for i in parts[p][1]] for p in parts},
    }
    return report, rows_a, rows_b


def sweep_table(summary: dict[str, dict]) -> list[dict]:
    """A ``summarize`` of part a's sweep, one flat row per condition: its mean of each
    metric over concepts (what ``tune`` chose from: whether the sweep bracketed each
    method's best shows here)."""
    out = []
    for key, s in summary.items():
        cond = Condition.from_key(key)
        out.append(
            {
                "condition": key,
                "method": cond.method,
                "scale": cond.scale,
                "layers": cond.layers,
                **{m: s[m] for m in METRICS},
            }
        )
    return out


def write_report(
    report: dict, rows_a: list[dict], rows_b: list[dict], out, settings: dict | None = None
) -> list[str]:
    """``concept.{json,csv,md,png}`` (part b's rows in the JSON), ``sweep_a.png`` and part
    a's graded outputs (``rows_a.jsonl.gz``) into ``out``; returns the lines to print (the
    table and the comparisons)."""
    import csv
    import gzip
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order, summary_b = report["order"], report["summary_b"]
    doc = {"settings": settings or {}, **report, "rows_b": rows_b}
    (out / "concept.json").write_text(json.dumps(doc, indent=1))
    with gzip.open(out / "rows_a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows_a)
    with open(out / "concept.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "concepts", *[f"{m}{x}" for m in METRICS for x in ("", "_lo", "_hi")]])
        for k in order:
            s = summary_b[k]
            w.writerow([k, s["concepts"], *[v for m in METRICS for v in (s[m], *s[m + "_ci95"])]])
    table = markdown_table(summary_b, order)
    (out / "concept.md").write_text(table + "\n")
    plot(summary_b, order, out / "concept.png")
    plot_sweep(report["sweep_a"], out / "sweep_a.png")
    lines = [table]
    for cmp in report["comparisons"]:
        lines.append(
            f"{cmp['a']} - {cmp['b']}: {cmp['mean_diff']:+.3f} [{cmp['ci95'][0]:+.3f}, {cmp['ci95'][1]:+.3f}] "
            f"({cmp['wins']}/{cmp['losses']}/{cmp['ties']} concepts, sign test p={cmp['p_sign']:.3g})"
        )
    lines.append(f"wrote {out}/concept.{{json,csv,md,png}} and sweep_a.png")
    return lines


def plot_sweep(sweep: Sequence[dict], path) -> None:
    """Part a's aggregate against scale, one line per method and layer set (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    flat = {}
    for r in sweep:
        if r["method"] in ("unsteered", "prompting"):
            flat[r["method"]] = r["aggregate"]
        else:
            lines[r["method"], r["layers"]].append((r["scale"], r["aggregate"]))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    # one colour per method, one line style per layer set
    colour = {m: f"C{k}" for k, m in enumerate(dict.fromkeys(m for m, _ in lines))}
    style = {ls: ("-", "--", ":", "-.")[k % 4] for k, ls in enumerate(dict.fromkeys(ls for _, ls in lines))}
    for (m, ls), pts in lines.items():
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            color=colour[m],
            linestyle=style[ls],
            label=f"{m} ({ls})",
        )
    for m, y in flat.items():
        ax.axhline(
            y, linestyle=(0, (1, 3)), color="grey" if m == "unsteered" else "black", linewidth=1, label=m
        )
    ax.set_xscale("log")
    ax.set_xlabel("steering scale (log)")
    ax.set_ylabel("aggregate, mean over part a's concepts")
    ax.set_title("concept steering: part a sweep (tuning)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
