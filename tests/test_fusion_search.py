"""Fusion Steering's per-prompt search (no engine): batched rounds across studies,
parameters in range, resumption without redoing finished trials."""

from __future__ import annotations

import math

import pytest

from roast_vllm.methods import fusion_search as fs


def _objective(key: str, p: dict) -> float:
    """A made-up objective with a different optimum per key (c = alpha * gamma near 0.1 k)."""
    target = 0.1 * (1 + int(key[-1]))
    c = fs.coefficients_of(p, 3)
    return -sum((x - target) ** 2 for x in c)


def test_rounds_batch_one_trial_of_every_study():
    keys = [f"q{i}" for i in range(4)]
    calls, values = [], {k: [] for k in keys}

    def evaluate(batch):
        calls.append([k for k, _ in batch])
        for k, p in batch:
            assert set(p) == {f"{n}_{s}" for n in ("alpha", "gamma") for s in range(3)}
            assert all(fs.LOW <= v <= fs.HIGH for v in p.values())
            values[k].append(_objective(k, p))
        return [values[k][-1] for k, _ in batch]

    out = fs.search(keys, evaluate, n_trials=5, progress=False)
    assert calls == [keys] * 5  # 5 rounds, each one batch holding every prompt's trial
    for k in keys:
        assert out[k]["trials"] == 5 and out[k]["value"] == max(values[k])  # each study's best
        assert _objective(k, out[k]["params"]) == out[k]["value"]


def test_full_mode_and_seeded():
    def evaluate(batch):
        for _, p in batch:
            assert set(p) == {"alpha", "gamma"}
        return [_objective(k, p) for k, p in batch]

    a = fs.search(["q1", "q2"], evaluate, n_trials=4, mode="full", seed=3, progress=False)
    b = fs.search(["q1", "q2"], evaluate, n_trials=4, mode="full", seed=3, progress=False)
    c = fs.search(["q1", "q2"], evaluate, n_trials=4, mode="full", seed=4, progress=False)
    assert a == b and a != c
    assert (
        fs.coefficients_of(a["q1"]["params"], 4)
        == [a["q1"]["params"]["alpha"] * a["q1"]["params"]["gamma"]] * 4
    )


def test_resume_keeps_finished_trials(tmp_path):
    """Interrupted in round 3 (after two rounds were told): the rerun on the same journal
    file runs only the 3 missing rounds and ends with 5 finished trials per prompt."""
    keys = ["q0", "q1", "q2"]
    store = tmp_path / "search.journal"
    seen = []

    def interrupted(batch):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(batch)
        return [_objective(k, p) for k, p in batch]

    with pytest.raises(KeyboardInterrupt):
        fs.search(keys, interrupted, n_trials=5, storage=store, progress=False)
    rerun = []

    def evaluate(batch):
        rerun.append(batch)
        return [_objective(k, p) for k, p in batch]

    out = fs.search(keys, evaluate, n_trials=5, storage=store, progress=False)
    assert len(rerun) == 3 and all(o["trials"] == 5 for o in out.values())
    first_params = {k: p for k, p in seen[0]}
    assert all(p != first_params[k] for k, p in rerun[0])  # not the finished trials again
    again = []
    fs.search(keys, lambda b: again.append(b) or [0.0] * len(b), n_trials=5, storage=store, progress=False)
    assert again == []  # everything finished: nothing to run


def test_failed_values_and_bad_arguments():
    out = fs.search(["q0"], lambda b: [math.nan] * len(b), n_trials=2, progress=False)
    assert out["q0"] == {"params": None, "value": None, "trials": 0}  # bounded: stops after 2 failures
    with pytest.raises(ValueError, match="mode"):
        fs.search(["q0"], lambda b: [0.0], mode="thirds")
    with pytest.raises(ValueError, match="distinct"):
        fs.search(["q0", "q0"], lambda b: [0.0, 0.0])
    with pytest.raises(ValueError, match="values for"):
        fs.search(["q0", "q1"], lambda b: [0.0], progress=False)
