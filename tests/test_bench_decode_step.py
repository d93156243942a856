"""benchmarks/bench_decode_step.py on CPU at tiny shapes: outputs, and that its
correctness check catches broken steering ops (and, with a stand-in for a CUDA graph,
a graph that bakes the per-step slots in instead of reading the buffer)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--device=cpu",
    "--layers=2",
    "--hidden=64",
    "--intermediate=96",
    "--heads=2",
    "--kv-heads=1",
    "--head-dim=32",
    "--kv-len=8",
    "--slots=4",
    "--batches=1,4,9",
]


@pytest.fixture(scope="module")
def bench():
    name = "bench_decode_step"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)


def test_cpu_run_writes_csv_json_png(bench, tmp_path):
    res = bench.main([*TINY, "--iters=2", "--repeats=2", f"--out={tmp_path}"])
    csv_path, json_path = tmp_path / "decode_step_cpu.csv", tmp_path / "decode_step_cpu.json"
    assert res["paths"]["csv"] == csv_path and csv_path.exists() and json_path.exists()
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch"]) for r in rows] == [1, 4, 9]
    for c in bench.CONDITIONS:
        assert all(float(r[f"{c}_ms"]) > 0 for r in rows), c
        assert c == "stock" or all(float(r[f"{c}_over_stock"]) > 0 for r in rows), c
    assert [int(r["steered_tokens"]) for r in rows] == [1, 2, 5]  # half, round-robin, t even
    assert [int(r["fusion_tokens"]) for r in rows] == [0, 1, 2]  # t = 1 (mod 4)
    data = json.loads(json_path.read_text())
    assert data["device_type"] == "cpu" and data["dtype"] == "fp32"
    assert data["shapes"]["hidden"] == 64 and data["torch"] == torch.__version__
    assert data["target"]["met"] is None  # never a GPU verdict from a CPU run
    for r in data["results"]:
        assert set(r["samples_ms"]) == set(bench.CONDITIONS)
        assert all(len(v) == 2 for v in r["samples_ms"].values())
        pairs = sorted(s / c for s, c in zip(r["samples_ms"]["stock"], r["samples_ms"]["steered"]))
        assert r["steered_over_stock"] == pytest.approx(sum(pairs) / 2, rel=1e-3)  # median of 2 rounds
    assert data["checks"]["9"]["unsteered_rows"] == 4 and data["checks"]["9"]["fusion_rows"] == 2
    assert data["checks"]["9"]["mixed_rel_err_vs_ref_ops"] < 1e-4
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "decode_step_cpu.png").stat().st_size > 0


def test_steer_pattern(bench):
    p = bench.steer_pattern(10, 3)
    assert p.tolist() == [1, 0, 2, 0, 3, 0, 1, 0, 2, 0]


def test_fusion_pattern(bench):
    meta = bench.fusion_pattern(10, 3, 12)
    assert meta.shape == (5, 12)
    # start, n, state, slot, count0 of the decodes at t = 1, 5, 9; the rest idle
    assert meta[:, :3].T.tolist() == [[1, 1, 1, 1, 65], [5, 1, 2, 2, 69], [9, 1, 3, 3, 73]]
    assert not meta[:, 3:].any()
    assert bench.fusion_mask(meta, 10).nonzero().flatten().tolist() == [1, 5, 9]


def _touch_all_rows(real):
    def broken(x, *args):
        real(x, *args)
        x.add_(1e-3)  # also moves slot-0 rows
        return x

    return broken


@pytest.mark.parametrize("op", ["steer_apply", "steer_mlp_act"])
def test_check_catches_op_that_touches_unsteered_rows(bench, monkeypatch, tmp_path, op):
    monkeypatch.setattr(bench, op, _touch_all_rows(getattr(bench, op)))
    with pytest.raises(bench.CheckFailed, match="none_steered differs from stock"):
        bench.main([*TINY, "--check", f"--out={tmp_path}"])


def test_check_catches_op_that_leaks_into_other_rows(bench, monkeypatch, tmp_path):
    real = bench.steer_apply

    def leaky(h, table, slot, scale):
        real(h, table, slot, scale)
        if (slot != 0).any():  # a no-op when nothing is steered, wrong rows otherwise
            h[slot == 0] += 1e-3
        return h

    monkeypatch.setattr(bench, "steer_apply", leaky)
    with pytest.raises(bench.CheckFailed, match="changed unsteered rows"):
        bench.main([*TINY, "--check", f"--out={tmp_path}"])


def test_check_catches_fusion_op_that_touches_idle_rows(bench, monkeypatch, tmp_path):
    real = bench.fusion_mean

    def broken(h, *args):
        real(h, *args)
        h.add_(1e-3)
        return h

    monkeypatch.setattr(bench, "fusion_mean", broken)
    with pytest.raises(bench.CheckFailed, match="none_steered differs from stock"):
        bench.main([*TINY, "--check", f"--out={tmp_path}"])


def test_check_catches_fusion_op_that_leaks_or_does_nothing(bench, monkeypatch, tmp_path):
    real = bench.fusion_mean

    def leaky(h, res, table, coef, msum, meta, layer):
        real(h, res, table, coef, msum, meta, layer)
        if meta[1, 0] > 0:  # a no-op when idle, touches the plain rows otherwise
            h[3::4] += 1e-3
        return h

    monkeypatch.setattr(bench, "fusion_mean", leaky)
    with pytest.raises(bench.CheckFailed, match="mixed.*changed unsteered rows"):
        bench.main([*TINY, "--check", f"--out={tmp_path}"])
    monkeypatch.setattr(bench, "fusion_mean", lambda h, *a: h)
    with pytest.raises(bench.CheckFailed, match="mixed.*equal stock"):
        bench.main([*TINY, "--check", f"--out={tmp_path}"])


def test_check_catches_steering_that_does_nothing(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "steer_apply", lambda h, *a: h)
    monkeypatch.setattr(bench, "steer_mlp_act", lambda act, *a: act)
    with pytest.raises(bench.CheckFailed, match="equal stock"):
        bench.main([*TINY, "--check", f"--out={tmp_path}"])


class _FakeGraph:
    """CPU stand-in for a captured CUDA graph: replay recomputes into a fixed output. With
    ``baked`` ("token_slot" or "fusion_meta"), it uses that buffer as seen at "capture" (a
    graph with constant per-step buffers)."""

    def __init__(self, p, B, ops, out, baked):
        self.p, self.B, self.ops, self.out = p, B, ops, out
        self.buf = {"token_slot": p.token_slot[:B], "fusion_meta": p.fusion_meta}.get(baked)
        self.snapshot = None if self.buf is None else self.buf.clone()

    def replay(self):
        live = None if self.buf is None else self.buf.clone()
        if self.snapshot is not None:
            self.buf.copy_(self.snapshot)
        with torch.no_grad():
            self.out.copy_(self.p.step(self.B, self.ops))
        if live is not None:
            self.buf.copy_(live)


@pytest.mark.parametrize("baked", [None, "token_slot", "fusion_meta"])
def test_graph_check_reads_per_step_buffers_by_address(bench, baked):
    shapes = bench.Shapes(
        layers=2, hidden=64, intermediate=96, heads=2, kv_heads=1, head_dim=32, kv_len=8, slots=4
    )
    p = bench.Proxy(shapes, torch.float32, "cpu", max_batch=8)
    B = 8
    pattern = bench.steer_pattern(B, shapes.slots)
    eager = bench.check_eager(p, B, pattern)
    gp = type("GP", (), {})()
    gp.p, gp.B = p, B
    gp.out_stock, gp.out_ops, gp.out_mixed = (torch.empty(B, 64) for _ in range(3))
    p.token_slot.zero_()  # "captured" with every slot 0 and fusion_meta idle, as GraphPair does
    p.fusion_meta.zero_()
    gp.g_stock = _FakeGraph(p, B, None, gp.out_stock, baked)
    gp.g_ops = _FakeGraph(p, B, bench.live_ops(), gp.out_ops, baked)
    gp.g_mixed = _FakeGraph(p, B, bench.live_ops(True), gp.out_mixed, baked)
    args = (gp, pattern, torch.zeros_like(pattern), eager, 1e-4)
    if baked:
        match = "equal stock" if baked == "token_slot" else r"\(mixed\).*equal stock"
        with pytest.raises(bench.CheckFailed, match=match):
            bench.check_graphs(*args)
    else:
        info = bench.check_graphs(*args)
        assert info["steered_rows"] == 4 and info["rel_err_graph_vs_eager_steered"] == 0.0
        assert info["graph_fusion_rows"] == 2 and info["graph_mixed_rel_err_vs_ref_ops"] == 0.0
