"""Logging set-up shared by the scripts and by a training run (its ``train.log``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["LOG_FORMAT", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
