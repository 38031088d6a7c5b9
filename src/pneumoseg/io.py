"""File I/O helpers: atomic writes (temp file in the same folder + rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``.

    If the block raises (or the process dies), ``path`` is untouched and the temp file removed
    (or, after a hard kill, left as a ``.tmp`` sibling that nothing reads).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(path: str | Path, writer, binary: bool = True) -> Path:
    """Call ``writer(fh)`` on a temp file and rename it to ``path`` (e.g. ``np.save``, ``torch.save``)."""
    with atomic_write(path, "wb" if binary else "w") as fh:
        writer(fh)
    return Path(path)
