"""Real 32B shapes and tensor parallelism through a real vLLM engine on CPU.

A randomly initialised Qwen2 checkpoint with Qwen2.5-32B's widths (hidden 5120, MLP
27648, 40 query / 8 KV heads, 2 layers, a small vocabulary) is written on the fly and
served with steering at both sites, with ``tensor_parallel_size`` 1 and 2 (vLLM's CPU
backend runs TP across processes). Under TP each rank holds a column shard of the MLP,
so its ``mlp_act`` table holds the matching slice of the vector; TP 2 must give the
same tokens as TP 1 up to the first near tie."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import first_tie, shutdown

from roast_vllm import SteeringVector

pytestmark = pytest.mark.engine

H, I, LAYERS, HEADS, KV_HEADS, VOCAB = 5120, 27648, 2, 40, 8, 512
MAX_TOKENS = 8
#: near tie for fp32 logits of a random model (top-2 log-prob margin, nats)
TIE = 1e-3


def make_32b_shaped_checkpoint(out) -> str:
    """Qwen2 layout (q/k/v biases) at Qwen2.5-32B widths; bf16 on disk (2 GB)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    hd = H // HEADS

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(VOCAB, H, std=1.0), "model.norm.weight": torch.ones(H).bfloat16()}
    sd["lm_head.weight"] = w(VOCAB, H)
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = torch.ones(H).bfloat16()
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H).bfloat16()
        sd[p + "self_attn.q_proj.weight"] = w(HEADS * hd, H)
        sd[p + "self_attn.q_proj.bias"] = w(HEADS * hd)
        sd[p + "self_attn.k_proj.weight"] = w(KV_HEADS * hd, H)
        sd[p + "self_attn.k_proj.bias"] = w(KV_HEADS * hd)
        sd[p + "self_attn.v_proj.weight"] = w(KV_HEADS * hd, H)
        sd[p + "self_attn.v_proj.bias"] = w(KV_HEADS * hd)
        sd[p + "self_attn.o_proj.weight"] = w(H, HEADS * hd)
        sd[p + "mlp.gate_proj.weight"] = w(I, H)
        sd[p + "mlp.up_proj.weight"] = w(I, H)
        sd[p + "mlp.down_proj.weight"] = w(H, I)
    save_file(sd, str(out / "model.safetensors"))
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_32b_shaped_checkpoint(tmp_path_factory.mktemp("qwen32b_shape"))


PROMPTS = [[11, 22, 33, 44, 55, 66, 77], [5, 6, 7, 8, 9], [100, 200, 300, 400, 450, 500, 13, 14, 15]]


def _run(ckpt: str, tp: int) -> dict[str, list]:
    """Plain, residual-steered and mlp_act-steered requests in one batch, greedy."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import roast_vllm

    if tp > 1:
        # vLLM's CPU backend binds each rank's OpenMP threads to one NUMA node by default
        # and refuses TP > NUMA nodes (one here); bind each rank to its own cores instead.
        cpus = sorted(os.sched_getaffinity(0))
        per = max(len(cpus) // tp, 1)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cpus[r * per : (r + 1) * per] or cpus[-1:])) for r in range(tp)
        )
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    llm = roast_vllm.LLM(
        ckpt,
        tensor_parallel_size=tp,
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=128,
        max_num_seqs=16,
        max_steering_slots=4,
        seed=0,
    )
    try:
        info = llm.collective_rpc("roast_info")
        assert len(info) == tp and all(i["mlp_size"] == I for i in info)
        roast_vllm.register_vector(llm, "r", SteeringVector.random(LAYERS, H, seed=1))
        roast_vllm.register_vector(llm, "m", SteeringVector.random(LAYERS, I, seed=2, site="mlp_act"))
        # unit vectors: residual norm ~sqrt(H) = 72 here, mlp_act entries ~1
        kinds = {
            "plain": None,
            "residual": {"steer_vector": "r", "steer_scale": 30.0},
            "mlp_act": {"steer_vector": "m", "steer_scale": 150.0},
        }
        prompts, params = [], []
        for extra in kinds.values():
            for p in PROMPTS:
                prompts.append(TokensPrompt(prompt_token_ids=p))
                params.append(
                    SamplingParams(
                        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2, extra_args=extra
                    )
                )
        outs = llm.generate(prompts, params, use_tqdm=False)
        n = len(PROMPTS)
        return {k: outs[i * n : (i + 1) * n] for i, k in enumerate(kinds)}
    finally:
        shutdown(llm)


def test_tp1_and_tp2_agree_at_32b_widths(ckpt):
    one = _run(ckpt, 1)
    two = _run(ckpt, 2)
    ids = {k: [list(o.outputs[0].token_ids) for o in v] for k, v in one.items()}
    # steering does something at both sites (else the comparison below proves nothing)
    assert ids["residual"] != ids["plain"] and ids["mlp_act"] != ids["plain"]
    compared = total = 0
    for kind in one:
        for a, b in zip(one[kind], two[kind]):
            ta, tb = list(a.outputs[0].token_ids), list(b.outputs[0].token_ids)
            stop = min(first_tie(a, TIE), first_tie(b, TIE))
            assert ta[:stop] == tb[:stop], f"{kind}: TP 2 differs from TP 1 before the first tie ({stop})"
            compared += stop
            total += len(ta)
    assert compared / total >= 0.5, f"only {compared}/{total} tokens before a near tie"
