"""The one OpenVINO ``Core`` of the process, and the signal stack it would otherwise break.

Every OpenVINO CPU plugin (one per ``ov.Core`` that uses the CPU) replaces the alternate signal
stack of the thread that creates it with one it maps itself, and when it is destroyed it puts back
the stack it found and unmaps its own. Two plugins destroyed in the order they were created leave
that thread on an unmapped stack (the second puts back the first one's, already unmapped): the
next signal with a Python handler then kills the process with a SIGSEGV that even faulthandler
cannot report (the kernel cannot build the handler's frame). Seen here as a pytest session that
died in a training test, long after the export tests: the DataLoader workers' SIGCHLD arrived;
Ctrl-C (SIGINT) or a web server's SIGTERM would do the same.

So the pipeline makes one ``Core`` (:func:`ov_core`), kept for the life of the process, and right
after its plugin is created gives that thread a signal stack of its own that is never freed
(:func:`keep_signal_stack`): no plugin then finds its own stack current when it is destroyed, so
none puts back a stale one. NNCF makes plugins of its own, created and dropped in any order, so
its quantization runs in a child process (:mod:`.nncf_quantize`). No torch here.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

_LOCK = threading.Lock()
_CORE: list[Any] = []  # the Core, once made
_STACKS: dict[int, Any] = {}  # thread id -> its signal stack buffer (kept: a thread may use it)
STACK_BYTES = 256 * 1024  # above any kernel's minimum for an AVX-512/AMX signal frame


class _StackT(ctypes.Structure):  # struct stack_t on Linux (x86-64, aarch64)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]  # fmt: skip


def ov_core() -> Any:
    """The process's ``openvino.Core``, its CPU plugin loaded (made on first use)."""
    with _LOCK:
        if not _CORE:
            import openvino as ov

            core = ov.Core()
            core.get_property("CPU", "FULL_DEVICE_NAME")  # creates the CPU plugin, on this thread
            keep_signal_stack()
            _CORE.append(core)
        return _CORE[0]


def keep_signal_stack() -> bool:
    """Give the calling thread an alternate signal stack that is never freed (Linux; elsewhere
    OpenVINO does not touch signal stacks); False if the kernel refused it."""
    if not sys.platform.startswith("linux"):
        return False
    ident = threading.get_ident()
    buf = _STACKS.get(ident) or ctypes.create_string_buffer(STACK_BYTES)
    _STACKS[ident] = buf
    libc = ctypes.CDLL(None, use_errno=True)
    stack = _StackT(ctypes.cast(buf, ctypes.c_void_p), 0, STACK_BYTES)
    return libc.sigaltstack(ctypes.byref(stack), None) == 0


def current_signal_stack() -> tuple[int, int]:
    """(address, size) of the calling thread's alternate signal stack ((0, 0): none)."""
    if not sys.platform.startswith("linux"):
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    old = _StackT()
    libc.sigaltstack(None, ctypes.byref(old))
    return (0, 0) if old.ss_flags & 2 else (int(old.ss_sp or 0), int(old.ss_size))  # SS_DISABLE
