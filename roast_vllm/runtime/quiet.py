"""Quiet by default: our commands show their own progress bars and results; vLLM's, Ray's
and the engine processes' logs go to a file whose path is printed (``--verbose`` shows
them instead).

How: file descriptors 1 and 2 of this process are pointed at the log file (``dup2``), so
everything that writes to them goes there, including the engine-core and worker processes
vLLM and Ray start (they inherit the descriptors), C++ warnings and vLLM's loggers
(``VLLM_LOGGING_STREAM`` names ``sys.__stderr__``, the original stream on descriptor 2).
This process's ``sys.stdout`` / ``sys.stderr`` are replaced by streams on copies of the
original descriptors: ``print`` and tqdm reach the terminal. On the way out everything is
restored; when the command fails, the log's last lines are shown with its path.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from roast_vllm import envs

_active: Path | None = None  # the log of the quiet section this process is in
TAIL_LINES = 40


def verbose_requested(flag: bool = False) -> bool:
    return flag or envs.get("ROAST_VLLM_VERBOSE") not in (None, "", "0")


def active_log() -> Path | None:
    """The log file of the quiet section in progress (None: verbose, or none)."""
    return _active


def default_log_path(name: str) -> Path:
    d = envs.cache_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _terminal_stream(fd: int, like) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        os.fdopen(fd, "wb", buffering=0),
        encoding=getattr(like, "encoding", None) or "utf-8",
        errors="replace",
        line_buffering=True,
        write_through=True,
    )


@contextmanager
def quiet_logs(name: str, verbose: bool = False, path: str | Path | None = None, until_exit: bool = False):
    """Run the body with other programs' output in a log file (see the module). Nested
    sections and ``verbose`` change nothing. Yields the log path (None when verbose).

    ``until_exit``: the body is the whole process (a command's ``main``): on success the
    log keeps what comes after it too (engines that stop at interpreter exit say goodbye
    there); a failure restores the terminal first, so the traceback shows."""
    global _active
    if verbose_requested(verbose) or _active is not None:
        yield _active
        return
    log_path = Path(path) if path else default_log_path(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if s is not None:
            s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    old = (
        sys.stdout,
        sys.stderr,
        os.environ.get("VLLM_LOGGING_STREAM"),
        warnings.showwarning,
        logging.lastResort,
    )
    swapped = {}
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Python streams that wrote to descriptors 1/2 now write to the log; ours (print,
        # tqdm) go to the terminal. A stream someone else put in place (pytest's capsys) is
        # left alone: it never wrote to the descriptors.
        if sys.stdout is sys.__stdout__:
            swapped["stdout"] = sys.stdout = _terminal_stream(os.dup(saved[1]), sys.__stdout__)
        if sys.stderr is sys.__stderr__:
            swapped["stderr"] = sys.stderr = _terminal_stream(os.dup(saved[2]), sys.__stderr__)
        # vLLM's log handler, in this process if configured from now on and in its children
        os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.__stderr__"
        warnings.showwarning = _warning_to_log
        # loggers without a handler of their own (libraries' warnings) print through this
        logging.lastResort = logging.StreamHandler(sys.__stderr__)
        logging.lastResort.setLevel(logging.WARNING)
        _active = log_path
        print(f"(vLLM and Ray logs: {log_path}; --verbose shows them here)", file=sys.stderr, flush=True)
        yield log_path
    except BaseException:
        _restore(saved, log_fd, old, swapped)
        show_tail(log_path)
        raise
    if until_exit:
        return
    # engines the body left behind shut down here, their goodbye lines into the log
    import gc

    gc.collect()
    _restore(saved, log_fd, old, swapped)


def _restore(saved, log_fd, old, swapped) -> None:
    global _active
    _active = None
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if s is not None:
                s.flush()
        except (OSError, ValueError):
            pass
    sys.stdout, sys.stderr = (
        (old[0] if "stdout" in swapped else sys.stdout),
        (old[1] if "stderr" in swapped else sys.stderr),
    )
    for s in swapped.values():
        s.close()
    for fd, copy in saved.items():
        os.dup2(copy, fd)
        os.close(copy)
    os.close(log_fd)
    if old[2] is None:
        os.environ.pop("VLLM_LOGGING_STREAM", None)
    else:
        os.environ["VLLM_LOGGING_STREAM"] = old[2]
    warnings.showwarning = old[3]
    logging.lastResort = old[4]


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    try:
        sys.__stderr__.write(warnings.formatwarning(message, category, filename, lineno, line))
    except (OSError, ValueError, AttributeError):
        pass


def show_tail(path: Path) -> None:
    try:
        lines = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    except OSError:
        return
    if lines:
        print(f"--- last {len(lines)} lines of {path}:", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)
        print("---", file=sys.stderr, flush=True)


def quiet_ray_loggers() -> None:
    """Ray attaches its own stderr handler when imported; in a quiet section, send it to
    the log (``sys.__stderr__``) too."""
    if _active is None:
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setStream(sys.__stderr__)
