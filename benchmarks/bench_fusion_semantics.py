"""Fusion Steering: how far the cached semantics (a serving engine's running mean) is from
the paper's uncached one (every step re-reads the sequence), on real questions.

For each of the first ``--n`` TruthfulQA dev questions (best answer as ground truth): the
model explains the ground truth (greedy), the reference vectors ``r [L, H]`` average the
answer-and-explanation positions, and for each full-layer coefficient ``c`` in ``--cs``
both semantics generate ``--max-tokens`` greedy tokens with the transformers reference
(``roast_vllm.methods.fusion``; ``--skip-first``: position 0 out of the mean and not
injected). Reported per ``c``: the share of questions whose first
token agrees, the mean share of identical tokens up to the first divergence, the mean
|difference| of the first step's log-probs, and each semantics' overlap with the ground
truth (the unsteered model's too). Writes ``results/fusion/semantics.{json,csv,png}``.

    python benchmarks/bench_fusion_semantics.py --n 12 --cs 0.1,0.3,0.6
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12, help="questions (first n rows of the dev file)")
    p.add_argument("--cs", default="0.1,0.3,0.6", help="full-layer coefficients c = alpha * gamma")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--explain-tokens", type=int, default=32)
    p.add_argument(
        "--skip-first",
        action="store_true",
        help="leave position 0 (the attention sink) out of m_l and uninjected (-> semantics_skip_first.*)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "results" / "fusion")
    args = p.parse_args()

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from roast_vllm import envs
    from roast_vllm.engine.model_prep import default_model
    from roast_vllm.methods import fusion as fu
    from roast_vllm.methods.hf import greedy_reference, load_hf
    from roast_vllm.tasks import read_csv

    torch.manual_seed(0)
    model_dir = default_model()
    model, _ = load_hf(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cs = [float(c) for c in args.cs.split(",")]
    data = envs.data_dir() / "truthfulqa_dev.csv"
    rows = [
        (r["Question"].strip(), r["Best Answer"].strip())
        for _, _, r in read_csv(data, ("Question", "Best Answer"), args.n)
    ]
    L = len(model.model.layers)

    def text(ids):
        return tok.decode(ids, skip_special_tokens=True)

    per_q = []
    t0 = time.perf_counter()
    for q, gt in tqdm(rows, desc="questions"):
        exp_ids, _ = greedy_reference(model, tok(fu.explanation_prompt(q, gt)).input_ids, args.explain_tokens)
        explanation = fu.extract_explanation(text(exp_ids))
        prefix, answer = fu.reference_text(q, gt, explanation)
        refs = fu.reference_vectors_hf(model, tok, prefix, answer)
        ids = tok(fu.generation_prompt(q)).input_ids
        plain, _ = greedy_reference(model, ids, args.max_tokens)
        rec = {"question": q, "ground_truth": gt, "plain_overlap": fu.overlap(text(plain), gt), "by_c": {}}
        for c in cs:
            coeffs = [c] * L
            a, lp_a = fu.fusion_greedy_hf(
                model, ids, refs, coeffs, args.max_tokens, "cached", skip_first=args.skip_first
            )
            b, lp_b = fu.fusion_greedy_hf(
                model, ids, refs, coeffs, args.max_tokens, "uncached", skip_first=args.skip_first
            )
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            rec["by_c"][str(c)] = {
                "first_token_agrees": a[0] == b[0],
                "tokens_before_divergence": same,
                "first_step_mean_abs_dlogprob": float((lp_a[0] - lp_b[0]).abs().mean()),
                "cached_overlap": fu.overlap(text(a), gt),
                "uncached_overlap": fu.overlap(text(b), gt),
                "cached_text": text(a),
                "uncached_text": text(b),
            }
        per_q.append(rec)
    seconds = time.perf_counter() - t0

    summary = []
    for c in cs:
        rs = [r["by_c"][str(c)] for r in per_q]
        summary.append(
            {
                "c": c,
                "questions": len(rs),
                "first_token_agrees": round(sum(r["first_token_agrees"] for r in rs) / len(rs), 3),
                "share_identical_before_divergence": round(
                    statistics.mean(r["tokens_before_divergence"] / args.max_tokens for r in rs), 3
                ),
                "first_step_mean_abs_dlogprob": round(
                    statistics.mean(r["first_step_mean_abs_dlogprob"] for r in rs), 4
                ),
                "overlap_cached": round(statistics.mean(r["cached_overlap"] for r in rs), 3),
                "overlap_uncached": round(statistics.mean(r["uncached_overlap"] for r in rs), 3),
                "overlap_unsteered": round(statistics.mean(r["plain_overlap"] for r in per_q), 3),
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "semantics_skip_first" if args.skip_first else "semantics"
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded), transformers fp32",
        "data": str(data.name),
        "n": len(per_q),
        "max_tokens": args.max_tokens,
        "seconds": round(seconds, 1),
        "skip_first": args.skip_first,
        "command": "python benchmarks/bench_fusion_semantics.py "
        + f"--n {args.n} --cs {args.cs}"
        + (" --skip-first" if args.skip_first else ""),
    }
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "questions": per_q}, indent=2)
    )
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    _plot(summary, args.out / f"{stem}.png")
    print(f"\n{len(per_q)} questions, {seconds:.0f} s")
    for s in summary:
        print(s)
    print(f"wrote {args.out}/{stem}.csv, .json, .png")


def _plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [s["c"] for s in summary]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(c, [s["first_token_agrees"] for s in summary], "o-", label="first token agrees")
    a1.plot(
        c,
        [s["share_identical_before_divergence"] for s in summary],
        "s-",
        label="share identical before divergence",
    )
    a1.set_xlabel("full-layer coefficient c = alpha * gamma")
    a1.set_ylim(-0.05, 1.05)
    a1.set_title("cached vs uncached semantics: agreement")
    a1.legend(fontsize=8)
    a2.plot(c, [s["overlap_cached"] for s in summary], "o-", label="cached (engine)")
    a2.plot(c, [s["overlap_uncached"] for s in summary], "s-", label="uncached (paper)")
    a2.axhline(summary[0]["overlap_unsteered"], color="k", ls="--", lw=0.8, label="unsteered")
    a2.set_xlabel("full-layer coefficient c")
    a2.set_ylabel("ground-truth word overlap (mean)")
    a2.set_title("overlap with the ground truth")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
