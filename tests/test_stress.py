"""A live engine under load it must survive: more distinct steering configurations than
slots, requests finishing at different lengths, aborted and preempted at random, and a
vector re-registered in the middle of it.

Every request that is not aborted finishes; each greedy output equals its own solo run
(token for token up to the solo run's first near tie, as everywhere in this suite: vLLM's
CPU kernels are not batch-invariant); plain requests are bit-identical to the same load
run with vectors that add zeros; the engine still answers; and afterwards every steering
slot is free and no row was ever refused.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ENGINE_DEFAULTS, assert_greedy_match, shutdown
from conftest import PROMPTS as BASE_PROMPTS
from vllm import SamplingParams

from roast_vllm import SteeringVector

pytestmark = pytest.mark.engine

L, H = 30, 576
SLOTS = 3
PROMPTS = [*BASE_PROMPTS, "My favourite recipe for soup starts with", "The capital of France is"]
# 7 distinct (vector, scale, layers) configurations for 3 slots, with every scope, plus plain
CONFIGS = [
    None,
    {"steer_vector": "v0", "steer_scale": 6.0},
    {"steer_vector": "v0", "steer_scale": 4.0, "steer_positions": "generated"},
    {"steer_vector": "v1", "steer_scale": 6.0, "steer_positions": "prompt"},
    {"steer_vector": "v1", "steer_scale": -5.0, "steer_layers": [3, 4, 5, 6]},
    {"steer_vector": "v2", "steer_scale": 6.0, "steer_positions": "last_prompt_and_generated"},
    {"steer_vector": "v2", "steer_scale": 3.0, "steer_start": 4},
    {"steer_vector": "v3", "steer_scale": 8.0},
]


@pytest.fixture(scope="module")
def llm(model_dir):
    import roast_vllm

    # The engine core in this process: each LLMEngine.step() is exactly one engine step,
    # so a load (its aborts and its mid-load registration included) replays step for step
    # (a separate engine-core process runs ahead of the client on its own clock).
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = roast_vllm.LLM(
        model_dir,
        max_steering_slots=SLOTS,
        **dict(
            ENGINE_DEFAULTS,
            enforce_eager=True,
            max_model_len=256,
            block_size=32,
            # room for one full-length sequence (fp32 KV; half that many tokens... twice as many
            # in bf16): 14 concurrent requests growing past a block each must preempt
            kv_cache_memory_bytes=320 * L * 2 * 3 * 64 * 4,
            max_num_seqs=14,
            disable_log_stats=False,
        ),
    )
    yield engine
    shutdown(engine)
    mp.undo()
    from roast_vllm.engine.state import set_state

    set_state(None)  # the in-process engine's steering state is this process's


def params(cfg, max_tokens):
    # ignore_eos: lengths depend on max_tokens only, so a run of the same load with other
    # vectors schedules, preempts and aborts exactly the same way
    extra = dict(cfg) if cfg else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, logprobs=2, extra_args=extra, ignore_eos=True
    )


def _preemptions(llm) -> float:
    for m in llm.get_metrics():
        if m.name == "vllm:num_preemptions":
            return float(getattr(m, "value", 0) or 0)
    raise AssertionError("vLLM reported no vllm:num_preemptions metric")


def _zero(skip: int) -> SteeringVector:
    """Steers nothing (adds exact zeros); the missing layer only makes its digest, and so
    its slot, distinct from the other zero vectors'."""
    return SteeringVector(directions={l: torch.zeros(H) for l in range(L) if l != skip})


def _run_load(llm, vectors: dict[str, SteeringVector], v0_later: SteeringVector):
    """26 requests over 7 configurations and 3 slots, driven step by step through the
    engine: one random abort every 40 steps, ``v0`` re-registered at step 12 (8 more
    requests follow). Returns (jobs, finished outputs, aborted ids)."""
    import roast_vllm

    for name, v in vectors.items():
        roast_vllm.register_vector(llm, name, v)
    llm.reset_prefix_cache()  # nothing running: every run starts from the same cache
    rng = random.Random(0)
    engine = llm.llm_engine
    jobs: dict[str, tuple] = {}  # id -> (prompt, cfg, max_tokens, v0 version)
    version = "old"

    def submit(k: int) -> None:
        for _ in range(k):
            cfg = CONFIGS[rng.randrange(len(CONFIGS))]
            rid = f"q{len(jobs)}"
            jobs[rid] = (rng.choice(PROMPTS), cfg, rng.randint(12, 48), version)
            engine.add_request(rid, jobs[rid][0], params(cfg, jobs[rid][2]))

    submit(18)
    done: dict[str, object] = {}
    aborted: set[str] = set()
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        if step % 40 == 0:  # abort one running or waiting request at random
            live = sorted(set(jobs) - set(done) - aborted)
            if live:
                rid = rng.choice(live)
                engine.abort_request([rid])
                aborted.add(rid)
        if step == 12:  # a vector re-registered under load; later requests get the new one
            roast_vllm.register_vector(llm, "v0", v0_later)
            version = "new"
            submit(8)
        assert step < 5000, "the load does not drain"
    return jobs, {r: o for r, o in done.items() if r not in aborted}, aborted


def _slots_free(llm) -> None:
    # the workers learn of the last finished requests with the next step (vLLM sends
    # finished ids with the next schedule): the engine still answers, and after that
    # step every slot is free and no row was ever refused
    assert llm.generate(PROMPTS[:1], params(None, 4), use_tqdm=False)[0].outputs[0].token_ids
    info = llm.collective_rpc("roast_info")[0]
    assert info["active_slots"] == 0 and info["rows_refused"] == 0, info


def _trace(out) -> list:
    """Token ids with their top-2 log-probs: equal traces mean bit-equal top logits."""
    o = out.outputs[0]
    return [(t, sorted((k, v.logprob) for k, v in lp.items())) for t, lp in zip(o.token_ids, o.logprobs)]


def test_stress_load_with_aborts_preemption_and_re_registration(llm):
    import roast_vllm

    vecs = {f"v{i}": SteeringVector.random(L, H, seed=100 + i) for i in range(4)}
    v0_new = SteeringVector.random(L, H, seed=999)
    before = _preemptions(llm)
    jobs, done, aborted = _run_load(llm, vecs, v0_new)
    assert _preemptions(llm) > before, "the load must preempt requests for this test to bite"
    assert set(done) | aborted == set(jobs) and len(done) >= 16, (len(done), len(aborted))
    _slots_free(llm)

    # plain rows are untouched by their steered neighbours, bit for bit: the same load with
    # vectors that add exact zeros (same configurations, so the same slot waits, batches,
    # preemptions and aborts) gives the plain requests identical tokens and log-probs
    zeros = {f"v{i}": _zero(skip=29 - i) for i in range(4)}
    jobs_z, done_z, aborted_z = _run_load(llm, zeros, _zero(skip=24))
    assert jobs_z == jobs and aborted_z == aborted
    plain = [r for r in done if jobs[r][1] is None]
    assert plain and all(_trace(done[r]) == _trace(done_z[r]) for r in plain)
    _slots_free(llm)

    # each request alone, on the v0 version it was submitted under
    for name, v in {**vecs, "v0_old": vecs["v0"], "v0": v0_new}.items():
        roast_vllm.register_vector(llm, name, v)
    ids = sorted(done, key=lambda r: int(r[1:]))
    solo = []
    for rid in ids:
        prompt, cfg, max_tokens, ver = jobs[rid]
        if cfg and cfg["steer_vector"] == "v0" and ver == "old":
            cfg = {**cfg, "steer_vector": "v0_old"}
        solo.append(llm.generate([prompt], params(cfg, max_tokens), use_tqdm=False)[0])
    assert_greedy_match(solo, [list(done[rid].outputs[0].token_ids) for rid in ids], min_coverage=0.6)
    # steering reached the loaded requests: a fully steered solo run differs from plain
    base = {p: llm.generate([p], params(None, 48), use_tqdm=False)[0] for p in PROMPTS}
    differ = [
        list(s.outputs[0].token_ids)
        != list(base[jobs[rid][0]].outputs[0].token_ids)[: len(s.outputs[0].token_ids)]
        for rid, s in zip(ids, solo)
        if jobs[rid][1] and not set(jobs[rid][1]) & {"steer_positions", "steer_start", "steer_layers"}
    ]
    assert differ and all(differ)
    _slots_free(llm)
