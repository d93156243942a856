"""The per-step hook on vLLM's model runner and the scheduler choice, without an engine.

Steering slots are computed by a hook on the model runner *before* the forward (as vLLM
prepares LoRA's per-token indices), from the runner's own per-token request index and
positions, so a full CUDA graph replay (no model Python) still reads the right slots."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from roast_vllm import SteeringVector
from roast_vllm.engine.runner import UnsupportedRunnerError, find_model_runner, install_step_hook
from roast_vllm.engine.spec import SteerSpec
from roast_vllm.engine.state import SteeringState

L, H = 3, 8


def _state() -> SteeringState:
    s = SteeringState(L, H, max_slots=4, max_num_seqs=4, max_num_tokens=16, dtype=torch.float32)
    s.register_vector("a", SteeringVector(directions={l: torch.ones(H) for l in range(L)}))
    return s


def _fake_v1_runner(calls: list):
    """A V1 CPU model runner object with only the fields the hook reads (no __init__)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    runner = object.__new__(CPUModelRunner)
    runner.input_batch = SimpleNamespace(num_reqs=0)
    runner.query_start_loc = SimpleNamespace(np=np.zeros(8, dtype=np.int32))
    runner.req_indices = SimpleNamespace(gpu=torch.zeros(16, dtype=torch.int64))

    def _model_forward(input_ids=None, positions=None, **kw):
        calls.append(positions.clone())
        return "out"

    runner._model_forward = _model_forward
    return runner


def _step(runner, rows: list[int], positions: list[int], pad: int = 0):
    """What the runner's _prepare_inputs leaves behind, then the forward call."""
    num_reqs = max(rows) + 1
    runner.input_batch.num_reqs = num_reqs
    counts = np.bincount(rows, minlength=num_reqs)
    runner.query_start_loc.np[: num_reqs + 1] = np.concatenate([[0], np.cumsum(counts)])
    runner.req_indices.gpu[: len(rows)] = torch.tensor(rows)
    pos = torch.tensor(positions + [0] * pad)
    return runner._model_forward(input_ids=None, positions=pos)


def test_hook_fills_token_slots_before_every_forward():
    calls: list = []
    runner, st = _fake_v1_runner(calls), _state()
    install_step_hook(runner, st)
    st.set_row(0, SteerSpec("a", 2.0, positions="generated"), prompt_len=3)
    st.set_row(1, None, prompt_len=2)
    st.set_row(2, SteerSpec("a", 2.0, start=1), prompt_len=4)
    st.sync_rows()
    k = st.row_slot_cpu[0].item()
    assert k == st.row_slot_cpu[2].item() != 0  # one configuration, one slot
    # mixed step: row 0 decodes at position 3, row 1 prefills 2, row 2 prefills 3; 2 pad
    assert _step(runner, [0, 1, 1, 2, 2, 2], [3, 0, 1, 0, 1, 2], pad=2) == "out"
    assert st.token_slot[:8].tolist() == [k, 0, 0, 0, k, k, 0, 0]
    # next (decode-only) step: the model's Python is not needed, the hook alone updates
    _step(runner, [0, 1, 2], [4, 2, 3], pad=1)
    assert st.token_slot[:4].tolist() == [k, 0, k, 0]
    assert st.num_steps_prepared == 2 and len(calls) == 2


def test_hook_is_installed_once_and_follows_a_new_state():
    calls: list = []
    runner = _fake_v1_runner(calls)
    a, b = _state(), _state()
    install_step_hook(runner, a)
    install_step_hook(runner, b)
    _step(runner, [0], [0])
    assert (a.num_steps_prepared, b.num_steps_prepared) == (0, 1)
    assert len(calls) == 1  # not wrapped twice


def test_unsupported_runner_fails_loudly():
    class V2LikeRunner:
        input_batch = None

        def _model_forward(self, **kw):
            return None

    with pytest.raises(UnsupportedRunnerError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        install_step_hook(V2LikeRunner(), _state())
    with pytest.raises(UnsupportedRunnerError, match="outside a vLLM model runner"):
        install_step_hook(None, _state())


def test_find_model_runner_walks_to_load_model():
    class Runner:
        input_batch = object()

        def load_model(self):
            return _build()

    def _build():
        return find_model_runner()

    r = Runner()
    assert r.load_model() is r
    assert _build() is None


def test_scheduler_follows_resolved_async_setting(model_dir):
    """One qualname for users; the instance's class follows the engine's resolved
    async-scheduling value (vLLM's CPU platform resolves it off)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from roast_vllm.engine.scheduler import AsyncSteeringScheduler, SteeringScheduler

    cfg = EngineArgs(model=model_dir, max_model_len=512).create_engine_config()
    resolved = cfg.scheduler_config.async_scheduling
    assert resolved is False  # CPU platform
    obj = SteeringScheduler.__new__(SteeringScheduler, vllm_config=cfg)
    assert type(obj) is SteeringScheduler and not isinstance(obj, AsyncScheduler)
    cfg.scheduler_config.async_scheduling = True  # as vLLM resolves it on CUDA
    obj = SteeringScheduler.__new__(SteeringScheduler, vllm_config=cfg)
    assert type(obj) is AsyncSteeringScheduler and isinstance(obj, AsyncScheduler)
    # the steering rules come before vLLM's scheduler in the MRO
    mro = AsyncSteeringScheduler.__mro__
    assert mro.index(SteeringScheduler) < mro.index(AsyncScheduler)
