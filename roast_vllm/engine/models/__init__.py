"""Steered model wrappers. ``FAMILIES`` maps a stock vLLM architecture to the module
and class it lives in; adding a family whose decoder layers return
``(hidden, residual)`` is one line here."""

#: stock architecture -> (vLLM module, class). The steered wrapper is "Roast" + arch.
FAMILIES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}

PREFIX = "Roast"


def steered_arch(stock_arch: str) -> str:
    """Name of the steered wrapper for a stock architecture (raises if unsupported)."""
    if stock_arch not in FAMILIES:
        raise ValueError(
            f"roast-vllm has no steered wrapper for architecture {stock_arch!r}; supported: "
            f"{sorted(FAMILIES)} (add a line to roast_vllm.engine.models.FAMILIES)"
        )
    return PREFIX + stock_arch
