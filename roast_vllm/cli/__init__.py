"""``roast-vllm`` command line: one module per command group.

roast-vllm prepare-model                      # embedded SmolLM2 -> HF folder (prints path)   cli/model.py
roast-vllm caa --positive pos.txt --negative neg.txt --out v.safetensors                      cli/vectors.py
roast-vllm generate "Tell me about cats" --vector v.safetensors --scale 4 --compare          cli/generate.py
roast-vllm serve --vector happy=v.safetensors --port 8000   # + any `vllm serve` option      cli/serve.py
roast-vllm generate "Hi" --dtype float32 -tp 2           # + any vLLM engine argument
roast-vllm rollout | estimate | eval ...      # ROAST end to end                              cli/roast.py
roast-vllm fusion references | search ...     # Fusion Steering                               cli/fusion.py
roast-vllm concept vectors | eval ...        # concept-steering benchmark                    cli/concept.py
python -m roast_vllm.cli.demo                 # the demo (`make demo`)                        cli/demo.py

Command modules import ``cli.common`` and the library, never each other or this module.
"""

from __future__ import annotations

import argparse
import sys

from roast_vllm.engine import args as engine_args

#: command modules, in the order their commands appear in ``--help``
GROUPS = ("model", "vectors", "generate", "serve", "roast", "fusion", "concept")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="roast-vllm", description="Per-request activation steering in vLLM.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        importlib.import_module(f"roast_vllm.cli.{group}").add_commands(sub)
    for leaf in _leaves(p):
        add_output_args(leaf)
    return p


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--verbose`` / ``--log-file`` (``roast_vllm.runtime.quiet``) on a command."""
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show vLLM's and Ray's logs here (default: they go to a log file whose path is printed)",
    )
    p.add_argument("--log-file", default=None, help="where vLLM's and Ray's logs go (default: a new file)")


def _leaves(p: argparse.ArgumentParser):
    subs = next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
    if subs is None:
        yield p
        return
    for child in dict.fromkeys(subs.values()):  # aliases map to one parser
        yield from _leaves(child)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a ``roast-vllm`` command line; engine commands also take vLLM's options
    (``args.engine_kwargs``, ``args.engine_argv``; see ``roast_vllm.engine.args``)."""
    return engine_args.parse_args(build_parser(), argv)


#: Commands with no engine in this process: nothing to keep quiet (``serve`` runs vLLM's
#: server as a child and handles its output itself, ``cli/serve.py``).
LIGHT = ("prepare-model", "convert", "serve")


def main(argv: list[str] | None = None) -> None:
    from roast_vllm.runtime.quiet import quiet_logs

    args = parse_args(argv)
    light = args.command in LIGHT or getattr(args, "dry_run", False)
    try:
        with quiet_logs(
            args.command, verbose=args.verbose or light, path=args.log_file, until_exit=argv is None
        ):
            args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
