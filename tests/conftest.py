"""Shared test fixtures. Engines are expensive on this CPU-only machine (~40 s eager,
~200 s compiled), so each test module starts at most one roast engine (plus, where a
comparison needs it, one stock engine that is shut down before the roast one starts)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# vLLM spawns engine processes; keep test engines small and deterministic. fp32 on every
# CPU (also where roast_vllm.LLM would pick bf16): the transformers-reference checks must
# tell a near miss (a layer off by one, a scale 10% off) from rounding, which bf16's
# 30-layer rounding noise does not allow; fp32 engines agree with transformers to ~1e-5
# nats. The kernels' bf16/fp16 paths are tested in tests/kernels.
ENGINE_DEFAULTS = dict(kv_cache_memory_bytes=1 << 30, max_model_len=1024, seed=0, dtype="float32")

# Greedy decoding with bf16 logits meets exact ties often (logits are quantized to
# 1/16..1/8 at this magnitude); these prompts reach their first tie late, so comparisons
# across engines cover most tokens (see assert_greedy_match).
PROMPTS = [
    "Q: What is 12 + 30? A:",
    "A good friend is someone who",
    "The theory of relativity was proposed by",
    "The best way to learn programming is",
    "The largest planet in the solar system is",
    "In 1969, astronauts",
]

#: Longer than one 256-token prefill chunk and than a 128-token KV block.
LONG_PROMPT = (
    " ".join(
        f"Fact {i}: the {c} fox jumped over {i + 3} lazy dogs near the river bank."
        for i, c in enumerate(
            [
                "quick",
                "brown",
                "red",
                "grey",
                "small",
                "tall",
                "wise",
                "old",
                "young",
                "fast",
                "slow",
                "happy",
                "sad",
                "bold",
                "shy",
                "calm",
                "wild",
                "kind",
                "loud",
                "quiet",
            ]
        )
    )
    + " Summarize the facts above in one sentence:"
)

#: The engines' dtype as a torch dtype (HF references run in the same one).
TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
    ENGINE_DEFAULTS["dtype"], torch.bfloat16
)

#: top-1 minus top-2 log-prob at or below which a greedy step is a (near) tie: one bf16
#: ulp of a logit in [16, 32); in fp32, where engines differ only by summation order, a
#: far smaller margin. Past a tie, two correct engines may pick different tokens.
TIE_NATS = 0.13 if TORCH_DTYPE == torch.bfloat16 else 0.01


def pytest_configure(config):
    import signal

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and
    # so would every process the tests start: the Ctrl-C tests would then send a signal the
    # CLI never sees. Python's own handler here means children start with SIGINT default
    # (exec resets caught signals, not ignored ones), as under a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def model_dir() -> str:
    from roast_vllm.engine.model_prep import default_model

    return default_model()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The transformers model in the engines' dtype: the forward-hook reference."""
    from roast_vllm.methods.hf import load_hf

    return load_hf(model_dir, dtype=TORCH_DTYPE)[0]


def shutdown(llm) -> None:
    """Stop an engine's processes now (one engine at a time on this machine)."""
    from roast_vllm.engine.llm import shutdown as _shutdown

    _shutdown(llm)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def first_tie(output, tie: float = TIE_NATS) -> int:
    """Index of the first greedy step whose top-2 margin is <= ``tie`` (needs logprobs>=2)."""
    for i, lp in enumerate(output.outputs[0].logprobs):
        v = sorted((x.logprob for x in lp.values()), reverse=True)
        if len(v) > 1 and v[0] - v[1] <= tie:
            return i
    return len(output.outputs[0].token_ids)


def assert_greedy_match(ref_outputs, test_ids, min_coverage: float = 0.5) -> float:
    """Greedy outputs of two engines (or batch shapes) must be token-identical up to the
    reference's first near tie; at least ``min_coverage`` of all tokens must be compared
    so the check cannot pass vacuously. Returns the coverage."""
    compared = total = 0
    for k, (o, t) in enumerate(zip(ref_outputs, test_ids, strict=True)):
        ref = list(o.outputs[0].token_ids)
        stop = first_tie(o)
        assert list(t)[:stop] == ref[:stop], f"request {k} differs before its first tie (step {stop})"
        compared += stop
        total += len(ref)
    assert compared / total >= min_coverage, f"only {compared}/{total} tokens before a tie"
    return compared / total


def roast_cli(*args: str) -> list[str]:
    """argv that runs ``roast-vllm ARGS`` with this interpreter (no PATH needed)."""
    return [sys.executable, "-m", "roast_vllm.cli", *args]
