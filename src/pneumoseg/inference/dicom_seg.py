"""DICOM Segmentation (SEG) output: one SEG per source X-ray, written with highdicom.

    from pneumoseg.inference.dicom_seg import SegAlgorithm, write_seg

    algo = SegAlgorithm(experiment="demo", folds="0,1,2", tta="hflip",
                        postprocess="threshold=0.5 min_area=128")
    write_seg("x.dcm", mask, "x.seg.dcm", algo)                       # BINARY
    write_seg("x.dcm", mask, "x.prob.dcm", algo, prob=p, fractional=True)  # FRACTIONAL

What a SEG carries:

* **References** the source by Study, Series and SOP Instance UID (the Frame of Reference only
  when the source has a patient coordinate system, see :data:`QUIRK_RULES`); the patient and study
  modules are copied from the source by highdicom; the SEG is a new series of its own.
* **One segment** "Pneumothorax": category SCT 49755003 "Morphologically Abnormal Structure"
  (DICOM CID 7150), type SCT 36118008 "Pneumothorax" (CID 6102 and 6105; CID 7151 is extensible);
  algorithm type AUTOMATIC with an Algorithm Identification (name, version, family DCM 123110
  "Artificial Intelligence" of CID 7162, and the experiment, folds, TTA and post-processing).
* **BINARY** by default (the mask); **FRACTIONAL** (PROBABILITY, 0..255) of the probability map.
  An empty mask gives a valid SEG with an empty segment: skipping empties is the caller's choice.

Real SIIM files break a few rules of the standard; the fixes are made on the in-memory dataset
(the source file is never written) and listed in :data:`QUIRK_RULES`. Identifiers that had to be
replaced are kept in the SEG's ImageComments (:func:`replaced_uids` reads them back).

A SEG is **validated before it is written**: it goes to a temp file beside the output, is read back
with pydicom and highdicom, its pixels are compared with the input (FRACTIONAL: within 1/255 of
``prob``), and only then renamed into place. An existing output is refused without ``force``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

import pneumoseg
from pneumoseg.data.intake import read_dicom, refuse_multiframe
from pneumoseg.errors import ConfigError, DataError, OutputExistsError
from pneumoseg.io import _dcmread, atomic_write
from pneumoseg.visualize import _text, mask_overlay, save_rgb

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# what the SEG says
# --------------------------------------------------------------------------------------------------
SEGMENT_LABEL = "Pneumothorax"
# (value, scheme, meaning); tests/test_dicom_seg.py checks the context groups in pydicom's tables
CATEGORY_CODE = ("49755003", "SCT", "Morphologically Abnormal Structure")  # CID 7150
PROPERTY_TYPE_CODE = ("36118008", "SCT", "Pneumothorax")  # CID 6102, 6105 (CID 7151: extensible)
ALGORITHM_FAMILY_CODE = ("123110", "DCM", "Artificial Intelligence")  # CID 7162
CONTENT_LABEL = "PNEUMOTHORAX"  # CS: upper case, at most 16 characters
# a series number far above the acquisition's (1, 2, ...) so that viewers list the SEG last
SERIES_NUMBER = 9001
MAX_FRACTIONAL = 255
# entropy namespace of the UIDs derived from invalid or missing ones (see derive_uid)
UID_NAMESPACE = "pneumoseg"
_REPLACED_RE = re.compile(r"^pneumoseg replaced (\w+) (\".*\") with ([0-9.]+)$")

# The rules for the ways real SIIM files (and other sources) break the standard; the README lists
# them. Each is applied to the in-memory copy of the source, never to the file.
QUIRK_RULES: tuple[tuple[str, str], ...] = (
    (
        "A UID that is not a valid UID (stage-2 test files: SOPInstanceUID `ID_0011fe81e`)",
        "replaced by `pydicom.uid.generate_uid(entropy_srcs=['pneumoseg', keyword, original])`: "
        "valid, and the same for the same file every time; the original is kept in the SEG's "
        'ImageComments as `pneumoseg replaced SOPInstanceUID "ID_0011fe81e" with 1.2.826…` '
        "(one line per replaced UID)",
    ),
    (
        "An empty StudyInstanceUID or SeriesInstanceUID (all stage-2 test files)",
        "derived the same way from the source's SOP Instance UID (repeat runs give the same "
        "study and series), recorded in ImageComments like a replaced UID, and logged at "
        "warning (file name only)",
    ),
    (
        "A source without a SOPInstanceUID",
        "refused (`DataError`): a SEG must reference its source",
    ),
    (
        "PatientAge without its unit (`64`; the AS VR wants `nnnU`)",
        "written in the standard form `064Y` (a bare number is years); an age with no standard "
        "form (`64.5`, over 999) is left empty",
    ),
    (
        "A decimal string longer than the 16 characters DS allows (`0.14300000000000002`)",
        "re-formatted to at most 16 characters (`0.143`)",
    ),
    (
        "Any other text value invalid for its VR (pydicom's `validate_value`)",
        "left empty (the attribute stays, without a value, as a Type 2 attribute must)",
    ),
    (
        "No patient coordinate system (no ImagePositionPatient: CR, DX and Secondary Capture, "
        "all SIIM files)",
        "no Frame of Reference, and Pixel Measures only when the source has a spacing "
        "(PixelSpacing, else ImagerPixelSpacing) *and* a SliceThickness; otherwise none (the "
        "standard needs them only with a Frame of Reference; highdicom 0.28 writes Pixel Measures "
        "without SliceThickness but cannot read them back). The SEG has the source's Rows × "
        "Columns, so a viewer places it by the referenced image",
    ),
    (
        "PatientOrientation (Type 2C in a SEG without a Frame of Reference; highdicom omits it)",
        "copied from the source (empty when the source has none)",
    ),
    (
        "A multi-frame source",
        "refused (`DataError`): one SEG per single-frame X-ray",
    ),
)

# Text VRs that pydicom validates; UI is handled by the UID rules, binary VRs are never invalid.
_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"]
)
_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
# pydicom's and highdicom's warnings quote values (an age, a person's name): not in the logs
_VALUE_WARNINGS = (r"Invalid value for VR", r"The string .* is unlikely to represent", r"The value")
# pydicom's value validation mode is global: writers take turns switching it off (see _quiet)
_QUIET = threading.RLock()


class SegWriteError(DataError):
    """A SEG that could not be made from its source, or failed its read-back check (nothing was
    written; the message names the source and the output)."""


@dataclass(frozen=True)
class SegAlgorithm:
    """What made the mask, written into the SEG's Algorithm Identification."""

    experiment: str  # e.g. "demo"
    folds: str  # e.g. "0,1,2"
    tta: str  # e.g. "hflip"
    postprocess: str  # e.g. "threshold=0.5 min_area=128" (free text, short)
    name: str = "pneumoseg"
    version: str = pneumoseg.__version__

    def __post_init__(self) -> None:
        from pydicom import config
        from pydicom.valuerep import validate_value

        for field, vr in (("name", "LO"), ("version", "LO"), ("experiment", "LO"),
                          ("folds", "LT"), ("tta", "LT"), ("postprocess", "LT")):  # fmt: skip
            value = getattr(self, field)
            if not isinstance(value, str) or (field in ("name", "version") and not value):
                kind = "a non-empty string" if field in ("name", "version") else "a string"
                raise ConfigError(f"SegAlgorithm.{field} must be {kind}: {value!r}")
            try:
                validate_value(vr, value, config.RAISE)
                if vr == "LO" and "\\" in value:  # LO's value separator: one value would be two
                    raise ValueError("a backslash separates values in LO")
            except ValueError as e:
                raise ConfigError(
                    f"SegAlgorithm.{field} {value!r} cannot go into a SEG: {e}"
                ) from None
        for what, text in (("series description", self.series_description),
                           ("algorithm parameters", self.parameters_text)):  # fmt: skip
            limit = 64 if what == "series description" else 10240
            if len(text) > limit:
                raise ConfigError(f"SegAlgorithm: the {what} is longer than {limit} characters")

    @property
    def parameters(self) -> dict[str, str]:
        """The parameters as highdicom writes and reads them (``k=v,k=v``): inside a value a comma
        becomes ``;`` and ``=`` becomes ``:`` so that ``AlgorithmIdentificationSequence.parameters``
        parses the string back (``folds=0;1;2``, ``postprocess=threshold:0.5 min_area:128``)."""
        raw = {"experiment": self.experiment, "folds": self.folds, "tta": self.tta,
               "postprocess": self.postprocess}  # fmt: skip
        return {k: v.replace(",", ";").replace("=", ":") for k, v in raw.items()}

    @property
    def parameters_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.parameters.items())

    @property
    def series_description(self) -> str:
        return f"AI pneumothorax segmentation ({self.name} {self.version})"

    @property
    def device_serial(self) -> str:
        """The SEG's DeviceSerialNumber: a digest of the whole setting, so that two SEGs carry the
        same number exactly when the same models, folds, TTA and post-processing made them."""
        text = json.dumps([self.name, self.version, self.parameters_text])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReplacedUID:
    """A source UID the SEG could not use as it was: ``original`` ("" when empty) -> ``uid``."""

    keyword: str
    original: str
    uid: str

    @property
    def comment(self) -> str:
        return f"pneumoseg replaced {self.keyword} {json.dumps(self.original)} with {self.uid}"


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def write_seg(
    source: str | Path | Any,
    mask: np.ndarray,
    out_path: str | Path,
    algorithm: SegAlgorithm,
    *,
    prob: np.ndarray | None = None,
    fractional: bool = False,
    force: bool = False,
) -> Path:
    """Write a DICOM SEG of ``mask`` (BINARY) or of ``prob`` (``fractional=True``) over the
    single-frame DICOM ``source`` to ``out_path``, validated before it is renamed into place.
    ``source`` is a file, or a pydicom ``Dataset`` already read (the web app's upload: messages
    then say "the upload"; the dataset is copied, never changed).

    ``mask``: bool or integer H×W (nonzero = pneumothorax) at the source's Rows × Columns; with
    ``fractional=True`` it is only checked for its size and ``prob`` (float H×W in [0, 1]) is
    stored (``prob`` is ignored otherwise). Raises :class:`OutputExistsError` when ``out_path``
    exists and ``force`` is false, :class:`~pneumoseg.errors.DataError` (its subclasses
    ``DicomReadError``, :class:`SegWriteError`) for a source that is unreadable, multi-frame or
    unsuitable, a mask or probability map of the wrong size or kind, or a SEG that fails its
    read-back check; :class:`~pneumoseg.errors.MissingFileError` for a missing source.
    """
    out_path = Path(out_path)
    read = isinstance(source, (str, Path))
    source = Path(source) if read else source
    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path} exists; pass force=True (--force) to replace it")
    with _quiet():
        ds = _read_source(source) if read else _check_source(copy.deepcopy(source), "the upload")
        source = source if read else Path("the upload")
        pixels = _pixels(source, ds, mask, prob, fractional)
        replaced = _fix_uids(ds, str(source))
        emptied = _fix_values(ds)
        if emptied:
            log.info("%s: values invalid for their VR left out of the SEG: %s", source,
                     ", ".join(sorted(set(emptied))))  # fmt: skip
        seg = _build(ds, pixels, algorithm, fractional, replaced, source)
    with atomic_write(out_path, "w+b") as fh:
        seg.save_as(fh, enforce_file_format=True)
        fh.flush()
        _check_written(fh, pixels, str(ds.SOPInstanceUID), fractional, source, out_path)
    kind = "FRACTIONAL" if fractional else "BINARY"
    log.info("wrote %s SEG %s (%d positive pixels) for %s", kind, out_path,
             int(np.count_nonzero(np.asarray(mask))), source.name)  # fmt: skip
    return out_path


def derive_uid(keyword: str, original: str) -> str:
    """The valid UID that stands for ``original`` (an invalid UID, or the SOP Instance UID a
    missing Study/Series UID is derived from): the same inputs always give the same UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[UID_NAMESPACE, keyword, original]))


def replaced_uids(seg) -> dict[str, ReplacedUID]:
    """The source UIDs a SEG (a pydicom Dataset) had replaced, by keyword, from its ImageComments."""
    out = {}
    for line in str(seg.get("ImageComments", "") or "").splitlines():
        m = _REPLACED_RE.match(line.strip())
        if m:
            out[m.group(1)] = ReplacedUID(m.group(1), json.loads(m.group(2)), m.group(3))
    return out


def render_seg_overlay(
    seg_path: str | Path,
    source_path: str | Path,
    out_png: str | Path,
    width: int | None = 512,
    caption: str | None = None,
) -> Path:
    """A PNG of the SEG at ``seg_path`` (read back from the file, not from any mask in memory)
    over its X-ray ``source_path``: semi-transparent red fill and outline over the grey image,
    scaled to ``width`` pixels (None: full size). A FRACTIONAL SEG is drawn at probability ≥ 0.5.
    """
    import cv2

    seg_path, source_path = Path(seg_path), Path(source_path)
    mask = read_seg_mask(seg_path)
    image, _ = read_dicom(source_path)
    if image.shape != mask.shape:
        raise DataError(f"{seg_path} is {mask.shape[1]}×{mask.shape[0]} but {source_path} is "
                        f"{image.shape[1]}×{image.shape[0]}: pass the SEG's own source image")  # fmt: skip
    if width is not None and width != image.shape[1]:
        height = round(image.shape[0] * width / image.shape[1])
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        # area-averaged then thresholded: the outline stays where the full-size edge was
        small = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        mask = small >= 0.5
    rgb = mask_overlay(image, mask)
    if caption is None:
        caption = f"DICOM SEG: {SEGMENT_LABEL} (SCT {PROPERTY_TYPE_CODE[0]})"
    scale = max(image.shape) / 1024.0
    # at least 2: OpenCV spaces 1-px text narrower than its thicker dark outline
    thick = max(2, round(2 * scale))
    fscale = max(0.35, 0.9 * scale)
    _text(rgb, caption, (round(8 * scale) + 2, round(30 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX,
          fscale, (255, 255, 255), thick)  # fmt: skip
    return save_rgb(rgb, out_png, compression=9)  # a picture for documents: small beats fast


def read_seg_mask(seg_path: str | Path) -> np.ndarray:
    """The segment of a single-frame SEG as H×W: bool for BINARY, probability ≥ 0.5 for
    FRACTIONAL. Raises :class:`~pneumoseg.errors.DataError` naming the file."""
    import highdicom as hd

    seg_path = Path(seg_path)
    with _quiet():
        ds = _dcmread(seg_path)
        try:
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            uid = seg.get_source_image_uids()[0][2]
            arr = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])
        except Exception as e:
            raise DataError(f"{seg_path}: not a single-frame DICOM SEG highdicom can read "
                            f"({type(e).__name__}: {e})") from None  # fmt: skip
    arr = arr[0, :, :, 0]
    return arr >= 0.5 if arr.dtype.kind == "f" else arr > 0


# --------------------------------------------------------------------------------------------------
# source
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Source values are read, fixed and copied with pydicom's value validation off (its warnings
    and log records quote values: an age, a name) and the value warnings of pydicom and highdicom
    silenced; our own validation (:func:`_fix_values`) decides. pydicom's switch is global, so
    writers take turns (a lock) and each restores what it found."""
    from pydicom import config

    with _QUIET, warnings.catch_warnings(), config.disable_value_validation():
        for pattern in _VALUE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _read_source(source: Path):
    """The source's header (pixels are not needed: the SEG refers to them), refused when it is
    not a single-frame image with a SOP Instance UID."""
    return _check_source(_dcmread(source, stop_before_pixels=True), str(source))


def _check_source(ds, source: str):
    """``ds``, refused when it is not a single-frame image with a SOP Instance UID."""
    refuse_multiframe(ds, str(source))
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        rows = cols = 0
    if rows <= 0 or cols <= 0 or "SOPClassUID" not in ds:
        raise DataError(f"{source}: not a DICOM image (no Rows/Columns or SOP Class): a SEG needs "
                        "the X-ray it segments as its source")  # fmt: skip
    if not str(ds.get("SOPInstanceUID", "") or "").strip():
        raise DataError(f"{source}: the DICOM has no SOPInstanceUID, so a SEG cannot reference "
                        "it: give the image a UID (e.g. with dcmodify) and write the SEG again")  # fmt: skip
    return ds


def _pixels(source: Path, ds, mask, prob, fractional: bool) -> np.ndarray:
    """What the SEG stores: the mask as bool, or the probability map as float32 in [0, 1]."""
    shape = (int(ds.Rows), int(ds.Columns))
    m = np.asarray(mask)
    if m.dtype.kind not in "biu":
        raise DataError(f"the mask for {source} is {m.dtype}: pass a bool or integer mask "
                        "(nonzero = pneumothorax), and probabilities as prob=")  # fmt: skip
    if m.shape != shape:
        raise DataError(f"the mask for {source} is {m.shape[::-1] if m.ndim == 2 else m.shape} "
                        f"but the image is {shape[1]}×{shape[0]} (Columns × Rows): resize the "
                        "mask back to the source's size first")  # fmt: skip
    if not fractional:
        return m != 0
    if prob is None:
        raise DataError(f"a FRACTIONAL SEG of {source} needs prob= (the probability map)")
    p = np.asarray(prob, dtype=np.float32)
    if p.shape != shape:
        raise DataError(f"the probability map for {source} has shape {p.shape}, the image "
                        f"{shape}: resize it back to the source's size first")  # fmt: skip
    if not np.isfinite(p).all() or p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise DataError(f"the probability map for {source} has values outside [0, 1] or NaN")
    return p


def _fix_uids(ds, where: str) -> list[ReplacedUID]:
    """The UID rules of :data:`QUIRK_RULES` on the in-memory dataset; what was replaced."""
    sop = str(ds.SOPInstanceUID)  # checked non-empty; the entropy of the derived Study/Series
    replaced = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            uid = derive_uid(keyword, sop)
            setattr(ds, keyword, uid)
            replaced.append(ReplacedUID(keyword, "", uid))
    if replaced:
        log.warning("%s: empty %s; the SEG uses UIDs derived from the image's SOP Instance UID "
                    "(the same on every run)", where, " and ".join(r.keyword for r in replaced))  # fmt: skip
    invalid = list(_replace_invalid_uids(ds))
    if invalid:
        log.info("%s: %s not valid DICOM UIDs; replaced by derived ones (originals kept in the "
                 "SEG's ImageComments)", where, ", ".join(r.keyword for r in invalid))  # fmt: skip
    return replaced + invalid


def _replace_invalid_uids(ds) -> Iterator[ReplacedUID]:
    from pydicom import config
    from pydicom.valuerep import validate_value

    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _replace_invalid_uids(item)
            continue
        if elem.VR != "UI" or elem.tag.is_private or elem.VM != 1:
            continue  # multi-valued UIDs (lists of SOP classes) are never copied into a SEG
        value = str(elem.value or "")
        try:
            validate_value("UI", value, config.RAISE)
        except ValueError:
            uid = derive_uid(elem.keyword, value)
            elem.value = uid
            yield ReplacedUID(elem.keyword, value, uid)


def _fix_values(ds) -> list[str]:
    """The value rules of :data:`QUIRK_RULES` (ages, decimals, others emptied) on every text
    attribute, sequences included; the keywords of the values that were left out."""
    from pydicom.multival import MultiValue

    emptied = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                emptied += _fix_values(item)
            continue
        if elem.VR not in _TEXT_VRS or elem.tag.is_private or elem.value in (None, ""):
            continue
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        if all(_is_valid(elem.VR, v) for v in values):
            continue
        repaired = _repaired(elem.VR, values)
        elem.value = repaired
        if repaired is None:
            emptied.append(elem.keyword or str(elem.tag))
    return emptied


def _is_valid(vr: str, value: Any) -> bool:
    from pydicom import config
    from pydicom.valuerep import PersonName, validate_value

    if not isinstance(value, (str, bytes, PersonName)):
        value = str(value)  # DSfloat / IS: their original text, which is what gets written
    try:
        validate_value(vr, value, config.RAISE)
    except ValueError:
        return False
    return True


def _repaired(vr: str, values: list) -> Any:
    """A standard form of invalid ``values`` (AS ages, long DS), or None (leave the value out)."""
    try:
        if vr == "AS" and len(values) == 1:
            m = _AGE_RE.match(str(values[0]))
            return f"{int(m.group(1)):03d}{(m.group(2) or 'Y').upper()}" if m else None
        if vr == "DS":
            fixed = [_short_ds(float(str(v))) for v in values]
            if all(_is_valid("DS", v) for v in fixed):
                return fixed[0] if len(fixed) == 1 else fixed
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def _short_ds(x: float) -> str:
    """``x`` in at most the 16 characters of DS, with the most significant digits that fit
    (``0.14300000000000002`` -> ``0.143``; pydicom's own formatting keeps trailing zeros)."""
    for digits in range(15, 0, -1):
        text = f"{x:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{x:.0e}"


def _pixel_measures(ds):
    """The pixel-measures rule of :data:`QUIRK_RULES`: with a patient coordinate system
    highdicom copies them (None here); otherwise the Frame of Reference goes, and the measures
    are passed only when both a spacing and a slice thickness exist."""
    import highdicom as hd

    if hd.spatial.get_image_coordinate_system(ds) == hd.CoordinateSystemNames.PATIENT:
        return None
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    thickness = ds.get("SliceThickness")
    # highdicom would build spacing-only measures from PixelSpacing, which it cannot read back;
    # a Frame of Reference in a SEG needs plane positions this source does not have
    for keyword in ("PixelSpacing", "FrameOfReferenceUID", "PositionReferenceIndicator"):
        if keyword in ds:
            delattr(ds, keyword)
    try:
        if spacing and len(spacing) == 2 and thickness:
            return hd.PixelMeasuresSequence([float(v) for v in spacing], float(thickness))
    except (TypeError, ValueError):
        pass  # an unreadable spacing is as good as none
    return None


# --------------------------------------------------------------------------------------------------
# the SEG
# --------------------------------------------------------------------------------------------------
def _build(ds, pixels, algorithm: SegAlgorithm, fractional: bool, replaced, source: Path):
    """The highdicom Segmentation of ``pixels`` over the fixed source ``ds``."""
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept

    algo_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        version=algorithm.version,
        family=CodedConcept(*ALGORITHM_FAMILY_CODE),
        parameters=algorithm.parameters,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=CodedConcept(*CATEGORY_CODE),
        segmented_property_type=CodedConcept(*PROPERTY_TYPE_CODE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo_id,
    )
    what = "probability map" if fractional else "mask"
    try:
        seg = hd.seg.Segmentation(
            source_images=[ds],
            pixel_array=pixels,
            segmentation_type="FRACTIONAL" if fractional else "BINARY",
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="pneumoseg",
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number=algorithm.device_serial,
            fractional_type="PROBABILITY",
            max_fractional_value=MAX_FRACTIONAL,
            content_label=CONTENT_LABEL,
            content_description=_content_description(what, algorithm.experiment),
            pixel_measures=_pixel_measures(ds),
            omit_empty_frames=False,  # an empty mask is still a SEG (one empty frame)
            series_description=algorithm.series_description,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SegWriteError(f"cannot make a DICOM SEG over {source} ({type(e).__name__}: "
                            f"{e}); nothing was written") from None  # fmt: skip
    if "FrameOfReferenceUID" not in seg:
        seg.PatientOrientation = ds.get("PatientOrientation") or None  # Type 2C without a FoR
    if replaced:
        seg.ImageComments = "\n".join(r.comment for r in replaced)
    return seg


def _content_description(what: str, experiment: str) -> str:
    text = f"AI pneumothorax {what} ({experiment})"
    return text if len(text) <= 64 else f"AI pneumothorax {what}"  # LO: at most 64 characters


def _check_written(
    fh: IO[bytes], expected: np.ndarray, source_uid: str, fractional: bool, source, out
) -> None:
    """Read the temp file back (pydicom, then highdicom) and compare its pixels with the input;
    raising here leaves nothing at ``out`` (the temp file goes)."""
    import highdicom as hd
    import pydicom

    fh.seek(0)
    try:
        with _quiet():
            ds = pydicom.dcmread(fh)
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            got = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1])[0, ..., 0]
    except Exception as e:
        raise SegWriteError(f"the SEG for {source} does not read back ({type(e).__name__}: {e}); "
                            f"nothing was written to {out}") from None  # fmt: skip
    if fractional:
        ok = got.shape == expected.shape and np.abs(got - expected).max() <= 1 / MAX_FRACTIONAL
    else:
        ok = got.shape == expected.shape and np.array_equal(got > 0, expected)
    if not ok:
        raise SegWriteError(f"the SEG for {source} reads back other pixels than were written; "
                            f"nothing was written to {out}")  # fmt: skip
