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


def test_interleaved_rounds_run_every_engine_and_condition_once(monkeypatch):
    """``measure_interleaved`` starts stock (default runner), stock on the V1 runner and the
    steering engine once; warms each (engine, condition) up once; each round times each of
    them once, in an order rotated by the round; ratios pair runs of the same round; every
    engine is shut down, also after a failure."""
    import roast_vllm.engine.llm as llm_mod
    import roast_vllm.engine.throughput as tp

    class Engine:
        def __init__(self, name, speed):
            self.name, self.speed, self.warm, self.closed, self.cpu = name, speed, 0, False, 0.0

        def generate(self, prompts, params, use_tqdm=False):
            self.warm += 1

    started: list[Engine] = []

    def start_stock(cfg, env_runner):
        e = Engine(f"stock runner={env_runner}", 100.0 if env_runner is None else 90.0)
        started.append(e)
        return e

    def start_steering(cfg):
        e = Engine("steering", 95.0)
        started.append(e)
        return e, {"residual": [f"v{i}" for i in range(2)]}

    timed = []
    drift = iter(range(1000))

    def _timed(llm, prompts, params):
        steered = params[0].extra_args is not None
        timed.append((llm.name, steered))
        base = llm.speed * (0.9 if steered else 1.0)
        llm.cpu += 1000.0 / base  # the worker's CPU seconds do not drift with the machine
        return base * (1 + next(drift) // 4 * 0.5)  # the machine is 50% faster each round

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(tp, "start_stock", start_stock)
    monkeypatch.setattr(tp, "start_steering", start_steering)
    monkeypatch.setattr(tp, "_timed", _timed)
    monkeypatch.setattr(tp, "worker_procs", lambda e: [e])
    monkeypatch.setattr(tp, "cpu_seconds", lambda procs: procs[0].cpu)
    monkeypatch.setattr(llm_mod, "shutdown", lambda e: setattr(e, "closed", True))
    cfg = BenchConfig(model="m", engine_kwargs={}, num_prompts=4, ks=[2], sites=["residual"])
    rows, runs = tp.measure_interleaved(cfg, rounds=3)
    assert [e.name for e in started] == ["stock runner=None", "stock runner=0", "steering"]
    assert all(e.closed for e in started)
    assert [e.warm for e in started] == [1, 1, 2]  # steering: nothing steered, K=2
    jobs = [tp.STOCK, tp.STOCK_V1, NOTHING, condition_name(2, "residual")]
    assert len(runs) == 3 and all(list(r["tokens_per_s"]) == jobs for r in runs)
    assert [r["order"][0] for r in runs] == jobs[:3]  # rotated
    by = {r["condition"]: r for r in rows}
    assert [r["condition"] for r in rows] == jobs
    # drift between rounds cancels in the paired ratios (unpaired medians would not)
    assert by[tp.STOCK_V1]["paired_ratios"] == [0.9] * 3
    assert by[NOTHING]["ratio"] == pytest.approx(0.95)
    assert by[condition_name(2, "residual")]["ratio"] == pytest.approx(0.95 * 0.9)
    assert by[tp.STOCK]["tokens_per_s"] == 150.0
    # each run's worker CPU seconds, taken around that run only: stock / condition
    assert all(set(r["worker_cpu_s"]) == set(jobs) for r in runs)
    assert by[NOTHING]["cpu_ratio"] == pytest.approx(0.95)
    assert by[condition_name(2, "residual")]["cpu_ratio_max"] == pytest.approx(0.95 * 0.9)

    def boom(cfg):
        raise RuntimeError("engine failed to start")

    started.clear()
    monkeypatch.setattr(tp, "start_steering", boom)
    with pytest.raises(RuntimeError, match="failed to start"):
        tp.measure_interleaved(cfg, rounds=1)
    assert len(started) == 2 and all(e.closed for e in started)


def test_worker_cpu_seconds_of_real_processes():
    """``cpu_seconds`` reads real processes' CPU time (it grows with work); an object that
    is no vLLM engine has no worker processes, so no CPU figure rather than an error."""
    import psutil

    from roast_vllm.engine.throughput import cpu_seconds, worker_procs

    me = [psutil.Process()]
    t0 = cpu_seconds(me)
    sum(i * i for i in range(2_000_000))
    assert cpu_seconds(me) > t0
    assert cpu_seconds([]) is None and worker_procs(object()) == []
    rows = summarize([{"tokens_per_s": {STOCK: 1.0, NOTHING: 1.0}}], [STOCK, NOTHING])
    assert "cpu_ratio" not in rows[1]  # runs without CPU figures: the column is left out


def test_mixed_condition_requests():
    """The mixed condition: a third each Fusion (references cycled), residual (vectors
    cycled) and plain requests; the steering engine needs a slot for each configuration."""
    from roast_vllm.engine import throughput as tp

    cfg = BenchConfig(model="m", engine_kwargs={}, num_prompts=12, ks=[2], sites=["mlp_act"], mixed=2)
    assert cfg.conditions()[-1] == tp.mixed_name(2)
    names = {"fusion": ["f0", "f1"], "residual": ["r0", "r1"], "mlp_act": ["m0", "m1"]}
    ps = tp._steer_params(cfg, tp.mixed_name(2), names, 4)
    extras = [p.extra_args for p in ps]
    assert [e and e["steer_vector"] for e in extras] == ["f0", "r0", None, "f1", "r1", None] * 2
    assert all(e["steer_mode"] == "fusion" and e["steer_scale"] == [0.1, 0.3, 0.2] for e in extras[::3])
    assert BenchConfig(model="m", engine_kwargs={}).conditions()[-1] != tp.mixed_name(0)
