"""The throughput benchmark's bookkeeping (no engine): ratios are paired per repeat."""

from __future__ import annotations

import json

import pytest

from roast_vllm.engine.throughput import NOTHING, STOCK, BenchConfig, condition_name, summarize, write_results


def test_conditions_cover_every_k_and_site():
    cfg = BenchConfig(model="m", engine_kwargs={}, ks=[1, 64, 256])
    assert cfg.conditions() == [NOTHING] + [
        condition_name(k, s) for s in ("residual", "mlp_act") for k in (1, 64, 256)
    ]


def test_ratios_are_paired_by_repeat():
    """A condition that is always 2% below stock *in its own repeat* gets 0.98, however
    much stock itself moves between repeats (unpaired medians would say otherwise)."""
    stock = [100.0, 150.0, 80.0]
    runs = [
        {"repeat": i, "tokens_per_s": {STOCK: s, NOTHING: 0.98 * s, "K=64 residual, all layers": s * r}}
        for i, (s, r) in enumerate(zip(stock, [0.9, 1.0, 0.95]))
    ]
    rows = {r["condition"]: r for r in summarize(runs, [STOCK, NOTHING, "K=64 residual, all layers"])}
    assert rows[STOCK]["ratio"] == 1.0
    assert rows[NOTHING]["ratio"] == pytest.approx(0.98) and rows[NOTHING]["paired_ratios"] == [0.98] * 3
    k = rows["K=64 residual, all layers"]
    assert (k["ratio"], k["ratio_min"], k["ratio_max"]) == (0.95, 0.9, 1.0)
    assert rows[NOTHING]["tokens_per_s"] == pytest.approx(98.0)  # median of 98, 147, 78.4


def test_order_balanced_ratio_cancels_an_engine_order_effect():
    """The second engine of a repeat runs 10% faster; with 2 stock-first repeats and 1
    steering-first one the median says 1.10, the order-balanced ratio the truth (1.0)."""
    runs = [
        {"stock_first": True, "tokens_per_s": {STOCK: 100.0, NOTHING: 110.0}},
        {"stock_first": False, "tokens_per_s": {STOCK: 110.0, NOTHING: 100.0}},
        {"stock_first": True, "tokens_per_s": {STOCK: 100.0, NOTHING: 110.0}},
    ]
    row = summarize(runs, [STOCK, NOTHING])[1]
    assert row["ratio"] == pytest.approx(1.1)
    assert row["ratio_balanced"] == pytest.approx(1.0)


def test_write_results(tmp_path):
    runs = [{"repeat": i, "tokens_per_s": {STOCK: 100.0 + i, NOTHING: 99.0 + i}} for i in range(3)]
    rows = summarize(runs, [STOCK, NOTHING])
    meta = {"mode": "compile", "num_prompts": 4, "max_tokens": 2, "repeats": 3, "device": "cpu"}
    write_results(rows, runs, meta, tmp_path, "throughput")
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["rows"] == rows and data["runs"] == runs
    assert (
        (tmp_path / "throughput.csv").read_text().splitlines()[0].startswith("condition,tokens_per_s,ratio")
    )
    assert (tmp_path / "throughput.png").stat().st_size > 1000
