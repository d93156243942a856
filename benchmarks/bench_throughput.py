"""Steered vs unsteered vLLM throughput, in one engine and one run.

Conditions (same prompts, greedy, ``ignore_eos`` so every run makes the same number of
tokens): unsteered; every layer steered with one shared vector; every layer steered with
K distinct per-request vectors (K = 1, 16, 64 by default). Prints tokens/s and the ratio
to unsteered, writes CSV, JSON and a PNG plot.

    python benchmarks/bench_throughput.py                  # compile mode (vLLM default)
    python benchmarks/bench_throughput.py --eager --num-prompts 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compile mode)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("results/throughput"))
    from roast_vllm import engine_args

    engine_args.add_engine_args(p)  # any vLLM engine argument: --dtype, -tp, --gpu-memory-utilization ...
    args = engine_args.parse_args(p, argv)

    import torch

    import roast_vllm
    from roast_vllm.model_prep import default_model
    from roast_vllm.throughput import (
        build_prompts,
        measure,
        print_table,
        register_random_vectors,
        write_results,
    )

    model = args.model or default_model()
    kwargs = dict(
        gpu_memory_utilization=0.3,
        max_model_len=args.max_model_len,
        max_steering_slots=max(args.ks + [1]),
        seed=0,
    )
    if args.eager:
        kwargs["enforce_eager"] = True
    kwargs.update(args.engine_kwargs)
    t0 = time.perf_counter()
    llm = roast_vllm.LLM(model, **kwargs)
    start_s = time.perf_counter() - t0
    names = register_random_vectors(llm, max(args.ks + [1]))
    rows = measure(
        llm, build_prompts(args.num_prompts), args.ks, names, args.max_tokens, args.scale, args.repeats
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {
        "model": model,
        "mode": "eager" if args.eager else "compile",
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "engine_start_s": round(start_s, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}",
        "device": device,
        "command": "python benchmarks/bench_throughput.py " + " ".join(argv or __import__("sys").argv[1:]),
    }
    write_results(rows, meta, args.out)
    print_table(rows, meta)
    print(f"wrote {args.out}/throughput.csv, .json, .png")


if __name__ == "__main__":
    main()
