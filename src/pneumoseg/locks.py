"""One writer at a time: exclusive locks on the outputs a command writes.

Two ``train.py --fold 0`` on the same run folder, two ``oof_tune.py`` on one experiment or two
``predict.py`` writing one submission would interleave their files (one config with the other's
OOF maps, a mixed log). Each such command holds :func:`exclusive` on a lock file next to its
outputs for as long as it writes; a second one is refused at once with :class:`RunLockedError`
naming the outputs and the process that holds them.

The lock is the kernel's (``fcntl.flock``; ``msvcrt.locking`` on Windows), not the file's
existence: it is released when the holder exits in any way, ``kill -9`` and crashes included, so
a lock is never stale (a file left by a killed holder is simply locked again). The holder removes
the file when it is done; a process that locked a file just removed checks, once it holds the
lock, that the path still names the file it locked, and otherwise tries again: so two processes
can never each hold "the" lock through different files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pneumoseg.errors import RunLockedError

log = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int, path: Path) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:  # pragma: no cover - e.g. a file system without locks
        if e.errno in (getattr(os, "ENOLCK", -1), getattr(os, "EOPNOTSUPP", -1)):
            log.warning("%s: this file system does not support locks; running unlocked", path)
            return True
        raise
    return True


def _holder(path: Path) -> str:
    """Who holds ``path``, from what that process wrote into it."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (
        f"process {info.get('pid')} on {info.get('host', '?')}, started {info.get('started', '?')}"
        f": {info.get('command', '?')}"
    )


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock ``lock_file`` while the block runs; :class:`RunLockedError` (naming
    ``what``, the outputs it guards, and the holder) when another process has it, or with
    ``wait`` wait for it (said once in the log): for outputs a second command would find
    finished and reuse, such as a cache."""
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _wait_for(path, what) if wait else _acquire(path, what)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still locked: nobody can be between its open and its lock here
        os.close(fd)  # closing the descriptor releases the lock


def _wait_for(path: Path, what: str, poll: float = 0.5) -> int:
    """:func:`_acquire`, polling while another process holds the lock."""
    told = False
    while True:
        try:
            return _acquire(path, what)
        except RunLockedError:
            if not told:
                log.info("%s: waiting for %s to finish it", what, _holder(path))
                told = True
            time.sleep(poll)


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its lock (the file the path names right now)."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, path):
            os.close(fd)
            raise RunLockedError(
                f"{what} is being written by another pneumoseg command ({_holder(path)}). Wait "
                "for it to finish or stop it, then run this again: two commands writing the same "
                f"outputs would mix them (lock file {path}; released when that process exits)"
            )
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder removed as it finished: lock the new one
    raise RunLockedError(f"{what}: could not take the lock file {path}: it keeps being replaced")


def lock_file_for(target: str | Path) -> Path:
    """The lock file guarding ``target`` (a folder or a file): a hidden sibling."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"
