"""The one command-line toolkit of awpfast's CLIs (``awpfast-train``, ``python -m awpfast.evaluate``,
``awpfast.landscape``, ``awpfast.continual``, ``awpfast.demo``).

* :class:`~awpfast.errors.UsageError` for bad input, :func:`cli_main` turning it into one line and exit
  status 2 (1 for a failure, 130 for Ctrl-C; ``AWPFAST_DEBUG=1`` shows the traceback);
* number parsing (``"8/255"``), the argparse subclass and help formatter, explicit-option detection;
* output checks that run before any work (:func:`check_out_file`, :func:`check_out_dir`);
* device resolution (:func:`resolve_device`).

torch is imported lazily (only :func:`resolve_device` needs it), so that a CLI can answer bad input
before paying torch's import time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import Interrupted, UsageError, deferred_interrupts, handle_interrupts

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from .distributed import DistInfo

__all__ = ["UsageError", "NumberError", "parse_float", "ArgumentParser", "HelpFormatter", "explicit_options",
           "resolve_device", "cli_main", "note", "check_out_file", "check_out_dir", "atomic_write_text",
           "write_json", "DEBUG_ENV", "USAGE_ERRORS"]

DEBUG_ENV = "AWPFAST_DEBUG"
USAGE_ERRORS = (UsageError, FileNotFoundError, ImportError)
"""Exceptions that are the user's to fix: one line, exit status 2."""


class NumberError(argparse.ArgumentTypeError, ValueError):
    """A command-line value that is not a number: argparse prints its message as a one-line error;
    callers outside argparse can catch it as a ``ValueError``."""


def parse_float(s) -> float:
    """``"8/255"`` -> 0.0313...; ``"0.5"`` -> 0.5. Raises :class:`NumberError` (an
    ``argparse.ArgumentTypeError`` and a ``ValueError``) on anything else."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    text = str(s).strip()
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except ZeroDivisionError:
        raise NumberError(f"{text!r} divides by zero") from None
    except ValueError:
        raise NumberError(f"{text!r} is not a number (e.g. 0.03 or 8/255)") from None


def package_version() -> str:
    """The installed awpfast version (``unknown`` when the package metadata is missing)."""
    from importlib import metadata
    try:
        return metadata.version("awpfast")
    except metadata.PackageNotFoundError:
        return "unknown"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a two-line error (the problem, then where to look) instead of the full usage,
    no abbreviated options (``--data`` is never taken for ``--data-dir``) and ``--version``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s (awpfast {package_version()})",
                          help="print the awpfast version and exit")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default exactly once: appended as ``(default: X)`` unless the help
    text already states the default itself (options whose default depends on others)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower() or action.default is argparse.SUPPRESS
                or action.nargs == 0 or action.default is None):
            return text
        return text + " (default: %(default)s)"


def explicit_options(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the options given on the command line ``argv`` (not defaults)."""
    probe = copy.deepcopy(parser)
    for act in probe._actions:
        act.default = argparse.SUPPRESS
        act.required = False
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        try:
            ns = probe.parse_args(argv)
        except SystemExit:  # pragma: no cover - the real parser already accepted argv
            return set()
    return set(vars(ns))


def resolve_device(spec: str, dist: Optional["DistInfo"] = None) -> "torch.device":
    """The device for ``--device spec``; a clear :class:`UsageError` when it is not there. Under
    torchrun (``dist`` enabled) a bare ``cuda`` means this process's ``LOCAL_RANK`` GPU."""
    import torch
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible"
            raise UsageError(f"--device {spec}: CUDA is not available here ({build}); use --device cpu "
                             "(or auto)")
        if dev.index is None:
            enabled = dist is not None and dist.enabled
            dev = torch.device("cuda", dist.local_rank if enabled else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {spec}: MPS is not available here; use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise UsageError(f"--device {spec}: unsupported device type {dev.type!r}; use cpu, cuda or mps")
    return dev


def _writable_folder(path: str, flag: str) -> None:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable")


def check_out_file(path: Optional[str], flag: str, overwrite: bool = False, create_parent: bool = False) -> None:
    """Check, before any work, that the output file ``path`` (of option ``flag``) can be written:
    not a folder, its folder exists (or, with ``create_parent``, can be created) and is writable,
    and (without ``overwrite``) it does not exist yet. ``None`` passes."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'results.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    if create_parent:
        _writable_folder(folder, flag)
    elif not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    elif not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")
    if os.path.exists(path):
        if not overwrite:
            raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another name")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} exists and is not writable")


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Check, before any work, that the output folder ``path`` exists as a writable folder or can be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is an existing file, not a folder: choose another {flag}")
    _writable_folder(path, flag)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` and an atomic rename (Ctrl-C / SIGTERM wait for
    it; a failed write removes the ``.tmp``)."""
    with deferred_interrupts():
        try:
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            raise


def write_json(path: str, obj, **kw) -> None:
    """``json.dumps`` through :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, **kw))


def note(prog: str, msg: str) -> None:
    """``PROG: note: MSG`` on stderr."""
    print(f"{prog}: note: {msg}", file=sys.stderr, flush=True)


def _error_line(e: BaseException, usage: Sequence[type]) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, tuple(usage)):
        return text
    return f"{type(e).__name__}: {text} (set {DEBUG_ENV}=1 for the traceback)"


def cli_main(prog: str, parse: Callable, body: Callable, usage: Sequence[type] = USAGE_ERRORS) -> int:
    """Run ``body(parse())`` as a CLI: one-line errors (exit 2 for bad input, i.e. the exception types
    ``usage``; 1 for failures; 130 on Ctrl-C), no traceback unless ``AWPFAST_DEBUG=1``; only rank 0
    reports bad input under torchrun."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    usage = tuple(usage)
    try:
        with handle_interrupts():
            return body(parse())
    except KeyboardInterrupt as e:
        if debug:
            raise
        name = str(e) if isinstance(e, Interrupted) else "SIGINT"
        print(f"{prog}: stopped by {name} (Ctrl-C)" if name == "SIGINT" else f"{prog}: stopped by {name}",
              "; every file written is complete (a write in progress was finished first)", sep="", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    except Exception as e:
        if debug:
            raise
        is_usage = isinstance(e, usage)
        rank = os.environ.get("RANK")
        if not is_usage or rank in (None, "0"):
            where = f" [rank {rank}]" if (rank is not None and not is_usage) else ""
            print(f"{prog}: error{where}: {_error_line(e, usage)}", file=sys.stderr)
        return 2 if is_usage else 1
    finally:
        if "torch.distributed" in sys.modules:
            with contextlib.suppress(Exception):
                import torch.distributed as dist
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
