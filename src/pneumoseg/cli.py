"""Plumbing shared by the scripts in ``src/``: common arguments, logging set-up, config loading."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def make_parser(doc: str | None, override_example: str) -> argparse.ArgumentParser:
    """A parser with the arguments every config-driven script takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="experiment YAML merged over configs/base.yaml")
    ap.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {override_example}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def setup_logging(verbose: bool = False, logfile: Path | None = None, quiet: bool = False) -> None:
    """Log to stderr (and ``logfile``); ``quiet`` keeps only warnings (non-zero DDP ranks).

    Handlers someone else installed (pytest's capture, a notebook's) are kept; a log file set by
    an earlier call in the same process is replaced.
    """
    root = logging.getLogger()
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT)
    if not root.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    for old in [h for h in root.handlers if getattr(h, "_pneumoseg_logfile", False)]:
        root.removeHandler(old)
        old.close()
    if logfile is not None:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(formatter)
        fh._pneumoseg_logfile = True  # type: ignore[attr-defined]
        root.addHandler(fh)


def config_from_args(args: argparse.Namespace, log: logging.Logger) -> dict | None:
    """The resolved config, or None after logging why it is invalid (scripts then exit 2)."""
    from pneumoseg.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        log.error("%s", e)
        return None
