"""Fusion Steering's per-prompt search: one Optuna study per prompt, every study's trial
of a round evaluated in one batch.

Each prompt (``key``) has its own study (TPE, seeded from ``seed`` and the key), and all
studies live in one Optuna journal file, so a search that stops (Ctrl-C, a crash) resumes
where it was: finished trials are kept and not run again; a trial that was asked but never
told (running when the search stopped) is marked failed and asked anew.

A round asks one trial from every study that still needs one and hands them all to
``evaluate`` at once: the caller turns them into one batch of steered requests for the
engine (each request its own coefficients), instead of one prompt at a time.

Parameters (METHODS.md): ``alpha, gamma ~ U[0.01, 1]``, one pair for every layer
(``full``) or one per third of the layers (``segmented``: ``alpha_0..2``, ``gamma_0..2``).
Only the product ``c = alpha * gamma`` of a segment reaches the model
(:func:`coefficients_of`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from roast_vllm.engine.spec import segment_of

MODES = ("full", "segmented")
LOW, HIGH = 0.01, 1.0


def _suggest(trial, mode: str) -> dict[str, float]:
    if mode == "full":
        return {n: trial.suggest_float(n, LOW, HIGH) for n in ("alpha", "gamma")}
    return {
        f"{n}_{s}": trial.suggest_float(f"{n}_{s}", LOW, HIGH) for n in ("alpha", "gamma") for s in range(3)
    }


def products_of(params: dict[str, float]) -> float | list[float]:
    """``alpha * gamma`` of a trial's parameters: one number (``full``) or one per third
    (``segmented``), what a Fusion request's ``steer_scale`` takes."""
    if "alpha" in params:
        return params["alpha"] * params["gamma"]
    return [params[f"alpha_{s}"] * params[f"gamma_{s}"] for s in range(3)]


def coefficients_of(params: dict[str, float], num_layers: int) -> list[float]:
    """``c_l`` per layer from a trial's parameters (either mode)."""
    c = products_of(params)
    if isinstance(c, float):
        return [c] * num_layers
    return [c[segment_of(l, num_layers)] for l in range(num_layers)]


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def search(
    keys: Sequence[str],
    evaluate: Callable[[list[tuple[str, dict[str, float]]]], Sequence[float]],
    n_trials: int = 5,
    mode: str = "segmented",
    storage: str | Path | None = None,
    seed: int = 0,
    study_prefix: str = "fusion",
    progress: bool = True,
) -> dict[str, dict]:
    """Search every key's parameters; returns ``{key: {"params", "value", "trials"}}``
    with the best finished trial of each study (maximizing ``evaluate``'s values; None
    where every trial failed).

    ``evaluate([(key, params), ...]) -> [value, ...]`` gets one trial per unfinished study
    per round, in ``keys`` order, and must return one finite value per trial (a non-finite
    value fails that trial). ``storage``: a journal file path (resumable) or None (memory).
    """
    import optuna
    from optuna.trial import TrialState
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if n_trials < 1:
        raise ValueError(f"n_trials={n_trials}; must be >= 1")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be distinct (one study per prompt)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = None
    if storage is not None:
        from optuna.storages.journal import JournalFileBackend

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        store = optuna.storages.JournalStorage(JournalFileBackend(str(storage)))
    studies = {}
    for k in keys:
        st = optuna.create_study(
            study_name=f"{study_prefix}:{mode}:{k}",
            storage=store,
            sampler=optuna.samplers.TPESampler(seed=_seed(seed, k)),
            direction="maximize",
            load_if_exists=True,
        )
        for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            st.tell(t.number, state=TrialState.FAIL)  # asked before an interruption, never told
        # a resumed study's sampler is seeded from its trial count too: the same seed would
        # replay the draws its first run already tried (TPE's start-up trials are random)
        n_before = len(st.get_trials(deepcopy=False))
        if n_before:
            st.sampler = optuna.samplers.TPESampler(seed=_seed(seed, f"{k}:{n_before}"))
        studies[k] = st

    def done(k: str) -> int:
        return len(studies[k].get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    total = n_trials * len(keys)
    bar = tqdm(
        total=total,
        initial=sum(min(done(k), n_trials) for k in keys),
        desc="fusion search",
        disable=not progress,
    )
    failed = dict.fromkeys(keys, 0)
    while True:
        # a study whose trials keep failing stops after n_trials failures in this call
        todo = [k for k in keys if done(k) < n_trials and failed[k] < n_trials]
        if not todo:
            break
        trials = {k: studies[k].ask() for k in todo}
        batch = [(k, _suggest(trials[k], mode)) for k in todo]
        values = list(evaluate(batch))
        if len(values) != len(batch):
            raise ValueError(f"evaluate returned {len(values)} values for {len(batch)} trials")
        for (k, _), v in zip(batch, values):
            v = float(v)
            if v == v and abs(v) != float("inf"):
                studies[k].tell(trials[k], v)
                bar.update(1)
            else:
                studies[k].tell(trials[k], state=TrialState.FAIL)
                failed[k] += 1
    bar.close()
    out = {}
    for k in keys:
        n = done(k)
        best = studies[k].best_trial if n else None
        out[k] = {
            "params": dict(best.params) if best else None,
            "value": best.value if best else None,
            "trials": n,
        }
    return out


def engine_evaluator(
    llm,
    items: dict[str, tuple[str, str]],
    reference_set: str,
    max_tokens: int = 48,
    skip_first: bool = False,
    progress: bool = False,
    min_tokens: int = 0,
) -> Callable[[list[tuple[str, dict[str, float]]]], list[float]]:
    """``evaluate`` for :func:`search` on a ``roast_vllm`` engine: each trial of a round is
    one Fusion request (``items[key] = (question, ground truth)``; reference
    ``"<reference_set>/<key>"``; its coefficients, per third or full-layer; params ``None``:
    the plain, unsteered request), all of them one ``generate`` call (greedy,
    ``max_tokens``), each scored by the search objective. The last round's scores (with
    the output ``text``) are kept in ``evaluate.last``. ``min_tokens``: no end of text
    before that many tokens (vLLM's ``min_tokens``)."""
    from vllm import SamplingParams

    from roast_vllm.methods.fusion import fusion_extra, generation_prompt, score_output

    def evaluate(batch):
        prompts, params = [], []
        for key, p in batch:
            prompts.append(generation_prompt(items[key][0]))
            extra = None if p is None else fusion_extra(f"{reference_set}/{key}", products_of(p), skip_first)
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    min_tokens=min_tokens,
                    temperature=0.0,
                    logprobs=0,
                    extra_args=extra,
                )
            )
        outs = llm.generate(prompts, params, use_tqdm=progress)
        evaluate.last = [score_output(o, items[k][1]) for o, (k, _) in zip(outs, batch)]
        return [r["objective"] for r in evaluate.last]

    evaluate.last = []
    return evaluate


def search_job(
    w,
    items: dict[str, tuple[str, str]],
    reference_set: str,
    n_trials: int,
    mode: str,
    storage: str | None,
    seed: int,
    max_tokens: int,
    skip_first: bool = False,
    study_prefix: str = "fusion",
) -> dict[str, dict]:
    """An ``EngineWorker`` job (``"roast_vllm.methods.fusion_search:search_job"``): the
    search of one shard of prompts on this worker's engine (studies are per prompt, so
    shards are independent; they share one journal file)."""
    evaluate = engine_evaluator(w.llm, items, reference_set, max_tokens, skip_first)
    return search(list(items), evaluate, n_trials, mode, storage, seed, study_prefix, progress=False)


def answers_job(
    w,
    items: dict[str, tuple[str, str]],
    reference_set: str,
    params: dict[str, dict[str, float] | None],
    max_tokens: int,
    skip_first: bool = False,
    min_tokens: int = 0,
) -> dict[str, dict]:
    """An ``EngineWorker`` job (``"roast_vllm.methods.fusion_search:answers_job"``): one
    greedy answer per key with its parameters (a search's best; ``None``: unsteered), one
    batch; ``{key: {"text", "overlap", "ppl", "objective"}}``."""
    evaluate = engine_evaluator(w.llm, items, reference_set, max_tokens, skip_first, min_tokens=min_tokens)
    batch = list(params.items())
    evaluate(batch)
    return {k: r for (k, _), r in zip(batch, evaluate.last)}
