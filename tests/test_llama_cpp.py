"""A vector this project exports (``SteeringVector.save_gguf``) steers llama.cpp
(llama-cpp-python) on the embedded model's own GGUF the way our engine steers the HF
folder made from that GGUF.

* ``direction.N`` of our file lands on llama.cpp's block ``N``: one random direction at
  one layer moves llama.cpp's next-token log-probs as a transformers forward hook on
  block ``N`` does, and clearly unlike a hook on ``N - 1`` or ``N + 1``.
* A CAA "happy minus sad" vector (``roast_vllm/data/happy.txt``, ``sad.txt``, layers
  6-20, as ``make demo`` builds it) at ``+SCALE`` makes llama.cpp's greedy answers to
  neutral chat prompts happier than at ``-SCALE``, judged by all-MiniLM-L6-v2 (not the
  steered model); the ``engine`` test checks our vLLM engine moves the same way.

llama-cpp-python has no loader for control-vector files (``common_control_vector_load``
lives in llama.cpp's static ``libcommon``, which the wheel does not export), so the file
is read here with the ``gguf`` package exactly as that function reads it and handed to
``llama_set_adapter_cvec`` as ``common_init_from_params`` does (source lines below, in
``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 sdist).

Timing here (2 CPU cores, shared): building llama-cpp-python 0.3.36 from its sdist took
4 min (``CMAKE_BUILD_PARALLEL_LEVEL=2``); this module, without the engine test, ~20 s on
a quiet machine, ~2 min at ``nice -n 19`` next to a running vLLM engine. llama.cpp runs
on one thread: with two, next to a running vLLM engine, its generation took 9 min once
(one thread: 70 s in the same conditions, 10 s on a quiet machine).
"""

from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed: `make setup-llama-cpp` builds llama.cpp "
    "from source (~4 min here)",
)

from conftest import ENGINE_DEFAULTS, shutdown  # noqa: E402

from roast_vllm import SteeringVector  # noqa: E402
from roast_vllm.engine.model_prep import gguf_path  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "roast_vllm" / "data"

#: The demo's CAA band (``roast_vllm/cli/demo.py --layers 6-20``), not layer 0.
LAYERS = list(range(6, 21))
#: Raw mean-difference vectors are large; 0.15 keeps both signs fluent on these prompts
#: (0.25, the demo's, already drifts off topic at -0.25).
SCALE = 0.15
MAX_TOKENS = 48
PROMPTS = [
    "Tell me about your weekend.",
    "Describe the weather today.",
    "What do you think about Mondays?",
    "Tell me about your morning.",
    "What did you do yesterday?",
]
#: The judge scores a text by its similarity to HAPPY minus its similarity to SAD.
HAPPY = "I feel happy, joyful and cheerful; life is wonderful."
SAD = "I feel sad, miserable and gloomy; life is awful."
#: Without the judge extra: a small fixed word list (also printed next to the judge).
HAPPY_WORDS = set(
    "happy joy joyful thrilled excited exciting fantastic wonderful love delightful amazing "
    "beautiful perfect cheerful smile fun celebrate celebrating grateful bright sunny".split()
)
SAD_WORDS = set(
    "sad cruel dark darkness grey gloomy miserable awful terrible lonely hopeless despair "
    "curse suffer pain lost death survive survivor sorrow dreaded struggle heavy crying void "
    "illness abyss desperate".split()
)

TIMES: dict[str, float] = {}


# ------------------------------------------------------- llama.cpp control vectors
def control_vector_data(path: Path, strength: float = 1.0) -> tuple[np.ndarray, int]:
    """``(data, n_embd)`` of a control-vector GGUF as llama.cpp's
    ``common_control_vector_load_one`` builds them (common/common.cpp:1887-1970):

    * each tensor must be named ``direction.<int>`` with ``<int> >= 1``: index 0 is
      rejected (1909-1928), F32 (1931), 1-D (1936), all the same size (1942-1948);
    * ``data`` grows to ``n_embd * layer_idx`` floats and ``direction.<l>`` is added,
      times ``strength``, at ``data[n_embd * (l - 1):]``: "layer 1 at [0]"; there is no
      slot for layer 0 (1950-1957).
    """
    import gguf

    data = np.zeros(0, np.float32)
    n_embd = -1
    for t in gguf.GGUFReader(str(path)).tensors:
        name, _, idx = t.name.partition(".")
        assert name == "direction" and idx.isdigit(), f"unparsable tensor name {t.name!r}"
        layer = int(idx)
        assert layer > 0, "llama.cpp rejects direction.0"
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
        n_embd = int(t.n_elements) if n_embd == -1 else n_embd
        assert int(t.n_elements) == n_embd
        if data.size < n_embd * layer:
            data = np.concatenate([data, np.zeros(n_embd * layer - data.size, np.float32)])
        data[n_embd * (layer - 1) : n_embd * layer] += np.asarray(t.data, np.float32).reshape(-1) * strength
    return data, n_embd


def set_control_vector(llm, path: Path | None, strength: float = 1.0) -> None:
    """``llama-cli --control-vector-scaled PATH:STRENGTH`` on a live context (``path``
    None: steering off).

    common/common.cpp:1367-1382 passes the loaded data with ``il_start = 1`` and
    ``il_end = n_layer`` (the defaults) to ``llama_set_adapter_cvec``; in
    src/llama-adapter.cpp:96-136 ``apply`` copies ``data[n_embd * (il - 1):]`` into the
    tensor of layer ``il`` for ``il = 1 .. n_layer - 1`` ("buffer doesn't have data for layer
    0", 126-133), ``tensor_for`` (16-22) serves it for ``il_start <= il <= il_end``, and
    ``apply_to`` (24-31) adds it where the graph calls ``build_cvec(cur, il)``
    (src/llama-graph.cpp:1514-1518): for llama models after block ``il``'s FFN residual
    add (src/models/llama.cpp:220-224), i.e. to the output of 0-based block ``il``, the
    same place our engine and the transformers hooks add ``directions[il]``.

    ``apply`` skips a layer the buffer does not reach (``off + n_embd <= len``, 130) and
    switching off only sets the range to -1 (105-109): on a reused context the last
    vector's values would stay live in the layers past the new file's highest one. The
    CLI applies once to a fresh context (all zeros), so here the buffer is zero-padded
    to all ``n_layer - 1`` layers, which is the same as a fresh context.
    """
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    if path is None:
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, llm.n_embd(), -1, -1)
    else:
        data, n_embd = control_vector_data(path, strength)
        data = np.concatenate([data, np.zeros(n_embd * (n_layer - 1) - data.size, np.float32)])
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, data.size, n_embd, 1, n_layer)
    assert rc == 0, f"llama_set_adapter_cvec returned {rc}"


def llama_cpp_greedy(llm, prompt_ids: list[list[int]]) -> list[str]:
    out = []
    for ids in prompt_ids:
        # reset: generate() would otherwise reuse the KV of a shared prefix computed under
        # the previous control vector
        llm.reset()
        r = llm.create_completion(ids, max_tokens=MAX_TOKENS, temperature=0.0, repeat_penalty=1.0)
        out.append(r["choices"][0]["text"])
    return out


def llama_cpp_last_logprobs(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return torch.log_softmax(torch.from_numpy(logits.copy()).float(), -1)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """The chat prompts as token ids (the HF tokenizer's chat template, no BOS: SmolLM2
    adds none), fed as ids to both llama.cpp and our engine."""
    from roast_vllm.tasks import chat_prompts

    return [tokenizer(t).input_ids for t in chat_prompts(tokenizer, PROMPTS)]


@pytest.fixture(scope="module")
def llama():
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=512, n_threads=1, seed=0, verbose=False)
    TIMES["llama.cpp load"] = time.perf_counter() - t
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def happy_gguf(model_dir, tmp_path_factory) -> Path:
    """CAA happy - sad on layers 6-20 of the prepared HF folder, exported for llama.cpp."""
    from roast_vllm.cli.common import read_prompts
    from roast_vllm.methods.caa import caa_from_prompts

    t = time.perf_counter()
    vec = caa_from_prompts(
        read_prompts(str(DATA / "happy.txt")),
        read_prompts(str(DATA / "sad.txt")),
        model=model_dir,
        layers=LAYERS,
        reduce="mean",
    )
    path = vec.save_gguf(tmp_path_factory.mktemp("llama_cpp") / "happy.gguf")
    TIMES["CAA vector (transformers)"] = time.perf_counter() - t
    return path


@pytest.fixture(scope="module")
def llama_cpp_texts(llama, happy_gguf, prompt_ids) -> dict[float, list[str]]:
    """llama.cpp's greedy answers, ``{scale: [text per prompt]}``, unsteered and at
    ``+-SCALE`` (the file's strength, as ``--control-vector-scaled happy.gguf:SCALE``)."""
    t = time.perf_counter()
    out = {}
    for s in (0.0, SCALE, -SCALE):
        set_control_vector(llama, happy_gguf if s else None, s)
        out[s] = llama_cpp_greedy(llama, prompt_ids)
    set_control_vector(llama, None)
    TIMES["llama.cpp generation (15 x 48 tokens)"] = time.perf_counter() - t
    return out


@pytest.fixture(scope="module")
def happiness():
    """``texts -> [score]``, happier is higher: MiniLM cosine to HAPPY minus to SAD, or,
    without the judge extra, happy minus sad word counts."""
    try:
        from roast_vllm.tasks.judge import EmbeddingJudge

        judge = EmbeddingJudge()
        ref = judge.embed([HAPPY, SAD])
    except ImportError:
        return word_score

    def score(texts: list[str]) -> list[float]:
        e = judge.embed(texts) @ ref.T
        return (e[:, 0] - e[:, 1]).tolist()

    return score


def word_score(texts: list[str]) -> list[float]:
    words = [re.findall(r"[a-z]+", t.lower()) for t in texts]
    return [float(sum(w in HAPPY_WORDS for w in ws) - sum(w in SAD_WORDS for w in ws)) for ws in words]


def report(who: str, texts: dict[float, list[str]], happiness) -> dict[float, float]:
    """Print each setting's texts and scores; return the summed score per scale."""
    total = {}
    for s, ts in texts.items():
        sc, wd = happiness(ts), word_score(ts)
        total[s] = sum(sc)
        print(f"\n[{who}] scale {s:+g}: happiness {total[s]:+.3f} (words {sum(wd):+g})")
        for t, x in zip(ts, sc):
            print(f"  {x:+.3f} {t[:110]!r}")
    return total


def print_times() -> None:
    print("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))


# --------------------------------------------------------------------------- tests
def test_llama_cpp_reads_our_prompts_as_hf_does(llama, tokenizer, prompt_ids):
    """llama.cpp's own tokenizer (from the GGUF) gives the same ids for the chat prompts,
    so feeding ids to it is what a llama.cpp user typing the prompt would get."""
    from roast_vllm.tasks import chat_prompts

    for text, ids in zip(chat_prompts(tokenizer, PROMPTS), prompt_ids):
        assert llama.tokenize(text.encode(), add_bos=False, special=True) == ids


def test_direction_n_steers_llama_cpp_block_n(llama, hf_model, prompt_ids, tmp_path):
    """One random direction (norm 16) alone at layer N, written with ``save_gguf``: the
    change it makes to llama.cpp's next-token log-probs matches a transformers hook on
    block N (mean abs error at most 0.7x that of a hook on block N - 1 or N + 1; measured
    0.35-0.55x). Q4_1 GGUF vs its bf16 dequantization in fp32: unsteered, the two differ
    by up to ~0.6 nats, so the comparison is of the steering's change, not of values."""
    from roast_vllm.engine.spec import SteerSpec
    from roast_vllm.methods.hf import steering_hooks

    ids = prompt_ids[1]
    x = torch.tensor([ids]).to(hf_model.device)

    @torch.no_grad()
    def hf_logprobs(vec=None):
        if vec is None:
            return torch.log_softmax(hf_model(x).logits[0, -1].float(), -1)
        with steering_hooks(hf_model, vec, SteerSpec("v", 1.0), len(ids)):
            return torch.log_softmax(hf_model(x).logits[0, -1].float(), -1)

    t = time.perf_counter()
    set_control_vector(llama, None)
    base_cpp, base_hf = llama_cpp_last_logprobs(llama, ids), hf_logprobs()
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 10, 15, 20):
        v = torch.randn(576, generator=g)
        v = v / v.norm() * 16
        path = SteeringVector({n: v}).save_gguf(tmp_path / f"layer{n}.gguf")
        set_control_vector(llama, path)
        d_cpp = llama_cpp_last_logprobs(llama, ids) - base_cpp
        err = {
            l: float((hf_logprobs(SteeringVector({l: v})) - base_hf - d_cpp).abs().mean())
            for l in (n - 1, n, n + 1)
        }
        print(
            f"direction.{n}: mean |llama.cpp - hf hook| by hook layer",
            {l: round(e, 3) for l, e in err.items()},
        )
        assert err[n] <= 0.7 * min(err[n - 1], err[n + 1]), (n, err)
    set_control_vector(llama, None)
    TIMES["layer check"] = time.perf_counter() - t


def test_llama_cpp_control_vector_steers_toward_happy(llama_cpp_texts, happiness):
    t = time.perf_counter()
    total = report("llama.cpp", llama_cpp_texts, happiness)
    TIMES["scoring"] = time.perf_counter() - t
    print_times()
    assert total[SCALE] > total[-SCALE], total


@pytest.mark.engine
def test_engine_steers_like_llama_cpp(model_dir, happy_gguf, prompt_ids, llama_cpp_texts, happiness):
    """Our engine, with the same vector read back from the GGUF and the same prompt ids
    and scales, moves the answers the same way as llama.cpp (sign of happy(+s) - happy(-s))."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import roast_vllm

    t = time.perf_counter()
    llm = roast_vllm.LLM(model_dir, **ENGINE_DEFAULTS, enforce_eager=True)
    try:
        TIMES["engine start"] = time.perf_counter() - t
        roast_vllm.register_vector(llm, "happy", SteeringVector.load_gguf(happy_gguf))
        scales = (0.0, SCALE, -SCALE)
        params = [
            SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_args={"steer_vector": "happy", "steer_scale": s} if s else None,
            )
            for s in scales
            for _ in prompt_ids
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids) for _ in scales for ids in prompt_ids]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        TIMES["engine generation"] = time.perf_counter() - t
    finally:
        shutdown(llm)
    n = len(prompt_ids)
    texts = {s: [o.outputs[0].text for o in outs[i * n : (i + 1) * n]] for i, s in enumerate(scales)}
    ours = report("roast-vllm", texts, happiness)
    theirs = report("llama.cpp", llama_cpp_texts, happiness)
    print_times()
    d_ours, d_theirs = ours[SCALE] - ours[-SCALE], theirs[SCALE] - theirs[-SCALE]
    print(f"happy(+s) - happy(-s): roast-vllm {d_ours:+.3f}, llama.cpp {d_theirs:+.3f}")
    assert np.sign(d_ours) == np.sign(d_theirs) != 0, (d_ours, d_theirs)
