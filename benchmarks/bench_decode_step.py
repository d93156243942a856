"""Decode-step benchmark: what steering costs one decode step of a 32B-shaped model.

What it measures
    The time of one decode step (one token per sequence, ``B`` sequences) of a proxy
    model in plain torch (no vLLM), under four conditions:

    ``stock``         no steering ops at all (the stock model);
    ``none_steered``  the steering ops present on every layer, every token in slot 0;
    ``steered``       64 distinct slots with random vectors in the tables, half the tokens
                      steered (token t is steered iff t is even, slot ``1 + (t//2) % 64``;
                      at batch 1 the one token is steered), ``residual`` + ``mlp_act``
                      steering on every layer.
    ``mixed``         a batch of all three kinds of request: ``steered``'s additive tokens
                      (t even), Fusion Steering decodes (t = 1 mod 4: the ``fusion_mean``
                      op on every layer, each its own running mean and reference) and
                      plain tokens (t = 3 mod 4); all three ops on every layer.

    Reported per batch: ms per step for each condition and the throughput ratios
    ``none_steered_over_stock``, ``steered_over_stock`` and ``mixed_over_stock`` (= stock
    ms / condition ms, so 1.0 = free, 0.98 = 2% slower). The issue's target is steered_over_stock >= 0.98 at
    batch 256 on a GPU; CPU figures say nothing about that target.

The proxy (one decoder layer, as vLLM's Llama/Qwen2 layers, defaults at Qwen2.5-32B widths)
    RMSNorm (fused add+norm from layer 1 on) -> qkv projection with bias (H=5120 -> 40
    query heads + 2 x 8 KV heads of dim 128) -> attention -> o projection -> fused
    add+RMSNorm -> gate_up [H, 2I] (I=27648) -> SiluAndMul -> [mlp_act steering] -> down
    -> [residual steering of the layer output], then a final add+RMSNorm. Steering calls
    the project's ops exactly as ``roast_vllm.engine.state`` does:
    ``steer_mlp_act(act, gate_up[:, I:], mlp_table[l], token_slot, slot_scale)`` and
    ``steer_apply(hidden, table[l], token_slot, slot_scale)`` (Triton on CUDA); in ``mixed``
    also ``fusion_mean(hidden, residual, fusion_table[l], fusion_coef[l], fusion_sum,
    fusion_meta, l)`` before the residual op, as ``SteeringState.apply_fusion`` does (the
    running sums keep growing over the timed steps: values drift, the cost does not).

    Attention is a cheap stand-in: the new token's K/V are written into a per-sequence
    cache of ``--kv-len`` tokens (default 512; 0 skips attention) and the token attends to
    it with ``scaled_dot_product_attention`` (GQA by folding the 5 query heads of a KV head
    into the query-length axis, exact for one query token). Rotary embeddings, the
    embedding lookup, the LM head and sampling are left out. At these widths a decode step
    is dominated by reading ~1 GB of bf16 weights per layer, which the proxy does in full.
    Rows are independent (one token per sequence, per-sequence caches), so steering a
    token may change only that token's row.

    On CUDA, RMSNorm, add+RMSNorm and SiluAndMul are compiled with torch.compile into
    fused kernels (``--fuse``), as vLLM's are fused; unfused eager versions would inflate
    the stock step and flatter the ratio.

How it is timed
    CUDA: each batch size captures three CUDA graphs of the whole step (after warm-up on
    a side stream, as the PyTorch docs prescribe): one without steering ops (``stock``),
    one with the additive ops (``none_steered`` and ``steered`` replay it) and one with the
    Fusion op too (``mixed``); like the engine, each step refills the persistent
    ``token_slot`` (and for ``mixed`` ``fusion_meta``) buffers with ``copy_`` (from a
    device tensor) before the replay, and the graph reads them by address. That refill is
    in the timed loop (the engine pays its ``prepare_step`` once per step too; over 4
    proxy layers instead of 64 real ones that per-step cost weighs 16x more here, so the
    proxy is pessimistic). Replays are timed with CUDA events, ``--iters`` steps per
    measurement, conditions interleaved (rotated order) over ``--repeats`` rounds; ms per
    step is the median over rounds, a ratio the median of the per-round ratios (paired
    within a round, so drift between rounds cancels).
    CPU: the eager step, timed with time.perf_counter, same interleaving; small widths
    (H=256, I=768, 2 layers, fp32, 1 thread by default) so CI runs it in seconds. The CPU
    steering ops are the torch rows paths (in place, or steered rows gathered, updated and
    written back; nothing but a scan of the slots when none is steered), so CPU ratios are no
    estimate of the GPU's. ``--compile`` times the whole step compiled by inductor instead
    (as vLLM's compile mode runs the model on CPU: the additive ops traced into the graph
    and fused by inductor, the Fusion op an opaque custom-op call); its check asserts
    unsteered rows bit-identical with and without steered neighbours in the compiled graph
    and the two graphs equal within tolerance.

Correctness check (``--check`` runs only this; it always runs before timing)
    stock == none_steered bit for bit (also with the Fusion op present and idle); in
    ``steered`` and ``mixed``, every unsteered row is bit-identical to stock and every
    steered row differs; steered rows match a run with the pure-torch reference ops
    (``*_ref``) to a relative tolerance; ``mixed``'s additive rows equal ``steered``'s bit
    for bit. On CUDA the same is asserted on the graph replays (with ``token_slot`` and
    ``fusion_meta`` refilled between replays, so a graph that baked them in as constants
    fails), plus graph vs eager agreement.

Outputs (``--out``, default results/decode_step/): ``decode_step_<cuda|cpu>.csv``,
``.json`` (device, torch version, shapes, dtype, settings, per batch: ms per condition,
ratios, all repeats) and ``.png`` (ratio vs batch, dashed line at 0.98; needs matplotlib).

Command lines
    GPU (H100/H200; torch + triton, no vLLM needed), from the repo root:
        pip install --no-deps --no-build-isolation -e . && python benchmarks/bench_decode_step.py --device cuda
    (the install is optional: without it the kernels load from ./kernels by path; with
    --no-build-isolation it needs setuptools >= 70.1 or the ``wheel`` package)
    CPU (CI; `make bench-decode`):
        python benchmarks/bench_decode_step.py --device cpu
    Check only:
        python benchmarks/bench_decode_step.py --check
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _kernel_module(name: str):
    """``roast_vllm.kernels.<name>`` (installed package; imports torch only, never vLLM),
    else the repo's ``kernels/<name>.py`` loaded by path (a checkout without install)."""
    try:
        return importlib.import_module(f"roast_vllm.kernels.{name}")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("roast_vllm"):
            raise
        path = ROOT / "kernels" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_roast_kernels_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


_sa = _kernel_module("steer_apply")
_sm = _kernel_module("steer_mlp_act")
_fm = _kernel_module("fusion_mean")
# Module globals, looked up at call time: tests monkeypatch them with broken ops.
steer_apply = _sa.steer_apply
steer_apply_ref = _sa.steer_apply_ref
steer_mlp_act = _sm.steer_mlp_act
steer_mlp_act_ref = _sm.steer_mlp_act_ref
fusion_mean = _fm.fusion_mean


def fusion_mean_ref(h, res, table, coef, msum, meta, layer):
    """The reference with ``fusion_mean``'s signature (whole ``[L, K, H]`` buffer + layer)."""
    return _fm.fusion_mean_ref(h, res, table, coef, msum[layer], meta)


CONDITIONS = ("stock", "none_steered", "steered", "mixed")
TARGET_BATCH, TARGET_RATIO = 256, 0.98
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Defaults per device: Qwen2.5-32B widths on CUDA, small widths on CPU (CI).
GPU_DEFAULTS = dict(
    layers=4,
    hidden=5120,
    intermediate=27648,
    heads=40,
    kv_heads=8,
    head_dim=128,
    kv_len=512,
    batches="1,64,256,1024",
    dtype="bf16",
    iters=50,
    repeats=7,
)
CPU_DEFAULTS = dict(
    layers=2,
    hidden=256,
    intermediate=768,
    heads=4,
    kv_heads=2,
    head_dim=64,
    kv_len=64,
    batches="1,16,64",
    dtype="fp32",
    iters=30,
    repeats=9,
)


class CheckFailed(AssertionError):
    """The three conditions disagree where they must agree (a broken steering op/graph)."""


@dataclass
class Shapes:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_len: int
    slots: int  # distinct steering slots (the tables hold slots + 1 rows; row 0 = none)


# ---------------------------------------------------------------- elementwise pieces
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float = 1e-6):
    """vLLM's fused_add_rms_norm, out of place: returns (norm(x + residual), x + residual)."""
    r = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(r, w, eps), r


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :i]) * gate_up[:, i:]


def steer_pattern(batch: int, slots: int) -> torch.Tensor:
    """Half the tokens steered (even t), round-robin over slots 1..slots."""
    t = torch.arange(batch)
    return torch.where(t % 2 == 0, 1 + (t // 2) % slots, torch.zeros_like(t))


def fusion_pattern(batch: int, slots: int, width: int) -> torch.Tensor:
    """``fusion_meta [5, width]`` of ``mixed``: token t = 1 (mod 4) is the decode of Fusion
    request j (its own running state 1 + j, slot 1 + j % slots, 64 + t positions before
    it); the rest of the entries idle (n = 0), busy ones first."""
    ts = [t for t in range(batch) if t % 4 == 1]
    meta = torch.zeros(5, width, dtype=torch.long)
    for j, t in enumerate(ts):
        meta[:, j] = torch.tensor([t, 1, 1 + j, 1 + j % slots, 64 + t])
    return meta


def fusion_mask(meta: torch.Tensor, batch: int) -> torch.Tensor:
    m = torch.zeros(batch, dtype=torch.bool)
    busy = meta[1] > 0
    m[meta[0][busy]] = True
    return m


# ---------------------------------------------------------------- the proxy model
class Proxy:
    """Random weights and the persistent buffers a steered engine keeps (tables,
    slot_scale, token_slot, KV caches, the step's input), sized for ``max_batch``."""

    def __init__(self, shapes: Shapes, dtype, device, max_batch: int, seed: int = 0, fuse: bool = False):
        self.s, self.dtype, self.device = shapes, dtype, torch.device(device)
        sh = shapes
        if sh.heads % sh.kv_heads:
            raise ValueError(f"heads ({sh.heads}) must be a multiple of kv_heads ({sh.kv_heads})")
        g = torch.Generator(device=self.device).manual_seed(seed)

        def rnd(*shape, std=1.0, dt=dtype):
            return (torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32) * std).to(dt)

        H, I = sh.hidden, sh.intermediate
        self.q_width, self.kv_width = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
        qkv_out = self.q_width + 2 * self.kv_width
        self.layers = []
        for _ in range(sh.layers):
            layer = dict(
                ln1=(1 + 0.1 * rnd(H, dt=torch.float32)).to(dtype),
                w_qkv=rnd(qkv_out, H, std=H**-0.5),
                b_qkv=rnd(qkv_out, std=0.02),
                w_o=rnd(H, self.q_width, std=self.q_width**-0.5),
                ln2=(1 + 0.1 * rnd(H, dt=torch.float32)).to(dtype),
                w_gu=rnd(2 * I, H, std=H**-0.5),
                w_down=rnd(H, I, std=I**-0.5),
            )
            if sh.kv_len:
                cache = (max_batch, sh.kv_heads, sh.kv_len, sh.head_dim)
                layer["k_cache"], layer["v_cache"] = rnd(*cache), rnd(*cache)
            self.layers.append(layer)
            del layer  # keep no loop reference to a layer's big tensors
        self.final_norm = (1 + 0.1 * rnd(H, dt=torch.float32)).to(dtype)
        S = sh.slots + 1
        self.table = rnd(sh.layers, S, H, dt=torch.float32)
        self.mlp_table = rnd(sh.layers, S, I, std=0.5, dt=torch.float32)
        self.table[:, 0].zero_()
        self.mlp_table[:, 0].zero_()
        self.slot_scale = 0.5 + 1.5 * torch.rand(S, generator=g, device=self.device)
        self.slot_scale[0] = 0.0
        self.token_slot = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        # Fusion Steering: table = c_l * r_l, coef = c_l per slot (row 0 unused), running
        # sums per state (as the engine's fusion_sum [L, max_num_seqs + 1, H]), meta per step
        self.fusion_coef = 0.05 + 0.45 * torch.rand(sh.layers, S, generator=g, device=self.device)
        self.fusion_coef[:, 0] = 0.0
        self.fusion_table = self.fusion_coef[:, :, None] * rnd(sh.layers, S, H, dt=torch.float32)
        self.fusion_sum0 = 8.0 * rnd(sh.layers, max_batch + 1, H, dt=torch.float32)
        self.fusion_sum = self.fusion_sum0.clone()
        self.fusion_meta = torch.zeros(5, max_batch, dtype=torch.long, device=self.device)
        self.x = rnd(max_batch, H)  # the step's input hidden states (a persistent buffer)
        self.rms_norm, self.add_rms_norm, self.silu_and_mul = rms_norm, add_rms_norm, silu_and_mul
        if fuse:
            lim = (
                "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            )
            setattr(torch._dynamo.config, lim, max(64, getattr(torch._dynamo.config, lim)))
            c = dict(dynamic=False, fullgraph=True)
            self.rms_norm = torch.compile(rms_norm, **c)
            self.add_rms_norm = torch.compile(add_rms_norm, **c)
            self.silu_and_mul = torch.compile(silu_and_mul, **c)

    def _attention(self, qkv: torch.Tensor, layer: dict, B: int) -> torch.Tensor:
        sh = self.s
        q = qkv[:, : self.q_width]
        if not sh.kv_len:
            return q
        group = sh.heads // sh.kv_heads
        # query head h uses KV head h // group: fold the group into the query-length axis
        q = q.view(B, sh.kv_heads, group, sh.head_dim)
        k = qkv[:, self.q_width : self.q_width + self.kv_width].view(B, sh.kv_heads, 1, sh.head_dim)
        v = qkv[:, self.q_width + self.kv_width :].view(B, sh.kv_heads, 1, sh.head_dim)
        kc, vc = layer["k_cache"][:B], layer["v_cache"][:B]
        kc[:, :, -1:].copy_(k)  # the new token's K/V at the last cache position
        vc[:, :, -1:].copy_(v)
        return F.scaled_dot_product_attention(q, kc, vc).reshape(B, self.q_width)

    def step(self, B: int, ops=None) -> torch.Tensor:
        """One decode step over tokens ``x[:B]``; ``ops = (residual_op, mlp_op)``,
        ``(residual_op, mlp_op, fusion_op)`` or None (stock: no steering ops). Returns the
        final normed hidden states [B, H]."""
        I = self.s.intermediate
        slot = self.token_slot[:B]
        h, residual = self.x[:B], None
        for idx, layer in enumerate(self.layers):
            if residual is None:
                residual, h = h, self.rms_norm(h, layer["ln1"])
            else:
                h, residual = self.add_rms_norm(h, residual, layer["ln1"])
            qkv = F.linear(h, layer["w_qkv"], layer["b_qkv"])
            h = F.linear(self._attention(qkv, layer, B), layer["w_o"])
            h, residual = self.add_rms_norm(h, residual, layer["ln2"])
            gate_up = F.linear(h, layer["w_gu"])
            act = self.silu_and_mul(gate_up)
            if ops is not None:
                ops[1](act, gate_up[:, I:], self.mlp_table[idx], slot, self.slot_scale)
            h = F.linear(act, layer["w_down"])
            if ops is not None and len(ops) > 2:  # before the additive op, as the engine
                ops[2](
                    h,
                    residual,
                    self.fusion_table[idx],
                    self.fusion_coef[idx],
                    self.fusion_sum,
                    self.fusion_meta,
                    idx,
                )
            if ops is not None:
                ops[0](h, self.table[idx], slot, self.slot_scale)
        return self.add_rms_norm(h, residual, self.final_norm)[0]


def live_ops(fusion: bool = False):
    ops = (steer_apply, steer_mlp_act)  # read at call time (monkeypatchable)
    return (*ops, fusion_mean) if fusion else ops


def ref_ops(fusion: bool = False):
    ops = (steer_apply_ref, steer_mlp_act_ref)
    return (*ops, fusion_mean_ref) if fusion else ops


# ---------------------------------------------------------------- correctness check
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _tolerance(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def compare(where: str, stock, none, steered, mask: torch.Tensor, tol: float, reference=None) -> dict:
    """Assert the three conditions' outputs [B, H] agree where they must (raise CheckFailed)."""
    if not torch.equal(stock, none):
        bad = (stock != none).any(-1).nonzero().flatten().tolist()
        raise CheckFailed(f"{where}: none_steered differs from stock (rows {bad[:8]}...)")
    m = mask.to(stock.device)
    unst = ~m
    if unst.any() and not torch.equal(steered[unst], stock[unst]):
        bad = (unst & (steered != stock).any(-1)).nonzero().flatten().tolist()
        raise CheckFailed(f"{where}: steering changed unsteered rows {bad[:8]} (must be bit-identical)")
    if m.any():
        same = m & (steered == stock).all(-1)
        if same.any():
            raise CheckFailed(f"{where}: steered rows {same.nonzero().flatten().tolist()[:8]} equal stock")
    info = {"steered_rows": int(m.sum()), "unsteered_rows": int(unst.sum())}
    if reference is not None and m.any():
        err = _rel_err(steered[m], reference[m])
        info["rel_err_vs_ref_ops"] = err
        if not err <= tol:
            raise CheckFailed(f"{where}: steered rows vs reference ops: rel. error {err:.3g} > {tol:g}")
    return info


def _mixed_step(p: Proxy, B: int, pattern, meta, ops) -> torch.Tensor:
    """``mixed`` from fresh running sums; leaves the slots and meta idle again."""
    p.fusion_sum.copy_(p.fusion_sum0)
    p.token_slot[:B].copy_(pattern)
    p.fusion_meta.copy_(meta)
    out = p.step(B, ops).clone()
    p.token_slot[:B].zero_()
    p.fusion_meta.zero_()
    return out


def check_mixed(
    where: str, stock, none, steered, mixed, pattern, meta, tol, reference, additive_tol: float = 0.0
) -> dict:
    """``mixed`` against stock and the reference (rows: additive | Fusion steered), and its
    additive rows against ``steered``'s: bit for bit (``additive_tol`` 0: the Fusion op
    must not touch them), or within ``additive_tol`` where they come from another
    compiled graph."""
    B = stock.shape[0]
    fm = fusion_mask(meta.cpu(), B).to(stock.device)
    info = compare(where, stock, none, mixed, (pattern != 0) | fm, tol, reference)
    add = (pattern != 0).to(stock.device)
    if add.any():
        same = torch.equal(mixed[add], steered[add])
        if not same and not (additive_tol and _rel_err(mixed[add], steered[add]) <= additive_tol):
            raise CheckFailed(f"{where}: additive rows differ from the steered condition's")
    return {"fusion_rows": int(fm.sum()), "mixed_rel_err_vs_ref_ops": info.get("rel_err_vs_ref_ops")}


def check_eager(p: Proxy, B: int, pattern: torch.Tensor, meta: torch.Tensor | None = None) -> dict:
    if meta is None:
        meta = fusion_pattern(B, p.s.slots, p.fusion_meta.shape[1])
    meta = meta.to(p.device)
    with torch.no_grad():
        p.token_slot[:B].zero_()
        p.fusion_meta.zero_()
        stock = p.step(B).clone()
        none = p.step(B, live_ops()).clone()
        none_f = p.step(B, live_ops(True)).clone()  # the Fusion op present, idle
        p.token_slot[:B].copy_(pattern)
        steered = p.step(B, live_ops()).clone()
        ref = p.step(B, ref_ops()).clone()
        p.token_slot[:B].zero_()
        mixed = _mixed_step(p, B, pattern, meta, live_ops(True))
        sums = p.fusion_sum.clone()
        mixed_ref = _mixed_step(p, B, pattern, meta, ref_ops(True))
        sums_ref = p.fusion_sum.clone()
        p.fusion_sum.copy_(p.fusion_sum0)
    tol = _tolerance(p.dtype)
    info = compare(f"eager, batch {B}", stock, none, steered, pattern != 0, tol, ref)
    info.update(
        check_mixed(f"eager mixed, batch {B}", stock, none_f, steered, mixed, pattern, meta, tol, mixed_ref)
    )
    if _rel_err(sums, sums_ref) > tol:
        raise CheckFailed(f"eager mixed, batch {B}: running sums differ from the reference op's")
    return {"stock": stock, "steered": steered, "mixed": mixed, "meta": meta, "info": info}


# ---------------------------------------------------------------- CUDA graphs
class GraphPair:
    """The step captured three times: without steering ops, with the additive ops, and
    with the Fusion op too (token_slot and fusion_meta read by address)."""

    def __init__(self, p: Proxy, B: int, warmup: int = 3):
        self.p, self.B = p, B
        p.token_slot[:B].zero_()
        p.fusion_meta.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                p.step(B)
                p.step(B, live_ops())
                p.step(B, live_ops(True))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.g_stock, self.g_ops, self.g_mixed = (torch.cuda.CUDAGraph() for _ in range(3))
        with torch.no_grad():
            with torch.cuda.graph(self.g_stock):
                self.out_stock = p.step(B)
            with torch.cuda.graph(self.g_ops):
                self.out_ops = p.step(B, live_ops())
            with torch.cuda.graph(self.g_mixed):
                self.out_mixed = p.step(B, live_ops(True))
        torch.cuda.synchronize()


def check_graphs(gp: GraphPair, pattern_dev: torch.Tensor, zeros_dev: torch.Tensor, eager: dict, tol: float):
    p, B = gp.p, gp.B
    slot = p.token_slot[:B]
    gp.g_stock.replay()
    stock = gp.out_stock.clone()
    slot.copy_(pattern_dev)
    gp.g_ops.replay()
    steered = gp.out_ops.clone()
    slot.copy_(zeros_dev)
    gp.g_ops.replay()
    none = gp.out_ops.clone()
    slot.copy_(pattern_dev)
    gp.g_ops.replay()
    again = gp.out_ops.clone()
    slot.copy_(zeros_dev)
    p.fusion_sum.copy_(p.fusion_sum0)
    gp.g_mixed.replay()
    none_f = gp.out_mixed.clone()  # the Fusion op present, idle
    slot.copy_(pattern_dev)
    p.fusion_meta.copy_(eager["meta"])
    gp.g_mixed.replay()
    mixed = gp.out_mixed.clone()
    slot.copy_(zeros_dev)
    p.fusion_meta.zero_()
    p.fusion_sum.copy_(p.fusion_sum0)
    if again.is_cuda:
        torch.cuda.synchronize()
    where = f"CUDA graph, batch {B}"
    info = compare(where, stock, none, steered, pattern_dev != 0, tol, eager["steered"])
    if not torch.equal(steered, again):
        raise CheckFailed(f"{where}: replays with the same token_slot differ")
    mixed_info = check_mixed(
        f"{where} (mixed)", stock, none_f, steered, mixed, pattern_dev, eager["meta"], tol, eager["mixed"]
    )
    info.update({f"graph_{k}": v for k, v in mixed_info.items()})
    for name, a, b in (("stock", stock, eager["stock"]), ("steered", steered, eager["steered"])):
        err = _rel_err(a, b)
        info[f"rel_err_graph_vs_eager_{name}"] = err
        if not err <= tol:
            raise CheckFailed(f"{where}: {name} graph replay vs eager: rel. error {err:.3g} > {tol:g}")
    return info


# ---------------------------------------------------------------- timing
def _runners(
    p: Proxy, B: int, pattern: torch.Tensor, meta: torch.Tensor, gp: GraphPair | None, compiled: bool = False
):
    slot = p.token_slot[:B]
    pattern = pattern.to(p.device)
    meta = meta.to(p.device)
    zeros = torch.zeros_like(pattern)

    def refill(src, m=None):  # the per-step buffers, as the engine's prepare_step
        slot.copy_(src)
        if m is not None:
            p.fusion_meta.copy_(m)

    if compiled:
        # one graph without the ops, one with them, one with the Fusion op too: token_slot
        # and fusion_meta are buffers read by address, so none_steered and steered run the
        # same compiled code (as in vLLM's compile mode)
        stock, ops, mixed = compiled_steps(p, B)
        return {
            "stock": stock,
            "none_steered": lambda: (refill(zeros), ops()),
            "steered": lambda: (refill(pattern), ops()),
            "mixed": lambda: (refill(pattern, meta), mixed()),
        }
    if gp is not None:
        return {
            "stock": gp.g_stock.replay,
            "none_steered": lambda: (refill(zeros), gp.g_ops.replay()),
            "steered": lambda: (refill(pattern), gp.g_ops.replay()),
            "mixed": lambda: (refill(pattern, meta), gp.g_mixed.replay()),
        }
    return {
        "stock": lambda: p.step(B),
        "none_steered": lambda: (refill(zeros), p.step(B, live_ops())),
        "steered": lambda: (refill(pattern), p.step(B, live_ops())),
        "mixed": lambda: (refill(pattern, meta), p.step(B, live_ops(True))),
    }


_compiled: dict = {}


def compiled_steps(p: Proxy, B: int):
    """``(stock, with_ops, mixed)``: the step compiled by inductor without the steering
    ops, with the additive ones, and with the Fusion op too (fixed shapes, one graph each;
    compiled once per proxy and batch)."""
    key = (id(p), B)
    if key in _compiled:
        return _compiled[key]

    def stock_step():
        return p.step(B)

    def ops_step():
        return p.step(B, live_ops())

    def mixed_step():
        return p.step(B, live_ops(True))

    c = dict(backend="inductor", fullgraph=True, dynamic=False)
    _compiled[key] = tuple(torch.compile(f, **c) for f in (stock_step, ops_step, mixed_step))
    return _compiled[key]


def check_compiled(p: Proxy, B: int, pattern: torch.Tensor, eager: dict, tol: float) -> dict:
    """The compiled steps agree: in the graph with the ops, unsteered rows are bit-identical
    with and without steered neighbours, steered rows change and match the eager steered
    step within ``tol``; the two graphs (stock, with ops) agree within ``tol`` with nothing
    steered (bit for bit only where inductor happens to fuse both alike, so not asserted)."""
    stock_fn, ops_fn, mixed_fn = compiled_steps(p, B)
    slot = p.token_slot[:B]
    with torch.no_grad():
        slot.zero_()
        p.fusion_meta.zero_()
        stock = stock_fn().clone()
        none = ops_fn().clone()
        none_f = mixed_fn().clone()
        slot.copy_(pattern)
        steered = ops_fn().clone()
        slot.zero_()
        p.fusion_sum.copy_(p.fusion_sum0)
        slot.copy_(pattern)
        p.fusion_meta.copy_(eager["meta"])
        mixed = mixed_fn().clone()
        slot.zero_()
        p.fusion_meta.zero_()
        p.fusion_sum.copy_(p.fusion_sum0)
    info = compare(f"compiled, batch {B}", none, none, steered, pattern != 0, tol, eager["steered"])
    # the mixed graph is its own inductor graph: its rows are checked against its own idle
    # run bit for bit, against the other graphs within tol (as stock vs with_ops above)
    info["mixed_idle_vs_none_rel_err"] = _rel_err(none_f, none)
    if not info["mixed_idle_vs_none_rel_err"] <= tol:
        raise CheckFailed(f"compiled, batch {B}: the idle Fusion op's graph vs none_steered differs")
    mixed_info = check_mixed(
        f"compiled mixed, batch {B}",
        none_f,
        none_f,
        steered,
        mixed,
        pattern,
        eager["meta"],
        tol,
        eager["mixed"],
        additive_tol=tol,
    )
    info.update(mixed_info)
    info["none_vs_stock_rel_err"] = _rel_err(none, stock)
    info["none_equals_stock_bitwise"] = bool(torch.equal(none, stock))
    if not info["none_vs_stock_rel_err"] <= tol:
        raise CheckFailed(
            f"compiled, batch {B}: none_steered vs stock rel. error {info['none_vs_stock_rel_err']:.3g}"
        )
    return {f"compiled_{k}": v for k, v in info.items()}


def _time_ms(fn, iters: int, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def time_conditions(runners: dict, iters: int, repeats: int, cuda: bool, progress=None) -> dict:
    """Interleaved: round r runs the conditions in an order rotated by r; returns all
    per-round ms/step per condition."""
    names = list(runners)
    with torch.no_grad():
        for fn in runners.values():  # warm-up
            for _ in range(max(2, iters // 10)):
                fn()
        if cuda:
            torch.cuda.synchronize()
        samples = {n: [] for n in names}
        for r in range(repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                samples[n].append(_time_ms(runners[n], iters, cuda))
            if progress is not None:
                progress.update(1)
    return samples


def paired_ratio(samples: dict, cond: str) -> float:
    """Median over rounds of stock/cond measured in the same round (a throughput ratio)."""
    return statistics.median(s / c for s, c in zip(samples["stock"], samples[cond]))


# ---------------------------------------------------------------- output
def _device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return rev + ("+dirty" if dirty and rev else "")
    except Exception:
        return ""


def _table(rows: list[dict]) -> str:
    head = (
        f"{'batch':>6} {'steered tok':>11} {'fusion tok':>10} {'stock ms':>10} {'none ms':>10} "
        f"{'steered ms':>11} {'mixed ms':>10} {'none/stock':>10} {'steered/stock':>13} {'mixed/stock':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['batch']:>6} {r['steered_tokens']:>11} {r['fusion_tokens']:>10} {r['stock_ms']:>10.4f} "
            f"{r['none_steered_ms']:>10.4f} {r['steered_ms']:>11.4f} {r['mixed_ms']:>10.4f} "
            f"{r['none_steered_over_stock']:>10.4f} {r['steered_over_stock']:>13.4f} {r['mixed_over_stock']:>11.4f}"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no PNG written"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["batch"] for r in rows]
    ax.plot(xs, [1.0] * len(xs), color="0.6", lw=1, label="stock (= 1)")
    for cond, marker in (("none_steered", "s"), ("steered", "o"), ("mixed", "^")):
        ax.plot(xs, [r[f"{cond}_over_stock"] for r in rows], marker=marker, label=cond)
    ax.axhline(TARGET_RATIO, ls="--", color="k", lw=1, label=f"target {TARGET_RATIO}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("batch (tokens per decode step)")
    ax.set_ylabel("throughput ratio vs stock (stock ms / ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(out: Path, tag: str, meta: dict, rows: list[dict]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"decode_step_{tag}.{k}" for k in ("csv", "json", "png")}
    cols = [
        "device",
        "dtype",
        "layers",
        "hidden",
        "intermediate",
        "batch",
        "steered_tokens",
        "fusion_tokens",
        "stock_ms",
        "none_steered_ms",
        "steered_ms",
        "mixed_ms",
        "none_steered_over_stock",
        "steered_over_stock",
        "mixed_over_stock",
    ]
    with open(paths["csv"], "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(
                {
                    "device": meta["device"],
                    "dtype": meta["dtype"],
                    **{k: meta["shapes"][k] for k in ("layers", "hidden", "intermediate")},
                    **r,
                }
            )
    paths["json"].write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    note = _plot(
        rows,
        paths["png"],
        f"decode step ({meta['timing'].split(',')[0]}), {meta['device']}, {meta['dtype']}, L={meta['shapes']['layers']}",
    )
    if note:
        paths.pop("png")
        print(note)
    return paths


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int, help="query heads (default 40 on CUDA)")
    p.add_argument("--kv-heads", type=int, help="KV heads (default 8 on CUDA)")
    p.add_argument(
        "--head-dim", type=int, help="head dim (default 128 on CUDA); heads*head_dim may differ from H"
    )
    p.add_argument("--kv-len", type=int, help="per-sequence KV cache length (0: no attention)")
    p.add_argument("--batches", type=str, help="comma-separated tokens per decode step")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    p.add_argument("--slots", type=int, default=64, help="distinct steering slots in the steered condition")
    p.add_argument("--iters", type=int, help="steps per timed measurement")
    p.add_argument("--repeats", type=int, help="interleaved rounds; the median is reported")
    p.add_argument(
        "--fuse",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the norms and SiluAndMul (auto: on for CUDA)",
    )
    p.add_argument("--no-graph", action="store_true", help="CUDA: time the eager step (no CUDA graphs)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="CPU: time the whole step compiled by torch.compile (inductor), as vLLM's compile "
        "mode runs the model; each condition is its own compiled graph",
    )
    p.add_argument("--check", action="store_true", help="run the correctness check only")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: torch threads (default 1: stable on a shared CI machine; 0 = torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "decode_step")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k, None) in (None, "auto"):
            setattr(args, k, v)
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.device == "cpu" and args.threads > 0:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:  # callers (tests) keep their own thread count
        torch.set_num_threads(threads)


def run(args) -> dict:
    cuda = args.device == "cuda"
    dtype = DTYPES[args.dtype]
    fuse = args.fuse == "on" or (args.fuse == "auto" and cuda)
    use_graphs = cuda and not args.no_graph
    shapes = Shapes(
        args.layers,
        args.hidden,
        args.intermediate,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.kv_len,
        args.slots,
    )
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    proxy = Proxy(shapes, dtype, args.device, max(args.batches), args.seed, fuse)
    if args.compile and cuda:
        raise SystemExit("--compile is the CPU mode; on CUDA the step is timed as CUDA graph replays")
    mode = "CUDA graphs" if use_graphs else ("compiled" if args.compile else "eager")
    print(
        f"decode step proxy on {_device_name(cuda)} ({args.device}, {mode}, fuse={fuse}): {asdict(shapes)}, "
        f"{args.dtype}, batches {args.batches}"
    )
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional
        tqdm = None
    rows, checks = [], {}
    total = len(args.batches) * (0 if args.check else args.repeats)
    bar = tqdm(total=total, desc="timing", leave=False) if (tqdm and total and sys.stderr.isatty()) else None
    for B in args.batches:
        pattern = steer_pattern(B, args.slots).to(args.device)
        meta = fusion_pattern(B, args.slots, proxy.fusion_meta.shape[1])
        eager = check_eager(proxy, B, pattern, meta)
        checks[B] = dict(eager["info"])
        gp = None
        if args.compile:
            checks[B].update(check_compiled(proxy, B, pattern, eager, _tolerance(dtype)))
        if use_graphs:
            gp = GraphPair(proxy, B)
            checks[B].update(check_graphs(gp, pattern, torch.zeros_like(pattern), eager, _tolerance(dtype)))
        if args.check:
            print(f"  batch {B}: checks pass {checks[B]}")
            continue
        samples = time_conditions(
            _runners(proxy, B, pattern, meta, gp, args.compile), args.iters, args.repeats, cuda, bar
        )
        med = {c: statistics.median(samples[c]) for c in CONDITIONS}
        rows.append(
            {
                "batch": B,
                "steered_tokens": int((pattern != 0).sum()),
                "fusion_tokens": int(fusion_mask(meta, B).sum()),
                **{f"{c}_ms": round(med[c], 5) for c in CONDITIONS},
                **{f"{c}_over_stock": round(paired_ratio(samples, c), 4) for c in CONDITIONS[1:]},
                "samples_ms": {c: [round(x, 5) for x in samples[c]] for c in CONDITIONS},
            }
        )
        del gp, eager
        if cuda:
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    print(
        f"checks pass: stock == none_steered bit-exactly; unsteered rows bit-identical; batches {args.batches}"
    )
    if args.check:
        return {"checks": checks}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": _device_name(cuda),
        "device_type": args.device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "git": _git_rev(),
        "dtype": args.dtype,
        "shapes": asdict(shapes),
        "timing": "CUDA graph replays, CUDA events"
        if use_graphs
        else f"{'inductor-compiled' if args.compile else 'eager'} steps, time.perf_counter",
        "kernels": {m.__name__: str(Path(m.__file__).resolve()) for m in (_sa, _sm, _fm)},
        "fused_elementwise": fuse,
        "cpu_threads": None if cuda else torch.get_num_threads(),
        "iters": args.iters,
        "repeats": args.repeats,
        "steered_pattern": f"token t steered iff t even, slot 1 + (t // 2) % {args.slots}",
        "mixed_pattern": (
            "steered's additive tokens (t even), Fusion decodes at t = 1 (mod 4) (request j: "
            f"state 1 + j, slot 1 + j % {args.slots}, 64 + t positions before), plain at t = 3 (mod 4)"
        ),
        "ratio_definition": (
            "throughput ratio: median over rounds of (stock ms / condition ms) within the round (1 = no cost)"
        ),
        "target": {
            "batch": TARGET_BATCH,
            "min_steered_over_stock": TARGET_RATIO,
            "met": None,
            "note": "evaluated on CUDA only",
        },
        "checks": {str(b): v for b, v in checks.items()},
        "seconds_total": None,
    }
    at = [r for r in rows if r["batch"] == TARGET_BATCH]
    if cuda and at:
        meta["target"].update(
            met=at[0]["steered_over_stock"] >= TARGET_RATIO, note=f"measured on {meta['device']}"
        )
    meta["seconds_total"] = round(time.perf_counter() - t0, 1)
    tag = "cuda" if cuda else ("cpu_compiled" if args.compile else "cpu")
    paths = write_outputs(args.out, tag, meta, rows)
    print()
    print(_table(rows))
    print()
    if cuda and at:
        ok = "met" if meta["target"]["met"] else "NOT met"
        print(
            f"target steered/stock >= {TARGET_RATIO} at batch {TARGET_BATCH}: {ok} "
            f"({at[0]['steered_over_stock']:.4f}, measured on {meta['device']})"
        )
    elif not cuda:
        print(f"CPU timing ({mode}): says nothing about the GPU target.")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"meta": meta, "rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
