"""Kernel benchmark: steer_apply (the serving add) and steer_mlp_act (the mlp_act site).

grouped_css (ROAST estimation) has its own benchmark, benchmarks/bench_grouped_css.py
(bandwidth against a device copy and a torch grouped sum, bit-identity, plots).

First checks that the paths agree (torch reference vs torch.compile, and vs Triton when a
GPU is present), then times them. On CPU only the torch paths are timed; Triton timings
need a GPU and are never reported without one. Writes CSV.

    python benchmarks/bench_kernels.py                      # CPU: torch eager vs compile

steer_apply is also timed as the engine runs it on CPU (the rows path: one in-place pass
when most tokens are steered) on a decode step of SmolLM2's width, fp32, with every token,
half of them and none steered. steer_mlp_act is timed on a decode step of SmolLM2's MLP
width with every token steered (act [128, 1536] fp32, ``up`` the strided view of
gate_up): the reference, the rows path the engine runs on CPU (and, on a GPU, the Triton
kernel), next to the down projection matmul that follows it in the layer, for scale.
Those are the eager paths; ``bench_compiled_block`` times both ops as vLLM's compile mode
runs them on CPU (traced and fused by inductor) inside SmolLM2's MLP block, against the
block without steering and with the ops as opaque custom-op calls.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from roast_vllm.kernels.steer_apply import steer_apply_ref, steer_apply_rows, steer_apply_triton
from roast_vllm.kernels.steer_mlp_act import steer_mlp_act_ref, steer_mlp_act_rows, steer_mlp_act_triton


def timeit(fn, repeats: int = 3) -> float:
    fn()  # warm-up / compile
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _result(op: str, path: str, dev: str, shape: str, seconds: float) -> dict:
    """One CSV row."""
    return {"op": op, "path": path, "device": dev, "shape": shape, "seconds": round(seconds, 6)}


def bench_mlp_act(dev: str, repeats: int, gen: torch.Generator, T: int = 128, I: int = 1536) -> list[dict]:
    S, H = 65, 576
    act0 = torch.randn(T, I, generator=gen).to(dev)
    gate_up = torch.randn(T, 2 * I, generator=gen).to(dev)
    up = gate_up[:, I:]
    table = torch.randn(S, I, generator=gen).to(dev)
    slot = (torch.arange(T) % (S - 1) + 1).to(dev)  # every token steered
    scale = torch.rand(S, generator=gen).to(dev)
    w_down = torch.randn(H, I, generator=gen).to(dev) * I**-0.5
    act = act0.clone()
    want = steer_mlp_act_ref(act0.clone(), up, table, slot, scale)
    torch.testing.assert_close(
        steer_mlp_act_rows(act0.clone(), up, table, slot, scale), want, atol=1e-5, rtol=1e-5
    )
    paths = {
        "torch reference": lambda: steer_mlp_act_ref(act, up, table, slot, scale),
        "rows path (CPU)": lambda: steer_mlp_act_rows(act, up, table, slot, scale),
    }
    if dev == "cuda":
        torch.testing.assert_close(
            steer_mlp_act_triton(act0.clone(), up, table, slot, scale), want, atol=1e-5, rtol=1e-5
        )
        paths["triton"] = lambda: steer_mlp_act_triton(act, up, table, slot, scale)
    paths["down_proj matmul (scale)"] = lambda: act @ w_down.t()
    print(f"steer_mlp_act: act [{T}, {I}] fp32, every token steered, on {dev}; paths agree")
    out = []
    for name, fn in paths.items():
        s = timeit(fn, max(repeats, 20))
        out.append(_result("steer_mlp_act", name, dev, f"T{T} I{I} fp32", s))
        print(f"  {name:<26} {s * 1e6:9.1f} us")
    return out


def bench_apply_rows(dev: str, repeats: int, gen: torch.Generator) -> list[dict]:
    """``steer_apply`` as the engine runs it on CPU (``steer_apply_rows``) on a decode step
    of SmolLM2's width, fp32: every token steered, half of them, and none; beside the
    reference. CPU only (on a GPU the engine runs the Triton kernel, timed above)."""
    if dev != "cpu":
        return []
    T, S, H = 128, 65, 576
    h = torch.randn(T, H, generator=gen)
    table = torch.randn(S, H, generator=gen)
    table[0] = 0
    scale = torch.rand(S, generator=gen)
    every = torch.randint(1, S, (T,), generator=gen)
    half = every * (torch.arange(T) % 2)
    out = []
    for name, slot in (("every", every), ("half", half), ("none", torch.zeros_like(every))):
        want = steer_apply_ref(h.clone(), table, slot, scale)
        assert torch.equal(steer_apply_rows(h.clone(), table, slot, scale), want), name
        for path, fn in (("torch reference", steer_apply_ref), ("rows path (CPU)", steer_apply_rows)):
            x = h.clone()  # steered in place again and again: the timing does not depend on values
            s = timeit(lambda: fn(x, table, slot, scale), max(repeats, 20))
            out.append(_result("steer_apply", f"{path}, {name} steered", dev, f"T{T} H{H} S{S} fp32", s))
            print(f"  steer_apply fp32 [{T}, {H}], {name:<5} steered, {path:<16} {s * 1e6:9.1f} us")
    return out


def bench_compiled_block(dev: str, gen: torch.Generator, rounds: int = 3, calls: int = 100) -> list[dict]:
    """A decode step's MLP block of SmolLM2 (gate_up, SiluAndMul, down, the residual add
    and RMSNorm of the next layer; 128 tokens, fp32, one thread as vLLM's CPU worker runs
    it) compiled by inductor, three ways: stock (no steering); steering as the opaque
    custom ops (what the CPU engine's compiled graph held before: one call and one pass per
    op); steering traced (the reference, which inductor fuses into the SiluAndMul and the
    add+norm loops: what the CPU engine runs now). Each with no token and with every token
    steered (64 slots, both sites). Rounds interleave the variants; the figure is the median
    over rounds of each round's median call time. CPU only."""
    if dev != "cpu":
        return []
    T, H, I, S = 128, 576, 1536, 65
    w_gu = torch.randn(2 * I, H, generator=gen) * H**-0.5
    w_down = torch.randn(H, I, generator=gen) * I**-0.5
    x = torch.randn(T, H, generator=gen)
    res = torch.randn(T, H, generator=gen)
    t_mlp, t_res = torch.randn(S, I, generator=gen), torch.randn(S, H, generator=gen)
    t_mlp[0] = 0
    t_res[0] = 0
    scale = torch.full((S,), 4.0)
    slots = {"none": torch.zeros(T, dtype=torch.long), "every (K=64)": torch.arange(T) % 64 + 1}

    def block(x, slot, how):
        gate_up = x @ w_gu.t()
        act = torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:]
        if how == "opaque op":
            torch.ops.roast_vllm.steer_mlp_act(act, gate_up[:, I:], t_mlp, slot, scale)
        elif how == "traced":
            act = steer_mlp_act_ref(act, gate_up[:, I:], t_mlp, slot, scale)
        h = act @ w_down.t()
        if how == "opaque op":
            torch.ops.roast_vllm.steer_apply(h, t_res, slot, scale, False)
        elif how == "traced":
            h = steer_apply_ref(h, t_res, slot, scale)
        z = h + res
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns = {}
        for how in ("stock", "opaque op", "traced"):
            f = torch.compile(lambda x, slot, how=how: block(x, slot, how), fullgraph=True, dynamic=False)
            for name, slot in slots.items():
                if how == "stock" and name != "none":
                    continue
                fns[(how, name)] = (f, slot)
        want = {name: block(x, slot, "traced") for name, slot in slots.items()}  # eager
        for (_, name), (f, slot) in fns.items():
            torch.testing.assert_close(f(x, slot), want[name], atol=1e-4, rtol=1e-4)
        times: dict = {key: [] for key in fns}
        for r in range(rounds):
            keys = list(fns)
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                f, slot = fns[key]
                ts = []
                for _ in range(calls):
                    t = time.perf_counter()
                    f(x, slot)
                    ts.append(time.perf_counter() - t)
                times[key].append(sorted(ts)[calls // 2])
    finally:
        torch.set_num_threads(threads)
    base = sorted(times[("stock", "none")])[rounds // 2]
    print(f"MLP block [{T} tokens, H {H}, I {I}] fp32 compiled by inductor, 1 thread; paths agree")
    out = []
    for (how, name), ts in times.items():
        s = sorted(ts)[rounds // 2]
        out.append(_result("mlp block (compiled)", f"{how}, {name} steered", dev, f"T{T} H{H} I{I} fp32", s))
        print(f"  {how:<10} {name:<13} steered {s * 1e6:9.1f} us  ({s / base:.3f} x stock)")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, default=256, help="tokens per serving step for steer_apply")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/kernels.csv"))
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    gen = torch.Generator().manual_seed(0)

    T, S, H = args.tokens, 65, args.hidden
    h = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
    table = torch.randn(S, H, generator=gen).to(dev)
    slot = torch.randint(0, S, (T,), generator=gen).to(dev)
    scale = torch.rand(S, generator=gen).to(dev)
    want = steer_apply_ref(h.clone(), table, slot, scale)
    c_apply = torch.compile(steer_apply_ref, dynamic=False)
    torch.testing.assert_close(
        c_apply(h.clone(), table, slot, scale).float(), want.float(), atol=0, rtol=8e-3
    )
    paths = {
        "torch eager": lambda: steer_apply_ref(h, table, slot, scale * 0),
        "torch.compile": lambda: c_apply(h, table, slot, scale * 0),
    }
    if dev == "cuda":
        torch.testing.assert_close(
            steer_apply_triton(h.clone(), table, slot, scale).float(), want.float(), atol=0, rtol=8e-3
        )
        paths["triton"] = lambda: steer_apply_triton(h, table, slot, scale * 0)
    print(f"steer_apply: h [{T}, {H}] bf16, {S} slots on {dev}; paths agree")
    for name, fn in paths.items():
        s = timeit(fn, max(args.repeats, 20))
        rows.append(_result("steer_apply", name, dev, f"T{T} H{H} S{S} bf16", s))
        print(f"  {name:<14} {s * 1e6:9.1f} us")
    rows += bench_apply_rows(dev, args.repeats, gen)
    rows += bench_mlp_act(dev, args.repeats, gen)
    rows += bench_compiled_block(dev, gen)
    if dev != "cuda":
        print(
            "\nTriton timings need a CUDA GPU; none here, so only the torch paths were timed. "
            "The Triton kernels are tested for correctness in the interpreter (make test)."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
