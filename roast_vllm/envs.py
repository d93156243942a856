"""Every environment variable roast-vllm reads, in one place (as vLLM's ``envs.py``).

Read lazily through :func:`get`, so tests may set them with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: name -> (default, what it does)
ENV_VARS: dict[str, tuple[str | None, str]] = {
    "ROAST_VLLM_CACHE_DIR": (
        None,
        "Where prepared models live (default: $XDG_CACHE_HOME/roast-vllm or ~/.cache/roast-vllm).",
    ),
    "ROAST_VLLM_MODEL": (
        None,
        "Model folder used by the CLI, demo, tests and benchmarks when no --model is given "
        "(default: the prepared embedded SmolLM2-135M-Instruct).",
    ),
    "ROAST_VLLM_DATA_DIR": (
        None,
        "Folder with the task data files (gsm8k_train.jsonl, truthfulqa_dev.csv) used by the "
        "demo, tests and benchmarks (default: the first of ../shared/data next to the "
        "checkout, /work/shared/data that exists).",
    ),
    "ROAST_VLLM_CONFIG": (
        None,
        "JSON of the server's roast config (same as --additional-config's 'roast' entry); lets "
        "the API-server process validate vector names and layers at submission. The plugin "
        "sets it from --additional-config's 'roast' entry when vLLM builds its config.",
    ),
    "ROAST_VLLM_VERBOSE": (
        None,
        "1: commands show vLLM's and Ray's logs on the terminal (as --verbose); default: they "
        "go to a log file whose path is printed.",
    ),
}


def get(name: str) -> str | None:
    if name not in ENV_VARS:
        raise KeyError(f"unknown roast-vllm env var {name!r}; known: {sorted(ENV_VARS)}")
    return os.environ.get(name, ENV_VARS[name][0])


def cache_dir() -> Path:
    explicit = get("ROAST_VLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "roast-vllm"


def data_dir() -> Path:
    """The task data folder (``ROAST_VLLM_DATA_DIR`` or the project's ``shared/data``)."""
    explicit = get("ROAST_VLLM_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    repo = Path(__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "data", Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "data"
