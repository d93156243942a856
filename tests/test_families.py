"""Qwen2 / Qwen3 / Mistral wiring on small randomly initialised checkpoints made on the fly
(no weights to download), checked against the transformers forward-hook reference in fp32,
with near misses (layers shifted by one, scale 10% off). Llama is the embedded SmolLM2."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ENGINE_DEFAULTS, PROMPTS, shutdown, token_ids
from hf_reference import near_misses

from roast_vllm import SteeringVector
from roast_vllm.engine.spec import SteerSpec

pytestmark = pytest.mark.engine


def make_checkpoint(family: str, out, tokenizer_dir: str) -> str:
    import transformers

    # head_dim 64: vLLM's CPU attention kernels support 32/64/80/96/112/128/...
    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=49152,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(head_dim=64, sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    else:
        cfg = transformers.Qwen3Config(head_dim=64, **common)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).to(torch.float32)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer_dir}/{f}", out / f)
    return str(out)


def _stock_class(worker) -> str:
    """In the engine process: the stock vLLM class the steered model extends."""
    cls = type(worker.model_runner.get_model())
    stock = next(c for c in cls.__mro__[1:] if not c.__name__.startswith("Roast"))
    return f"{stock.__module__}.{stock.__name__}"


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_family_steering_matches_hf_reference(family, model_dir, tmp_path, monkeypatch):
    from vllm import SamplingParams

    import roast_vllm
    from roast_vllm.engine.models import FAMILIES
    from roast_vllm.methods.hf import load_hf, teacher_forced_logprobs

    # lets the test send a function to the engine process (test only)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    ckpt = make_checkpoint(family, tmp_path / family, model_dir)
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    llm = roast_vllm.LLM(ckpt, **dict(ENGINE_DEFAULTS, dtype="float32", enforce_eager=True))
    try:
        assert llm.llm_engine.vllm_config.model_config.architectures == ["Roast" + arch]
        # the wrapper subclasses vLLM's own class for this family (not a look-alike)
        assert llm.collective_rpc(_stock_class)[0] == ".".join(FAMILIES[arch])
        assert FAMILIES[arch][0].endswith(family)  # vLLM's own module for the family
        vec = SteeringVector.random(4, 128, seed=5)
        roast_vllm.register_vector(llm, "v", vec)
        spec = SteerSpec("v", 30.0, (1, 2), "last_prompt_and_generated")
        extra = {
            "steer_vector": "v",
            "steer_scale": 30.0,
            "steer_layers": [1, 2],
            "steer_positions": "last_prompt_and_generated",
        }

        def sp(e=None):
            return SamplingParams(max_tokens=12, temperature=0.0, extra_args=e, logprobs=1)

        base = llm.generate(PROMPTS[:3], sp())
        zero = llm.generate(PROMPTS[:3], sp({"steer_vector": "v", "steer_scale": 0.0}))
        steered = llm.generate(PROMPTS[:3], sp(extra))
        assert token_ids(base) == token_ids(zero)
        assert token_ids(steered) != token_ids(base)
    finally:
        shutdown(llm)

    hf, _ = load_hf(ckpt, dtype=torch.float32)
    for o, ob in zip(steered, base):
        gen = list(o.outputs[0].token_ids)
        ref = teacher_forced_logprobs(hf, o.prompt_token_ids, gen, vec, spec)
        assert ref.argmax(-1).tolist() == gen
        vllm_lp = torch.tensor([o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(gen)])
        right = (ref[torch.arange(len(gen)), torch.tensor(gen)] - vllm_lp).abs()
        assert float(right.max()) <= 2e-3, right
        for name, (v, s) in near_misses(vec, spec).items():
            miss = teacher_forced_logprobs(hf, o.prompt_token_ids, gen, v, s)
            err = (miss[torch.arange(len(gen)), torch.tensor(gen)] - vllm_lp).abs().mean()
            assert float(err) > 10 * float(right.mean()) and float(err) > 2e-3, (name, float(err))
        assert teacher_forced_logprobs(hf, ob.prompt_token_ids, list(ob.outputs[0].token_ids)).argmax(
            -1
        ).tolist() == list(ob.outputs[0].token_ids)
