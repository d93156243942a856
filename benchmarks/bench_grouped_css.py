"""grouped_css benchmark: the Triton kernel against the device's memory ceilings.

One benchmark per kernel, as in Liger-Kernel: this file mirrors kernels/grouped_css.py
(the op) and tests/kernels/test_grouped_css.py (its tests).

What it measures, per shape D [L, N, H] (bf16 by default; pairs in questions of
--pairs-per-question pairs, question after question, so G = N / k groups):

    copy               torch.empty_like(D).copy_(D): reads and writes D, the bandwidth
                       ceiling (GB/s stated both as bytes of D and as read + write)
    torch grouped sum  D.view(L, G, k, H).sum(2, dtype=fp32) -> fp32 [L, G, H]: the plainest
                       torch grouped sum, reads D once (only when k divides N)
    torch index_add_   S.index_add_(1, gid, D) into fp32 S [L, G, H] (per layer through an
                       fp32 copy of the layer where index_add_ refuses mixed dtypes)
    torch eager        grouped_css_ref (the reference op)
    torch.compile      torch.compile(grouped_css_ref)
    triton             grouped_css_triton (CUDA only)

Every path is timed the same way: --warmup calls, then --repeats timed calls (CUDA events
on a GPU, perf_counter on CPU); the median is reported (and the best). GB/s is bytes of D
over the median time, for every path, so the numbers compare work done, not traffic.
Targets (CUDA only): triton >= the faster torch grouped sum, triton >= 0.85 x copy.

Checks before timing: the Triton result against the reference (atol 1e-4, rtol 1e-3), two
Triton runs bit-identical, torch.compile against the reference.

On CPU (no GPU, or --device cpu) small shapes are used unless --shapes is given, only the
torch paths are timed, and the Triton kernel is only checked for correctness (and run-to-
run bit-identity) in Triton's interpreter on a tiny shape: interpreter timings say nothing
about GPU performance and are never reported. The GB/s targets need a CUDA GPU.

Writes results/grouped_css/grouped_css_<device>.{csv,json,png}.

    python benchmarks/bench_grouped_css.py                       # GPU: the two issue shapes
    python benchmarks/bench_grouped_css.py --device cpu          # CPU: small shapes, torch only
    python benchmarks/bench_grouped_css.py --shapes 30x100000x576 --pairs-per-question 8
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

GPU_SHAPES = "30x100000x576,64x20000x5120"
CPU_SHAPES = "4x8192x576,2x2048x5120"
COPY_TARGET = 0.85
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for part in text.split(","):
        L, N, H = (int(x) for x in part.lower().split("x"))
        shapes.append((L, N, H))
    return shapes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def make_inputs(L, N, H, k, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    D = torch.randn(L, N, H, generator=gen, device=device, dtype=dtype)
    w = 0.5 + torch.rand(N, generator=gen, device=device)
    g = torch.arange(N, device=device) // k
    return D, w, g


def index_add_sum(D: torch.Tensor, gid: torch.Tensor, G: int) -> torch.Tensor:
    L, _, H = D.shape
    S = torch.zeros(L, G, H, dtype=torch.float32, device=D.device)
    if D.dtype == torch.float32:
        return S.index_add_(1, gid, D)
    for l in range(L):  # index_add_ wants self and source of one dtype
        S[l].index_add_(0, gid, D[l].float())
    return S


def interpreter_check() -> dict:
    """Correctness and bit-identity of the Triton kernel in Triton's interpreter (CPU),
    on a tiny shape. Not timed."""
    from roast_vllm.kernels.grouped_css import MODES, grouped_css_ref, grouped_css_triton

    D, w, g = make_inputs(2, 96, 64, 16, torch.bfloat16, "cpu", seed=1)
    g = torch.where(torch.arange(96) < 40, -1, g)  # one group larger than a work item below
    for mode in MODES:
        a = grouped_css_triton(D, w, g, mode, chunk=16)
        b = grouped_css_triton(D, w, g, mode, chunk=16)
        assert torch.equal(a, b), f"{mode}: two interpreted runs differ"
        torch.testing.assert_close(a, grouped_css_ref(D, w, g, mode), atol=1e-4, rtol=1e-3)
    return {"shape": "L2 N96 H64 bf16", "matches_reference": True, "bit_identical": True}


def bench_shape(L, N, H, args, device) -> tuple[list[dict], dict]:
    from roast_vllm.kernels.grouped_css import grouped_css_ref, grouped_css_triton, modeled_traffic

    k, dtype = args.pairs_per_question, DTYPES[args.dtype]
    D, w, g = make_inputs(L, N, H, k, dtype, device)
    G = -(-N // k)
    nbytes = D.numel() * D.element_size()
    shape = f"L{L} N{N} H{H} {args.dtype}"
    print(f"\nD [{L}, {N}, {H}] {args.dtype} on {device}: {nbytes / 1e9:.2f} GB, G = {G} groups of {k}")
    checks = {}
    ref = grouped_css_ref(D, w, g)
    paths = {"copy": lambda: torch.empty_like(D).copy_(D)}
    if N % k == 0:
        paths["torch grouped sum"] = lambda: D.view(L, G, k, H).sum(2, dtype=torch.float32)
    paths["torch index_add_"] = lambda: index_add_sum(D, g, G)
    paths["torch eager"] = lambda: grouped_css_ref(D, w, g)
    if not args.no_compile:
        compiled = torch.compile(grouped_css_ref, dynamic=False)
        torch.testing.assert_close(compiled(D, w, g), ref, atol=1e-4, rtol=1e-3)
        checks["compile_matches_reference"] = True
        paths["torch.compile"] = lambda: compiled(D, w, g)
    if device == "cuda":
        a, b = grouped_css_triton(D, w, g), grouped_css_triton(D, w, g)
        torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-3)
        checks["triton_matches_reference"] = True
        checks["triton_bit_identical"] = bool(torch.equal(a, b))
        assert checks["triton_bit_identical"], "two Triton runs differ"
        paths["triton"] = lambda: grouped_css_triton(D, w, g)
        a = b = None
    ref = None
    print("  checks: " + ", ".join(f"{c} {v}" for c, v in checks.items()) if checks else "  checks: none")

    rows = []
    for name, fn in paths.items():
        times = time_fn(fn, device, args.warmup, args.repeats)
        med, best = statistics.median(times), min(times)
        row = {
            "shape": shape,
            "path": name,
            "device": device,
            "median_ms": round(med * 1e3, 4),
            "best_ms": round(best * 1e3, 4),
            "GBps_of_D": round(nbytes / med / 1e9, 2),
            "GBps_read_write": round(2 * nbytes / med / 1e9, 2) if name == "copy" else "",
        }
        rows.append(row)
        extra = f"  (read + write {row['GBps_read_write']} GB/s)" if name == "copy" else ""
        print(f"  {name:<18} {med * 1e3:10.3f} ms  {row['GBps_of_D']:9.2f} GB/s of D{extra}")
        sync(device)

    by = {r["path"]: r["GBps_of_D"] for r in rows}
    traffic = round(modeled_traffic(L, N, H, k, D.element_size()), 4)
    summary = {"shape": shape, "checks": checks, "modeled_triton_traffic_over_D": traffic}
    if "triton" in by:
        gsum = max(by.get("torch grouped sum", 0.0), by["torch index_add_"])
        summary.update(
            triton_over_copy=round(by["triton"] / by["copy"], 3),
            triton_over_torch_grouped_sum=round(by["triton"] / gsum, 3),
            target_copy=f">= {COPY_TARGET} x copy",
            target_grouped_sum=">= the faster torch grouped sum",
            met_copy=by["triton"] >= COPY_TARGET * by["copy"],
            met_grouped_sum=by["triton"] >= gsum,
        )
        print(
            f"  triton / copy {summary['triton_over_copy']} (target >= {COPY_TARGET}: "
            f"{'met' if summary['met_copy'] else 'NOT met'}), triton / torch grouped sum "
            f"{summary['triton_over_torch_grouped_sum']} (target >= 1: "
            f"{'met' if summary['met_grouped_sum'] else 'NOT met'})"
        )
    else:
        summary["targets"] = "not evaluated: the GB/s targets need a CUDA GPU (Triton is not timed on CPU)"
    print(f"  modeled Triton traffic: {summary['modeled_triton_traffic_over_D']} x bytes of D")
    return rows, summary


def plot(rows, device, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape]
        names = [r["path"] for r in rs]
        vals = [r["GBps_of_D"] for r in rs]
        colors = ["tab:orange" if n == "triton" else "tab:gray" if n == "copy" else "tab:blue" for n in names]
        ax.barh(names, vals, color=colors)
        copy = next(r["GBps_of_D"] for r in rs if r["path"] == "copy")
        if device == "cuda":
            ax.axvline(COPY_TARGET * copy, ls="--", color="k", lw=1, label=f"{COPY_TARGET} x copy")
            ax.legend(loc="lower right", fontsize=8)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s of D (bytes of D / median time)")
        ax.set_title(shape, fontsize=10)
    title = f"grouped_css on {device}"
    if device != "cuda":
        title += " (torch paths only; the Triton targets need a CUDA GPU)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shapes", help=f"LxNxH,... (default: {GPU_SHAPES} on CUDA, {CPU_SHAPES} on CPU)")
    p.add_argument("--small", action="store_true", help="the small CPU shapes on any device (smoke test)")
    p.add_argument("--pairs-per-question", type=int, default=16)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per path (>= 5)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(grouped_css_ref)")
    p.add_argument("--out-dir", type=Path, default=Path("results/grouped_css"))
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be >= 5")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if device == "cpu":
        # the Triton kernel runs only in the interpreter here; kernels are built lazily, so
        # setting this before the first launch is in time
        os.environ["TRITON_INTERPRET"] = "1"
    shapes = parse_shapes(args.shapes or (CPU_SHAPES if device == "cpu" or args.small else GPU_SHAPES))

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "pairs_per_question": args.pairs_per_question,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"grouped_css benchmark on {meta['device']} ({device})")
    if device == "cpu":
        meta["interpreter_check"] = interpreter_check() if meta["triton"] else "triton not installed"
        print(f"Triton kernel in the interpreter (correctness only, not timed): {meta['interpreter_check']}")

    rows, summaries = [], []
    for L, N, H in shapes:
        r, s = bench_shape(L, N, H, args, device)
        rows += r
        summaries.append(s)
        if device == "cuda":
            torch.cuda.empty_cache()
    if device != "cuda":
        print(
            "\nNo CUDA GPU: only the torch paths were timed. The GB/s targets (triton >= torch "
            f"grouped sum, >= {COPY_TARGET} x copy) need a GPU; the Triton kernel is tested for "
            "correctness in the interpreter (tests/kernels/test_grouped_css.py)."
        )

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"grouped_css_{device}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "summary": summaries}, indent=2)
    )
    plot(rows, device, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv, .json, .png")


if __name__ == "__main__":
    main()
