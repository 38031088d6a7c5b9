"""DICOM SEG outputs of a prediction run (``predict.py --dicom-seg DIR``, with ``--image`` or
``--submission``; the web app's ``outputs=seg``): one Segmentation per DICOM input, written by
:func:`pneumoseg.inference.dicom_seg.write_seg` at the source's geometry.

The seam is :class:`SegSink`: the prediction loops hand it each image's id, source, kind, final
mask and probability map, and it decides what is written (a SEG per DICOM; a note for a PNG or
JPEG, whose other outputs are still written; nothing for an empty mask with ``skip_empty``).
Existing SEGs are refused before anything is predicted, unless ``force``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.errors import ConfigError, OutputExistsError

log = logging.getLogger(__name__)

SEG_SUFFIX = ".seg.dcm"
NOT_DICOM = "no DICOM SEG for a {kind} input: a SEG references the DICOM image it segments"


@dataclass(frozen=True)
class SegOptions:
    """Where and how SEGs are written."""

    out_dir: Path
    fractional: bool = False  # store the probability map (FRACTIONAL) instead of the mask
    skip_empty: bool = (
        False  # no SEG for an empty prediction (default: a SEG with an empty segment)
    )
    force: bool = False  # replace existing SEGs


def seg_path(out_dir: str | Path, image_id: str) -> Path:
    """The SEG of ``image_id`` in ``out_dir`` (the id made safe for a file name, as the overlays'
    and CSV rows' are: :mod:`pneumoseg.safe_text`)."""
    from pneumoseg.safe_text import safe_id

    return Path(out_dir) / f"{safe_id(image_id, 'image')}{SEG_SUFFIX}"


def algorithm_of(cfg: Mapping[str, Any], params: Mapping[str, Any]):
    """The :class:`~pneumoseg.inference.dicom_seg.SegAlgorithm` of this experiment: its name (or
    blend), folds, TTA views and tuned post-processing, as the SEG records them."""
    from pneumoseg.config import blend_members
    from pneumoseg.inference.dicom_seg import SegAlgorithm

    pred = cfg["predict"]
    # the models predicted, by the rule every stage uses (predict.experiments, else the
    # selection's ensemble.yaml, else exp): a selected blend is recorded by its members
    blend = blend_members(cfg)
    alone = blend == [(cfg["exp"], 1.0)]
    experiment = str(cfg["exp"]) if alone else "+".join(f"{e}:{w:g}" for e, w in blend)
    folds = pred.get("folds")
    post = " ".join(f"{k}:{v}" for k, v in sorted(params.items()) if not isinstance(v, dict))
    return SegAlgorithm(
        experiment=experiment[:60],
        folds="all" if folds is None else ";".join(str(f) for f in folds),
        tta=";".join(str(v) for v in (pred.get("tta") or [])) or "none",
        postprocess=post[:200] or "none",
    )


def check_targets(opts: SegOptions, image_ids: Iterable[str]) -> None:
    """Refuse, before anything is predicted: a file where the folder goes, two inputs with one
    SEG name, or existing SEGs without ``force`` (the first few named)."""
    if opts.out_dir.exists() and not opts.out_dir.is_dir():
        raise OutputExistsError(f"--dicom-seg {opts.out_dir} is a file: pass a folder")
    seen: set[str] = set()
    names = [seg_path(opts.out_dir, i).name for i in image_ids]
    doubles = sorted({n for n in names if n in seen or seen.add(n)})
    if doubles:
        raise ConfigError(
            f"{len(doubles)} input(s) share a SEG name ({', '.join(doubles[:5])}): their SEGs "
            "would overwrite each other; predict them in separate runs or rename them"
        )
    if opts.force:
        return
    there = [opts.out_dir / n for n in sorted(seen) if (opts.out_dir / n).exists()]
    if there:
        names = ", ".join(p.name for p in there[:5])
        raise OutputExistsError(
            f"{len(there)} SEG(s) exist in {opts.out_dir} ({names}); pass --force to replace "
            "them (nothing was predicted)"
        )


class SegSink:
    """Writes the SEG of each predicted image; counts what it did."""

    def __init__(self, cfg: Mapping[str, Any], params: Mapping[str, Any], opts: SegOptions):
        self.opts = opts
        self.algorithm = algorithm_of(cfg, params)
        self.written = self.skipped = 0
        self.not_dicom: list[str] = []
        self.failed: list[str] = []  # "<id>: why" of sources that could not give a SEG
        self.sources: dict[str, tuple[str, str]] = {}  # submissions: id -> (path, kind)

    def write(self, image_id: str, source: Any, kind: str, mask: np.ndarray,
              prob: np.ndarray | None) -> tuple[Path | None, str | None]:  # fmt: skip
        """``(path, None)`` when a SEG was written; ``(None, note)`` when not, and why. A source
        that cannot give a SEG raises :class:`~pneumoseg.errors.DataError` naming it."""
        from pneumoseg.inference.dicom_seg import write_seg

        if kind != "dicom":
            self.not_dicom.append(image_id)
            return None, NOT_DICOM.format(kind=kind.upper())
        if self.opts.skip_empty and not mask.any():
            self.skipped += 1
            return None, "empty prediction: no SEG (--seg-skip-empty)"
        path = write_seg(
            source, mask, seg_path(self.opts.out_dir, image_id), self.algorithm,
            prob=prob if self.opts.fractional else None, fractional=self.opts.fractional,
            force=self.opts.force,
        )  # fmt: skip
        self.written += 1
        return path, None

    def summary(self) -> str:
        kind = "FRACTIONAL" if self.opts.fractional else "BINARY"
        text = f"{self.written} {kind} DICOM SEG(s) in {self.opts.out_dir}"
        if self.skipped:
            text += f", {self.skipped} empty prediction(s) without one (--seg-skip-empty)"
        if self.not_dicom:
            text += f", {len(self.not_dicom)} PNG/JPEG input(s) without one (not DICOM)"
        if self.failed:
            text += f", {len(self.failed)} could not be written (see the errors above)"
        return text
