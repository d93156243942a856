"""A live engine under load it must survive: more distinct steering configurations than
slots, requests finishing at different lengths, aborted and preempted at random, and a
vector re-registered in the middle of it.

Every request that is not aborted finishes; each greedy output equals its own solo run
(token for token up to the solo run's first near tie, as everywhere in this suite: vLLM's
CPU kernels are not batch-invariant); the engine still answers; and afterwards every
steering slot is free and no row was ever refused.
"""

from __future__ import annotations

import random

import pytest
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
    for i in range(4):
        roast_vllm.register_vector(engine, f"v{i}", SteeringVector.random(L, H, seed=100 + i))
    yield engine
    shutdown(engine)


def params(cfg, max_tokens):
    extra = dict(cfg) if cfg else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, extra_args=extra)


def _preemptions(llm) -> float:
    for m in llm.get_metrics():
        if m.name == "vllm:num_preemptions":
            return float(getattr(m, "value", 0) or 0)
    raise AssertionError("vLLM reported no vllm:num_preemptions metric")


def test_stress_load_with_aborts_preemption_and_re_registration(llm):
    import roast_vllm

    rng = random.Random(0)
    engine = llm.llm_engine
    v0_old = SteeringVector.random(L, H, seed=100)
    v0_new = SteeringVector.random(L, H, seed=999)
    jobs: dict[str, tuple] = {}  # id -> (prompt, cfg, max_tokens, v0 version)
    version = "old"
    n = 0

    def submit(k: int) -> None:
        nonlocal n
        for _ in range(k):
            cfg = CONFIGS[rng.randrange(len(CONFIGS))]
            rid = f"q{n}"
            n += 1
            jobs[rid] = (rng.choice(PROMPTS), cfg, rng.randint(12, 48), version)
            engine.add_request(rid, jobs[rid][0], params(cfg, jobs[rid][2]))

    submit(18)
    done: dict[str, object] = {}
    aborted: set[str] = set()
    step = 0
    preempt_before = _preemptions(llm)
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
            roast_vllm.register_vector(llm, "v0", v0_new)
            version = "new"
            submit(8)
        assert step < 5000, "the load does not drain"
    assert _preemptions(llm) > preempt_before, "the load must preempt requests for this test to bite"
    finished = {rid for rid in done if rid not in aborted}
    assert finished | aborted == set(jobs) and len(finished) >= 16, (len(finished), len(aborted))
    # the engine still answers; the workers learn of the last finished requests with this
    # next step (vLLM sends finished ids with the next schedule), so slots are free after it
    assert llm.generate(PROMPTS[:1], params(None, 4), use_tqdm=False)[0].outputs[0].token_ids
    info = llm.collective_rpc("roast_info")[0]
    assert info["active_slots"] == 0 and info["rows_refused"] == 0, info

    # solo runs: each request alone, on the v0 version it was submitted under
    roast_vllm.register_vector(llm, "v0_old", v0_old)
    ids = sorted(finished, key=lambda r: int(r[1:]))
    solo = []
    for rid in ids:
        prompt, cfg, max_tokens, ver = jobs[rid]
        if cfg and cfg["steer_vector"] == "v0" and ver == "old":
            cfg = {**cfg, "steer_vector": "v0_old"}
        solo.append(llm.generate([prompt], params(cfg, max_tokens), use_tqdm=False)[0])
    assert_greedy_match(solo, [list(done[rid].outputs[0].token_ids) for rid in ids], min_coverage=0.6)
    # steering reached the loaded requests: a steered solo run differs from the plain one
    plain = {p: llm.generate([p], params(None, 48), use_tqdm=False)[0] for p in PROMPTS}
    differ = [
        list(s.outputs[0].token_ids)
        != list(plain[jobs[rid][0]].outputs[0].token_ids)[: len(s.outputs[0].token_ids)]
        for rid, s in zip(ids, solo)
        if jobs[rid][1] and not set(jobs[rid][1]) & {"steer_positions", "steer_start", "steer_layers"}
    ]
    assert differ and all(differ)
    llm.generate(PROMPTS[:1], params(None, 4), use_tqdm=False)
    info = llm.collective_rpc("roast_info")[0]
    assert info["active_slots"] == 0 and info["rows_refused"] == 0, info
