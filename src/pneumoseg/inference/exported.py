"""The reading side of an export folder (``runs/<exp>/export/``, written by ``src/export.py``):
its manifest and files checked against their digests. No torch here: a serving install without
the training stack reads exports through this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pneumoseg.errors import UserError
from pneumoseg.tuning.provenance import file_digest  # the model.pt digest tunings record too

EXPORT_DIR = "export"
MANIFEST = "manifest.json"
PARITY_TOL = 1e-4  # max |Δp| against torch fp32 on the check images
# The manifest's layout; an export of another format is stale (2: an int8 record per runtime)
FORMAT = 2


class ExportError(UserError):
    """An export that cannot be made, or an existing one that cannot be used."""


def check_export(folder: str | Path, models_optional: bool = False) -> dict:
    """The manifest of an export folder, after checking that every ``.onnx`` and every source
    ``model.pt`` still has the checksum it was exported with; a typed error otherwise.
    ``models_optional``: a ``model.pt`` that is absent (a serving copy of ``runs/`` with the
    exports alone) is not an error; one that is present must match."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST}; export with src/export.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version = manifest["format"]
        rows = list(manifest["folds"])
        pairs = [(folder / r["file"], r["onnx_digest"], folder.parent / r["model"],
                  r["model_digest"]) for r in rows]  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is damaged ({type(e).__name__}); export again "
                          "(src/export.py --force)") from None  # fmt: skip
    if version != FORMAT:
        raise ExportError(f"{path} was written by another version of pneumoseg (format "
                          f"{version!r}, this one reads {FORMAT}); export again "
                          "(src/export.py --update)")  # fmt: skip
    for onnx_file, onnx_sum, model, model_sum in pairs:
        _check_file(onnx_file, onnx_sum)
        if model.is_file() and file_digest(model) != model_sum:
            raise ExportError(f"{onnx_file} is stale: {model} changed since it was exported; "
                              "export again (src/export.py --force)")  # fmt: skip
        if not model.is_file() and not models_optional:
            raise ExportError(f"{onnx_file}: its source {model} is gone, so whether the export "
                              "is up to date cannot be checked; put it back or export again")  # fmt: skip
    return manifest


def check_int8(folder: str | Path, manifest: Mapping[str, Any], runtime: str) -> list[Path]:
    """The int8 models ``runtime`` runs from a checked export (ONNX Runtime: ``fold<k>.int8.onnx``;
    OpenVINO: ``fold<k>.int8-ov.xml`` with its ``.bin``), after checking every file's digest; a
    typed error when none passed its agreement check at export."""
    folder = Path(folder)
    record = manifest.get("int8")
    record = record.get(runtime) if isinstance(record, dict) else None
    record = record if isinstance(record, dict) else {}
    if not record.get("passed"):
        raise ExportError(f"{folder}: no int8 model for {runtime} passed its check at export "
                          f"({record.get('why', 'not made')}); use predict.precision fp32, or "
                          "export again (src/export.py --force)")  # fmt: skip
    try:
        rows = [(r["file"], dict(r["digests"])) for r in record["folds"]]
        names = [name for _, digests in rows for name in digests]
        if any(Path(n).name != n for n in names) or any(f not in d for f, d in rows):
            raise ValueError("a file name that is not in the export folder")  # a forged manifest
        checks = [(folder / name, digest) for _, d in rows for name, digest in d.items()]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{folder / MANIFEST} is damaged ({type(e).__name__}); export again "
                          "(src/export.py --force)") from None  # fmt: skip
    for path, digest in checks:
        _check_file(path, digest)
    return [folder / f for f, _ in rows]


def _check_file(path: Path, digest: str) -> None:
    if not path.is_file() or file_digest(path) != digest:
        raise ExportError(f"{path} is missing or changed since it was exported; export again "
                          "(src/export.py --force)")  # fmt: skip
