"""What this CPU can run fast, read without torch: its model name and the instruction sets that
decide the precisions (:func:`cpu_facts`).

* bf16 is native with AVX512-BF16 or AMX-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD
  Zen 4 and later). Elsewhere bf16 is emulated in fp32 and slower than fp32 itself, so it is
  refused (:func:`require_bf16`) rather than silently run slow.
* int8 is fast with VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8); without it int8 still runs, slower.

Linux: ``/proc/cpuinfo``. Elsewhere OpenVINO's ``OPTIMIZATION_CAPABILITIES`` answers for bf16,
when OpenVINO is installed. A runtime measurement made on one CPU is used only on a CPU with the
same :func:`cpu_key`.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
KEY_FLAGS = ("avx2", "avx512f", *BF16_FLAGS, *INT8_FLAGS)  # what changes a runtime's speed


@functools.lru_cache(maxsize=1)
def cpu_facts() -> dict:
    """``{"model": str, "flags": [the KEY_FLAGS it has], "bf16": bool, "vnni": bool}``."""
    info = Path("/proc/cpuinfo")
    try:
        text = info.read_text(encoding="utf-8", errors="replace") if info.is_file() else ""
    except OSError:
        text = ""
    model, flags = parse_cpuinfo(text)
    if not text:
        flags = _openvino_flags()
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": [f for f in KEY_FLAGS if f in flags],
        "bf16": any(f in flags for f in BF16_FLAGS),
        "vnni": any(f in flags for f in INT8_FLAGS),
    }


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``,
    Arm ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and value.strip() and not model:
            model = value.strip()
        elif key in ("flags", "Features"):
            flags = set(value.split())
            break  # every core lists the same flags
    return model, flags


def _openvino_flags() -> set[str]:
    """bf16 as OpenVINO sees it, where there is no /proc/cpuinfo (macOS, Windows)."""
    try:
        from pneumoseg.inference.openvino_core import ov_core

        caps = ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return set()
    return {"avx512_bf16"} if "BF16" in caps else set()


def native_bf16() -> bool:
    return bool(cpu_facts()["bf16"])


def cpu_key() -> str:
    """Model name and speed-relevant flags, hashed: runtimes measured under another key were
    measured on another kind of CPU."""
    facts = cpu_facts()
    text = facts["model"] + "|" + ",".join(facts["flags"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe() -> str:
    """``AMD EPYC (avx2, avx512f, avx512_bf16, avx512_vnni)``: for logs and reports."""
    facts = cpu_facts()
    return f"{facts['model']} ({', '.join(facts['flags']) or 'no AVX2'})"
