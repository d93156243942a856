"""Steering engine vs stock vLLM throughput, paired by repeat (``roast_vllm.engine.throughput``).

Each repeat starts stock vLLM and the steering engine one at a time (alternating which
goes first) with the same vLLM arguments and prompts; each makes one short warm-up run per
steering condition, then times each of its conditions once. Reported: per condition the median of the paired
ratios ``tokens/s / stock tokens/s`` of each repeat, and their min-max. Conditions: nothing
steered; all layers steered with K = 1, 64, 256 distinct per-request vectors, at the
residual and the ``mlp_act`` site; a mixed batch (a third each: Fusion Steering requests
with K references, residual requests with K vectors, plain; ``--mixed K``, 0 to drop it).
Writes CSV, JSON (every run) and a PNG plot.

    python benchmarks/bench_throughput.py                 # compile mode (vLLM default)
    python benchmarks/bench_throughput.py --eager         # -> throughput_eager.*
    python benchmarks/bench_throughput.py --dtype bfloat16 -tp 2   # any vLLM engine argument
    python benchmarks/bench_throughput.py --interleaved 8 --ks 64 --num-prompts 128
        # engines alive together, 8 rounds of every (engine, condition) one after another:
        # resolves a few percent where engine pairs (each engine its own start) cannot
        # -> throughput_interleaved.*
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=256, help="requests per run (>= the largest K)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    p.add_argument("--sites", type=lambda s: s.split(","), default=["residual", "mlp_act"])
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument(
        "--mixed",
        type=int,
        default=64,
        metavar="K",
        help="add a mixed condition: a third each Fusion (K references), residual (K vectors), plain (0: off)",
    )
    p.add_argument("--repeats", type=int, default=3, help="engine pairs (>= 3)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compile mode)")
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="start stock (default runner), stock (V1 runner) and the steering engine once, all "
        "alive, and run ROUNDS rounds of every condition back to back (0: engine pairs)",
    )
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("results/throughput"))
    p.add_argument(
        "--summarize",
        type=Path,
        default=None,
        metavar="JSON",
        help="no engines: recompute the table and plot from the runs in a results JSON",
    )
    from roast_vllm.engine import args as engine_args

    engine_args.add_engine_args(p)  # any vLLM engine argument: --dtype, -tp, --gpu-memory-utilization ...
    args = engine_args.parse_args(p, argv)
    if args.summarize is not None:
        return resummarize(args.summarize)
    if max(args.ks) > args.num_prompts:
        p.error(f"K={max(args.ks)} distinct vectors need --num-prompts >= {max(args.ks)}")
    # our progress lines, not five engines' INFO logs
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import torch

    from roast_vllm.engine.args import default_dtype
    from roast_vllm.engine.model_prep import default_model
    from roast_vllm.engine.throughput import (
        BenchConfig,
        measure_interleaved,
        measure_paired,
        print_table,
        write_results,
    )

    model = args.model or default_model()
    kwargs = dict(
        gpu_memory_utilization=0.3,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        seed=0,
    )
    if default_dtype() is not None:  # the dtype roast_vllm.LLM would pick; stock gets the same
        kwargs["dtype"] = default_dtype()
    if args.eager:
        kwargs["enforce_eager"] = True
    kwargs.update(args.engine_kwargs)
    cfg = BenchConfig(
        model=model,
        engine_kwargs=kwargs,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        ks=args.ks,
        sites=args.sites,
        scale=args.scale,
        repeats=args.repeats,
        mixed=args.mixed,
    )
    if args.interleaved:
        rows, runs = measure_interleaved(cfg, args.interleaved)
    else:
        rows, runs = measure_paired(cfg)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    mode = "eager" if args.eager else "compile"
    meta = {
        "model": model,
        "mode": mode,
        "engine_kwargs": {k: str(v) for k, v in kwargs.items()},
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.interleaved or args.repeats,
        "unit": "interleaved rounds" if args.interleaved else "engine pairs",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": device,
        "command": "python benchmarks/bench_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    stem = ("throughput" if mode == "compile" else "throughput_eager") + (
        "_interleaved" if args.interleaved else ""
    )
    write_results(rows, runs, meta, args.out, stem)
    print_table(rows, meta)
    print(f"wrote {args.out}/{stem}.csv, .json, .png")


def resummarize(path: Path) -> None:
    """Rewrite ``<stem>.{csv,json,png}`` beside ``path`` from the runs it holds."""
    import json

    from roast_vllm.engine.throughput import STOCK, print_table, summarize, write_results

    data = json.loads(path.read_text())
    conditions = [STOCK] + [c for c in data["runs"][0]["tokens_per_s"] if c != STOCK]
    rows = summarize(data["runs"], conditions)
    write_results(rows, data["runs"], data["meta"], path.parent, path.stem)
    print_table(rows, data["meta"])


if __name__ == "__main__":
    main()
