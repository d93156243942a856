"""Driver memory of ROAST estimation: streamed (capture-and-reduce jobs, ``[L, dim]``
partials) vs gathered (every activation back on the driver, the design before), from 2k
to 50k pairs.

Each size runs in a fresh driver process with a Ray pool of ``SyntheticWorker`` actors
(``roast_vllm.runtime.synthetic``): they answer capture jobs with deterministic
pseudo-activations of the model's shapes instead of running an engine, so everything
else — pair building, job planning, Ray dispatch, the reduction on the workers
(``grouped_css``), the driver's accumulation — is the real code at sizes a 2-core
machine could not capture for real. A sampling thread reads the driver's resident set
(``/proc/self/statm``) every 5 ms during estimation; reported: its peak above the
resident set just before, the time, and the vector's agreement with the gathered one.

    python benchmarks/bench_estimate_memory.py                  # 2k..50k pairs, residual site
    python benchmarks/bench_estimate_memory.py --site mlp_act --gather-max 10000

Writes results/estimate_memory/estimate_memory.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PAIRS = (2_000, 5_000, 10_000, 20_000, 50_000)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set of this process while the ``with`` block runs (sampled)."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def synthetic_rollouts(n_pairs: int, per_side: int = 4):
    """Questions with ``per_side`` correct and ``per_side`` incorrect responses each:
    ``per_side**2`` pairs and ``2 * per_side`` texts per question."""
    from roast_vllm.tasks import Question

    n_q = max(1, round(n_pairs / per_side**2))
    qs, rollouts = [], []
    for i in range(n_q):
        qid = f"q{i:06d}"
        qs.append(Question(qid, qid, [{"role": "user", "content": qid}], "A", "", []))
        for j in range(per_side):
            rollouts.append({"qid": qid, "response": f"right {j}", "correct": True})
            rollouts.append({"qid": qid, "response": f"wrong {j}", "correct": False})
    return qs, rollouts


def run_one(n_pairs: int, mode: str, site: str, workers: int, batch: int) -> dict:
    """One driver: build the rollouts, open the pool, estimate (streamed or gathered)."""
    import torch

    from roast_vllm.engine.model_prep import default_model, model_dims
    from roast_vllm.methods.estimate import EstimateOptions, estimate_from_rollouts, vector_from_activations
    from roast_vllm.methods.pairs import build_pairs
    from roast_vllm.runtime.pool import EngineOptions, PoolOptions, WorkerPool
    from roast_vllm.runtime.synthetic import SyntheticWorker

    model = default_model()
    dims = model_dims(model)
    layers = list(range(dims["num_layers"]))
    qs, rollouts = synthetic_rollouts(n_pairs)
    opts = EstimateOptions(site=site, layers=layers, capture_batch=batch)
    eng = EngineOptions(model=model)
    with WorkerPool(eng, PoolOptions(workers=workers), worker_cls=SyntheticWorker) as wp:
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            if mode == "streamed":
                vec = estimate_from_rollouts(qs, rollouts, opts, eng, wp, progress=False)
                n = vec.provenance["n_pairs"]
            else:  # the design before: every activation comes back, then [L, pairs, dim]
                ps = build_pairs(qs, rollouts)
                by_id = {q.qid: q for q in qs}
                items = [(by_id[qid], r) for qid, r in ps.texts]
                jobs = [
                    (i, "capture_texts", (items[i : i + batch], layers, [site]))
                    for i in range(0, len(items), batch)
                ]
                chunks = dict(wp.run(jobs))
                acts = torch.cat([chunks[i][site] for i in sorted(chunks)], 1)
                vec = vector_from_activations(ps, acts, layers, opts, num_layers=len(layers))
                del acts, chunks
                n = len(ps.pairs)
        secs = time.perf_counter() - t0
    v = torch.stack([vec.directions[l] for l in layers])
    return {
        "mode": mode,
        "pairs": n,
        "texts": n // 2,  # 16 pairs from 8 texts per question
        "site": site,
        "layers": len(layers),
        "dim": int(v.shape[1]),
        "workers": workers,
        "peak_above_base_mib": round((mem.peak - mem.base) / 2**20, 1),
        "base_rss_mib": round(mem.base / 2**20, 1),
        "activations_mib_if_gathered": round(n // 2 * len(layers) * v.shape[1] * 4 / 2**20, 1),
        "seconds": round(secs, 2),
        "vector_sha": hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16],
        "vector_norm": float(v.norm()),
        "_vector": v.tolist() if n <= 2_000 else None,
    }


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, marker in (("streamed", "o"), ("gathered", "s")):
        rs = [r for r in rows if r["mode"] == mode]
        if rs:
            ax.plot(
                [r["pairs"] for r in rs], [r["peak_above_base_mib"] for r in rs], marker=marker, label=mode
            )
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("pairs")
    ax.set_ylabel("driver peak RSS above baseline (MiB)")
    r0 = rows[0]
    ax.set_title(f"ROAST estimation, driver memory ({r0['layers']} layers x {r0['dim']}, {r0['site']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=",".join(map(str, PAIRS)))
    p.add_argument("--site", choices=["residual", "mlp_act"], default="residual")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (synthetic capture)")
    p.add_argument(
        "--batch", type=int, default=256, help="texts per capture job (EstimateOptions.capture_batch)"
    )
    p.add_argument("--gather-max", type=int, default=20_000, help="largest size also run gathered")
    p.add_argument("--out", type=Path, default=Path("results/estimate_memory"))
    p.add_argument("--one", nargs=2, metavar=("PAIRS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        res = run_one(int(args.one[0]), args.one[1], args.site, args.workers, args.batch)
        print("RESULT " + json.dumps(res), flush=True)
        return
    from tqdm import tqdm

    sizes = [int(x) for x in args.pairs.split(",")]
    runs = [(n, "streamed") for n in sizes] + [(n, "gathered") for n in sizes if n <= args.gather_max]
    rows = []
    for n, mode in tqdm(runs, desc="driver processes", unit="run"):
        cmd = [sys.executable, __file__, "--one", str(n), mode, "--site", args.site]
        cmd += ["--workers", str(args.workers), "--batch", str(args.batch)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((s for s in r.stdout.splitlines() if s.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            raise SystemExit(f"run {n} {mode} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT ") :]))
    # the same pairs give the same vector either way (checked where both ran)
    for n in sizes:
        both = {
            r["mode"]: r for r in rows if r["pairs"] and r["_vector"] is not None and abs(r["pairs"] - n) < 16
        }
        if len(both) == 2:
            import torch

            a, b = torch.tensor(both["streamed"]["_vector"]), torch.tensor(both["gathered"]["_vector"])
            err = float((a - b).abs().max() / b.abs().max())
            print(f"{n} pairs: streamed vs gathered vector, max rel. difference {err:.1e}")
            assert err < 1e-5, err
    for r in rows:
        r.pop("_vector")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "estimate_memory"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1))
    plot(rows, stem.with_suffix(".png"))
    print(f"\n{'mode':<9} {'pairs':>7} {'peak above base':>16} {'acts if gathered':>17} {'time':>7}")
    for r in rows:
        print(
            f"{r['mode']:<9} {r['pairs']:>7} {r['peak_above_base_mib']:>12.1f} MiB "
            f"{r['activations_mib_if_gathered']:>13.1f} MiB {r['seconds']:>6.1f}s"
        )
    print(f"wrote {stem}.csv/.json/.png")


if __name__ == "__main__":
    main()
