"""NNCF's OpenVINO int8 quantization of one fold model, run in a child process by
:func:`pneumoseg.inference.export_checks.quantize_int8_openvino`: NNCF creates and drops OpenVINO
CPU plugins of its own, in any order, which can leave a thread on an unmapped signal stack (see
:mod:`.openvino_core`); in a child process that dies with it.

    python -m pneumoseg.inference.nncf_quantize SRC.onnx DST.xml CALIB.npy THRESHOLD RESULT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    from pneumoseg.inference.export_checks import quantize_openvino_here

    src, dst, calib, threshold, result = argv
    note = quantize_openvino_here(Path(src), Path(dst), np.load(calib), float(threshold))
    Path(result).write_text(json.dumps(note), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
