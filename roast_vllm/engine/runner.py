"""The per-step hook on vLLM's model runner: steering slots are prepared *outside* the
model's ``forward``.

On CUDA, vLLM replays decode steps as one full CUDA graph of the whole model (the
runner wraps ``self.model`` in ``CUDAGraphWrapper``): none of the model's Python runs
then, so nothing the model computes per step in Python can be trusted. vLLM solves the
same problem for LoRA by building the per-token adapter index in the runner, before the
forward, into persistent buffers the graph reads by address. We do the same:

``GPUModelRunner._model_forward`` (V1 runner; ``CPUModelRunner`` inherits it) is the
call into ``self.model`` — the graph wrapper — made after ``_prepare_inputs`` filled the
runner's per-token request index (``req_indices``) and ``positions``. The hook wraps it
on the runner *instance* that loads a steered model: it fills ``SteeringState.token_slot``
from those buffers, then calls the original. Stock models and other runners are never
touched. The runner's ``_dummy_run`` (profiling, graph capture) calls ``self.model``
directly, so captures see the all-zero slots of an idle engine.

Where the hook cannot be installed (a runner we do not support, e.g. vLLM's V2 model
runner), engine start fails with an error that says what to do: a steered request is
never served unsteered.
"""

from __future__ import annotations

import sys
from typing import Any

from roast_vllm.engine.state import SteeringState, StepRequests

_HOOKED = "_roast_step_hook"


class UnsupportedRunnerError(RuntimeError):
    """The steered model is being loaded by a model runner we cannot hook."""


def find_model_runner() -> Any:
    """The model runner whose ``load_model`` is building the model right now (found on
    the call stack: vLLM hands the model no reference to its runner)."""
    f = sys._getframe(1)
    while f is not None:
        obj = f.f_locals.get("self")
        if obj is not None and f.f_code.co_name == "load_model" and hasattr(obj, "input_batch"):
            return obj
        f = f.f_back
    return None


def _v1_runner_class():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def install_step_hook(runner: Any, state: SteeringState) -> None:
    """Wrap ``runner._model_forward`` so every step fills ``state.token_slot`` first.

    Safe to call twice (a second call on the same runner only swaps the state)."""
    if runner is None:
        raise UnsupportedRunnerError(
            "roast-vllm: the steered model was built outside a vLLM model runner's load_model; "
            "steering needs vLLM's V1 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)"
        )
    if not isinstance(runner, _v1_runner_class()):
        raise UnsupportedRunnerError(
            f"roast-vllm: steering is not supported on the model runner {type(runner).__module__}."
            f"{type(runner).__qualname__}; set VLLM_USE_V2_MODEL_RUNNER=0 to use vLLM's V1 model "
            "runner (roast_vllm.LLM and `roast-vllm serve` do this for you)"
        )
    for attr in ("req_indices", "query_start_loc", "input_batch", "_model_forward"):
        if not hasattr(runner, attr):
            raise UnsupportedRunnerError(
                f"roast-vllm: this vLLM's model runner has no {attr!r}; the steering hook was "
                "written against vLLM 0.32's V1 runner (please report your vLLM version)"
            )
    # Prompt length of a row when vLLM's batch update gives no prompt token ids (prompt
    # embeddings): the runner's own per-row count, read after the update's moves.
    state.prompt_len_of_row = lambda row: int(runner.input_batch.num_prompt_tokens[row])
    if runner.__dict__.get(_HOOKED) is not None:
        runner.__dict__[_HOOKED].state = state
        return
    hook = _StepHook(runner, state)
    runner.__dict__[_HOOKED] = hook
    # An instance attribute shadows the class's method for this runner only.
    runner._model_forward = hook


class _StepHook:
    def __init__(self, runner: Any, state: SteeringState) -> None:
        self.runner = runner
        self.state = state
        self.inner = runner._model_forward  # the bound original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        positions = kwargs.get("positions")
        if positions is None and len(args) > 1:
            positions = args[1]
        if positions is None or positions.dim() != 1:
            raise UnsupportedRunnerError(
                "roast-vllm: the model runner gave no 1-D token positions (M-RoPE models and "
                "embedding inputs without positions are not supported)"
            )
        runner = self.runner
        # query_start_loc is the runner's own buffer (not attention metadata, which differs
        # between backends): its entry at num_reqs is the number of real tokens this step.
        batch = runner.input_batch
        n = int(runner.query_start_loc.np[batch.num_reqs])
        requests = None
        if self.state.fusion_active:
            # host-side arrays only (no device read): Fusion requests' offsets, computed
            # counts and ids (a running mean belongs to a request, not to a batch row)
            requests = StepRequests(
                runner.query_start_loc.np[: batch.num_reqs + 1],
                batch.num_computed_tokens_cpu,
                batch.req_ids,
                runner.requests,
            )
        self.state.prepare_step(runner.req_indices.gpu, positions, n, requests)
        return self.inner(*args, **kwargs)
