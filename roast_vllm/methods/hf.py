"""Hugging Face transformers helpers: the independent forward-hook reference for
steering, and residual-stream capture (used by ``roast-vllm caa``).

The residual stream after decoder layer ``l`` is ``model.model.layers[l]``'s output
(``output_hidden_states[l + 1]``); steering adds ``scale * v_l`` to it with a forward
hook, as repeng / steering-vectors do.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from roast_vllm.engine.spec import SteerSpec
from roast_vllm.vector import SteeringVector


def load_hf(model_dir: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, tok


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def output_tensor(out) -> torch.Tensor:
    """The hidden states of a module's output (decoder layers may return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def with_output_tensor(out, h: torch.Tensor):
    """``out`` with its hidden states replaced by ``h`` (a hook's return value)."""
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextmanager
def forward_hooks(hooks):
    """Forward hooks ``(module, hook)`` registered for the ``with`` block and removed on
    exit, also when it raises."""
    handles = []
    try:
        for mod, fn in hooks:
            handles.append(mod.register_forward_hook(fn))
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextmanager
def steering_hooks(
    model, vector: SteeringVector | dict[str, SteeringVector], spec: SteerSpec, prompt_len: int
):
    """A multi-vector ``spec`` (``spec.terms``) takes ``vector`` as ``{name: vector}`` and
    adds each term's hooks: the layer outputs get ``sum_i s_i * v_i[l]``, one term after
    the other.

    Add ``s_l * v_l`` to the output of each steered layer (``mlp_act`` vectors: of the
    layer's ``mlp.act_fn``, SiLU(gate)), at the absolute positions
    ``spec.token_range(prompt_len)`` (inputs must start at position 0). ``s_l`` is
    ``spec.layer_scales(L)[l]``: the scale, or its entry for layer ``l``'s third / layer."""
    if spec.terms:
        with ExitStack() as stack:
            for one in spec.term_specs():
                stack.enter_context(steering_hooks(model, vector[one.vector], one, prompt_len))
            yield
        return
    layers = spec.layers if spec.layers is not None else tuple(vector.layers)
    scales = spec.layer_scales(len(decoder_layers(model)))
    lo, hi = spec.token_range(prompt_len)

    def make_hook(l):
        def hook(_mod, _inp, out):
            h = output_tensor(out)
            delta = (scales[l] * vector.directions[l]).to(h.dtype)
            pos = torch.arange(h.shape[-2], device=h.device)
            mask = ((pos >= lo) & (pos < hi)).to(h.dtype)[:, None]
            return with_output_tensor(out, h + mask * delta.to(h.device))

        return hook

    mods = [decoder_layers(model)[l] for l in layers]
    with forward_hooks(
        (m.mlp.act_fn if vector.site == "mlp_act" else m, make_hook(l)) for m, l in zip(mods, layers)
    ):
        yield


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, vector=None, spec=None):
    """Greedy decoding without a KV cache (every step re-reads the whole sequence, so the
    hook sees absolute positions). Returns ``(token_ids, logprobs [steps, vocab])``."""
    ids = list(prompt_ids)
    out, lps = [], []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        if vector is not None and spec is not None:
            with steering_hooks(model, vector, spec, len(prompt_ids)):
                logits = model(x, use_cache=False).logits[0, -1]
        else:
            logits = model(x, use_cache=False).logits[0, -1]
        lp = torch.log_softmax(logits.float(), -1)
        t = int(lp.argmax())
        out.append(t)
        lps.append(lp)
        ids.append(t)
    return out, torch.stack(lps)


@torch.no_grad()
def teacher_forced_logprobs(model, prompt_ids, gen_ids, vector=None, spec=None) -> torch.Tensor:
    """``[len(gen_ids), vocab]`` log-probs of each next token given prompt + gen prefix."""
    x = torch.tensor([list(prompt_ids) + list(gen_ids)])
    if vector is not None and spec is not None:
        with steering_hooks(model, vector, spec, len(prompt_ids)):
            logits = model(x, use_cache=False).logits[0]
    else:
        logits = model(x, use_cache=False).logits[0]
    p = len(prompt_ids)
    return torch.log_softmax(logits[p - 1 : p - 1 + len(gen_ids)].float(), -1)


def _pool(h: torch.Tensor, reduce: str) -> torch.Tensor:
    """``h [T, H]`` -> ``[H]``. ``mean`` skips the first token: it carries the model's
    massive "attention sink" activation, whose 1/T share would make a mean-difference
    vector mostly a function of the two prompt sets' lengths."""
    if reduce == "last":
        return h[-1]
    return h[1:].mean(0) if h.shape[0] > 1 else h[0]


@torch.no_grad()
def capture_residual(
    model, tok, texts: list[str], layers: list[int], reduce: str = "last", progress: bool = True
) -> torch.Tensor:
    """Residual stream after each layer in ``layers`` for each text:
    ``[len(layers), len(texts), hidden]`` float32. ``reduce``: ``last`` token or ``mean``
    over tokens (first token excluded)."""
    from tqdm import tqdm

    outs = []
    captured: dict[int, torch.Tensor] = {}

    def make_hook(l):
        def hook(_mod, _inp, out):
            captured[l] = output_tensor(out)[0].float()

        return hook

    # hooks, not output_hidden_states: HF's last hidden state is taken after the final norm
    with forward_hooks((decoder_layers(model)[l], make_hook(l)) for l in layers):
        for t in tqdm(texts, desc="capturing activations", disable=not progress):
            ids = tok(t, return_tensors="pt").input_ids  # one at a time: no padding to get wrong
            model(ids, use_cache=False)
            outs.append(torch.stack([_pool(captured[l], reduce) for l in layers]))
    return torch.stack(outs).transpose(0, 1).contiguous()


@torch.no_grad()
def capture_last_token(
    model, token_ids: list[list[int]], layers: list[int], sites=("residual", "mlp_act")
) -> dict[str, torch.Tensor]:
    """Forward-hook reference of ``roast_vllm.engine.capture.capture_activations``:
    ``{site: [len(layers), N, dim]}`` float32 at each sequence's last token. ``mlp_act`` is
    the output of ``mlp.act_fn`` (SiLU(gate_proj x), before the multiply by up_proj)."""
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def make_hook(site, l):
        def hook(_mod, _inp, out):
            captured[(site, l)] = output_tensor(out)[0, -1].float()

        return hook

    hooks = []
    for l in layers:
        layer = decoder_layers(model)[l]
        if "residual" in sites:
            hooks.append((layer, make_hook("residual", l)))
        if "mlp_act" in sites:
            hooks.append((layer.mlp.act_fn, make_hook("mlp_act", l)))
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    with forward_hooks(hooks):
        for ids in token_ids:
            model(torch.tensor([list(ids)]), use_cache=False)
            for s in sites:
                out[s].append(torch.stack([captured[(s, l)] for l in layers]))
    return {s: torch.stack(v, 1) for s, v in out.items()}
