"""``roast-vllm`` command line: one module per command group.

roast-vllm prepare-model                      # embedded SmolLM2 -> HF folder (prints path)   cli/model.py
roast-vllm caa --positive pos.txt --negative neg.txt --out v.safetensors                      cli/vectors.py
roast-vllm generate "Tell me about cats" --vector v.safetensors --scale 4 --compare          cli/generate.py
roast-vllm serve --vector happy=v.safetensors --port 8000   # + any `vllm serve` option      cli/serve.py
roast-vllm generate "Hi" --dtype float32 -tp 2           # + any vLLM engine argument
roast-vllm rollout | estimate | eval ...      # ROAST end to end                              cli/roast.py
roast-vllm fusion references | search ...     # Fusion Steering                               cli/fusion.py
python -m roast_vllm.cli.demo                 # the demo (`make demo`)                        cli/demo.py

Command modules import ``cli.common`` and the library, never each other or this module.
"""

from __future__ import annotations

import argparse
import sys

from roast_vllm.engine import args as engine_args

#: command modules, in the order their commands appear in ``--help``
GROUPS = ("model", "vectors", "generate", "serve", "roast", "fusion")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="roast-vllm", description="Per-request activation steering in vLLM.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        importlib.import_module(f"roast_vllm.cli.{group}").add_commands(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a ``roast-vllm`` command line; engine commands also take vLLM's options
    (``args.engine_kwargs``, ``args.engine_argv``; see ``roast_vllm.engine.args``)."""
    return engine_args.parse_args(build_parser(), argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
