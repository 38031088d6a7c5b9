"""Plumbing shared by the scripts in ``src/``: the entry wrapper, common arguments, logging set-up,
config loading.

Every script ends with ``sys.exit(run(main))``. :func:`run` is the one boundary between the
library and the user: a :class:`~pneumoseg.errors.UserError` becomes one logged message and exit
code 2 (``PartialFailure``: 1); an environment problem the user can fix (disk full, permission
denied, read-only file system, a folder where a file goes, out of memory on the CPU or the GPU) is
reported the same way, naming the path; Ctrl-C exits 130 with one line. Anything
else is a bug and keeps its traceback. ``--debug`` (any script) or ``PNEUMOSEG_DEBUG=1`` shows the
traceback of user errors too.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from pneumoseg.errors import UserError
from pneumoseg.logs import setup_logging

DEBUG_FLAG = "--debug"
log = logging.getLogger("pneumoseg")

# OSErrors that are the machine's state, not a bug: reported as a message with the path.
_ENV_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EISDIR: "a folder is where a file is expected",
    errno.ENOTDIR: "a file is where a folder is expected",
    errno.EFBIG: "the file is too large for this file system",
    errno.ENOMEM: "out of memory",
}
_MEMORY_ADVICE = (
    "Lower train.batch_size (train.accum_steps keeps the effective batch), predict.batch_size, "
    "cache.size or oof.size, or close other programs; finished work is kept"
)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into one message; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("PNEUMOSEG_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if debug:
            raise
        _ensure_logging()
        log.error("%s", e)
        return e.exit_code
    except OSError as e:
        if debug or e.errno not in _ENV_ERRNOS:
            raise
        _ensure_logging()
        where = f": {e.filename}" if e.filename else ""
        log.error("%s%s (%s). Free space or fix the permissions, then run again: finished "
                  "work is kept.", _ENV_ERRNOS[e.errno], where, e.strerror)  # fmt: skip
        return 2
    except MemoryError as e:  # numpy's "Unable to allocate ..." included
        if debug:
            raise
        _ensure_logging()
        log.error("out of memory (%s). %s", str(e) or "MemoryError", _MEMORY_ADVICE)
        return 2
    except RuntimeError as e:
        if debug or not _is_torch_oom(e):
            raise
        _ensure_logging()
        where = "the GPU" if "cuda" in str(e).lower() or "gpu" in str(e).lower() else "torch"
        log.error("%s ran out of memory. %s", where, _MEMORY_ADVICE)
        return 2
    except KeyboardInterrupt:
        _ensure_logging()
        log.error("interrupted: finished work is kept; run the same command again to go on")
        return 130


def _is_torch_oom(e: RuntimeError) -> bool:
    """torch's out-of-memory errors (``torch.OutOfMemoryError`` on CUDA/MPS, the CPU allocator's
    RuntimeError), without importing torch where it was never used."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    text = str(e).lower()
    return (oom is not None and isinstance(e, oom)) or any(
        t in text for t in ("out of memory", "can't allocate memory")
    )


def _ensure_logging() -> None:
    if not logging.getLogger().handlers:
        setup_logging()


def add_debug(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Document ``--debug`` in a script's help (``run`` strips it before parsing)."""
    ap.add_argument(DEBUG_FLAG, action="store_true", help="show tracebacks of user errors too")
    return ap


def make_parser(doc: str | None, override_example: str) -> argparse.ArgumentParser:
    """A parser with the arguments every config-driven script takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="experiment YAML merged over configs/base.yaml")
    ap.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {override_example}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return add_debug(ap)


def add_jobs(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--jobs N``: threads of the post-processing search, 1..1024 (default: all cores). Checked
    here: 0 or a negative number silently meant "all cores" or "one" further down."""

    def jobs(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not 1 <= n <= 1024:
            raise argparse.ArgumentTypeError(f"{n} threads: give 1..1024 (omit for all cores)")
        return n

    ap.add_argument("--jobs", type=jobs, default=None, help="search threads (default: all cores)")
    return ap


def config_from_args(args: argparse.Namespace) -> dict:
    """The resolved, validated config (raises ``ConfigError``, reported by :func:`run`)."""
    from pneumoseg.config import load_config

    return load_config(args.config, args.overrides)
