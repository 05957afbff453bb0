"""The `shoal` command: parse, validate, call the library, print; a ShoalError becomes one line and exit 2."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from types import FrameType
from typing import NoReturn

from shoal.allocator import tune_for_merging
from shoal.threads import spin_briefly

tune_for_merging()  # first: torch reads its allocator switch when it loads, which the imports below do
spin_briefly()  # and libgomp its spin count

from rich.text import Text
from typer.exceptions import TyperException

from shoal.cli import demo as _demo  # noqa: F401  (registers `shoal demo`)
from shoal.cli import evaluate as _evaluate  # noqa: F401  (registers `shoal eval`)
from shoal.cli import evolve as _evolve  # noqa: F401  (registers `shoal evolve`)
from shoal.cli import merge as _merge  # noqa: F401  (registers `shoal merge`)
from shoal.cli import report as _report  # noqa: F401  (registers `shoal report`)
from shoal.cli import zoo as _zoo  # noqa: F401  (registers `shoal zoo`)
from shoal.cli.app import app
from shoal.cli.progress import console
from shoal.errors import Interrupted, ShoalError, ShoalWarning

MERGEKIT_OPTIONS = {
    "--lazy-loader": "shoal reads tensors lazily, always",
    "--low-cpu-memory": "shoal merge streams one tensor at a time, always",
    "--trust-remote-code": "shoal has no equivalent: it runs no code from model folders",
    "--write-model-card": "shoal merge always writes a model card (README.md)",
    "--clone-tensors": "shoal merge has no equivalent (tensors are never shared between outputs)",
    "--read-to-gpu": "with --device cuda shoal merge reads each tensor straight onto the GPU, always",
    "--multi-gpu": "shoal merge runs on one device; --device cuda:N picks the GPU",
    "--gpu-rich": "give --device cuda: shoal merge reads each tensor straight onto that one GPU and merges there",
    "--async-write": "shoal merge always writes the previous tensor while it merges this one and reads the next",
    "--write-threads": "shoal merge writes with one thread, overlapped with reading and merging",
    "-v": "shoal merge has no log levels: it prints progress, notices, warnings and errors (--quiet: warnings and "
          "errors only)",
    "--unsafe-truncate-embeddings": "shoal never drops embedding rows; set tokenizer_source in the recipe to align "
                                    "the parents' rows by token",
}
"""mergekit-yaml's options that shoal merge does not take, and what shoal has (or does) instead."""

REFUSED_MERGEKIT_OPTIONS = {
    "--lazy-unpickle": "shoal never unpickles PyTorch pickle weights (unpickling can run code); it reads safetensors "
                       "lazily, always: leave the option out",
    "--no-safe-serialization": "shoal writes safetensors only, never PyTorch pickle (which whoever loads it would "
                               "have to unpickle): leave the option out",
}
"""mergekit-yaml's options that would unpickle (or make others unpickle): `shoal merge` refuses them in one line."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on one line, the message as written (no rich markup is read in it), and exit."""
    console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", message))
    sys.exit(code)


def _os_error(exc: OSError) -> str:
    """An OSError (full disk, read-only filesystem, name too long...) as one line naming the file."""
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells use."""
PIPE_CLOSED = 128 + signal.SIGPIPE
"""The exit code of a command whose output's reader went away (141), as a process that SIGPIPE killed has; what it
had written is kept as on Ctrl-C (no half-written model; stored trials)."""
TERMINATED = 128 + signal.SIGTERM
"""The exit code of a command stopped by SIGTERM (`kill`, a batch scheduler's end of job): 143."""
_stopped_by: list[int] = []
"""The exit code of the signal that stopped this command, once one has."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops a command as Ctrl-C does (what is half-written is removed, the stored trials are said), but exits
    143, as a process that SIGTERM killed does. A second SIGTERM, during that clean-up, ends the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _stopped_by.append(TERMINATED)
    raise KeyboardInterrupt


def interrupted(message: str) -> NoReturn:
    console(stderr=True).print(Text.assemble(("interrupted:", "bold red"), " ", message))
    sys.exit(_stopped_by[0] if _stopped_by else INTERRUPTED)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    """Print a ShoalWarning as `warning: message` on one line; other warnings as Python prints them."""
    if not issubclass(category, ShoalWarning):
        return _python_show_warning(message, category, filename, lineno, file, line)
    console(stderr=True).print(Text.assemble(("warning:", "bold yellow"), " ", str(message)))


_python_show_warning = warnings.showwarning


def main() -> None:
    warnings.showwarning = _show_warning
    _stopped_by.clear()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _run()
    except BrokenPipeError:  # met again while saying what went wrong
        _pipe_closed()
    finally:  # a caller in the same process (a test) gets its own handler back
        signal.signal(signal.SIGTERM, previous)


def _pipe_closed() -> NoReturn:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so that Python's flush at exit finds no pipe to fail on
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(PIPE_CLOSED)


def _run() -> None:
    try:
        code = app(standalone_mode=False)  # typer returns 130 for a KeyboardInterrupt no command caught
    except ShoalError as exc:
        fail(str(exc))
    except Interrupted as exc:
        interrupted(str(exc))
    except KeyboardInterrupt:
        interrupted("nothing half-written is left")
    except TyperException as exc:  # usage errors of the click that typer bundles: its message, its exit code (2)
        ctx = getattr(exc, "ctx", None)
        option = getattr(exc, "option_name", None) or ""
        if ctx is not None and ctx.command.name == "merge":
            if option in REFUSED_MERGEKIT_OPTIONS:
                fail(f"{option}: refused, {REFUSED_MERGEKIT_OPTIONS[option]}")
            if option in MERGEKIT_OPTIONS:  # its text replaces click's guesses (--write-threads is no --num-threads)
                exc.message = f"{exc.message} (a mergekit option: {MERGEKIT_OPTIONS[option]})"
                exc.possibilities = None  # type: ignore[attr-defined]
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except BrokenPipeError:  # what reads the output went away (`| head`): stop as SIGPIPE stops a command
        _pipe_closed()
    except OSError as exc:  # the filesystem refused (full, read-only, name too long): nothing half-written is left
        fail(_os_error(exc))
    if code == INTERRUPTED:
        interrupted("nothing half-written is left")
    if isinstance(code, int) and code:
        sys.exit(code)
