"""One image intake for every path (the cache, ``predict.py --image``, the web app): bytes or a
file in, the 8-bit MONOCHROME2 grey image the models were trained on out, plus an
:class:`IntakeInfo` saying what was done to it.

* **The type is decided by content** (``DICM`` at offset 128, the PNG and JPEG signatures), never
  by the file name: an extension-less hospital DICOM reads like any other.
* **DICOM pixels go through pydicom's own handlers**, in the standard's order: the modality LUT
  (RescaleSlope/Intercept or a Modality LUT Sequence), then the VOI LUT Sequence or the window the
  file carries (first of several), then MONOCHROME1 inversion. The VOI output range is mapped to
  0..255. Without a VOI, data of more than 8 bits (or rescaled data) gets a **robust window**: the
  0.5th..99.5th percentiles of the pixels that are not padding, so a burned-in marker at 4095 or a
  ``PixelPaddingValue`` border cannot squeeze the lung field into a few grey levels (min–max did).
  8-bit data without a VOI (all SIIM files) is used as stored: bit for bit what the models saw.
  Padding pixels (``PixelPaddingValue`` [.. ``PixelPaddingRangeLimit``]) come out black.
* **PNG and JPEG of any bit depth** are scaled by their real range: a 16-bit PNG by the
  significant bits its ``sBIT`` chunk declares, else by the smallest bit depth (8..16) that holds
  its largest value, so 12-bit data in a 16-bit PNG is not divided by 256.
* **One multi-frame policy everywhere**: refused with a message (one X-ray per file).
* The structural check (:func:`check_dicom`, used when a training manifest is built) refuses only
  what pydicom cannot decode: a JPEG stream without its end-of-image marker is decoded to find out.

Every error names the file (or says "upload" for bytes) and what to do.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pneumoseg.errors import DataError, MissingFileError
from pneumoseg.io import DicomReadError, _dcmread, _require_size, _tags

log = logging.getLogger(__name__)


class _NoDecoderTracebacks(logging.Filter):
    """pydicom logs each failing decoder plugin's exception with its traceback before it raises;
    the intake reports the failure itself (naming the file), so those records are dropped: a
    traceback on a user's screen means a bug, and a corrupt file is not one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


_PYDICOM_FILTER = _NoDecoderTracebacks()
# a logger's filters do not apply to its children's records: name the decoders' logger too
for _name in ("pydicom", "pydicom.pixels.decoders.base"):
    logging.getLogger(_name).addFilter(_PYDICOM_FILTER)  # once: filters are a set per logger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
# Robust window without a VOI: percentiles of the non-padding pixels. 0.5 % on each side ignores
# a burned-in marker or text block of up to ~5,000 pixels on a 1024² image and clips little lung.
ROBUST_PERCENTILES = (0.5, 99.5)
_EOI = b"\xff\xd9"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


@dataclass(frozen=True)
class IntakeInfo:
    """What was done to an image on its way to 8-bit MONOCHROME2 (logged at debug level, returned
    by the web API). ``window`` is how stored values became grey levels:

    * ``as-stored``: 8-bit data used as it is (SIIM);
    * ``bits``: scaled by the full range of its bit depth (``range`` = 0..2^bits - 1);
    * ``voi-lut`` / ``window``: the file's VOI LUT Sequence / Window Center and Width;
    * ``percentile``: no VOI in the file: the robust window (``range`` = the percentiles).
    """

    kind: str  # dicom | png | jpeg
    bits: int  # bits stored (DICOM) or significant bits (PNG/JPEG)
    photometric: str  # the file's PhotometricInterpretation, or GREY/RGB for PNG/JPEG
    window: str
    range: tuple[float, float] | None  # the (low, high) values mapped to 0 and 255
    inverted: bool  # MONOCHROME1 flipped so that bright = dense
    padding_pixels: int = 0  # pixels marked as padding (set to 0)
    rescaled: bool = False  # a modality LUT or RescaleSlope/Intercept was applied

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["range"] = None if self.range is None else [round(float(v), 4) for v in self.range]
        return d


@dataclass(frozen=True)
class Intake:
    image: np.ndarray  # uint8 H×W grey, MONOCHROME2
    info: IntakeInfo


# --------------------------------------------------------------------------------------- sniffing
def sniff(data: bytes) -> str | None:
    """``dicom`` | ``png`` | ``jpeg`` from the leading bytes, or None."""
    if len(data) >= DICOM_MAGIC_OFFSET + 4 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    return None


def sniff_file(path: str | Path) -> str | None:
    """:func:`sniff` of a file's first bytes (the file must exist)."""
    with open(path, "rb") as fh:
        return sniff(fh.read(DICOM_MAGIC_OFFSET + 4))


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path; a typed error when it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file: pass the image files themselves")
    if not path.is_file():
        raise MissingFileError(f"image file not found: {path}")
    return path


# ------------------------------------------------------------------------------------------ DICOM
def _frames(ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1  # an unreadable count: pydicom decodes one frame


def refuse_multiframe(ds, where: str) -> None:
    """The one multi-frame policy: refused, on every path."""
    frames = _frames(ds)
    if frames != 1:
        raise DicomReadError(
            f"{where}: a multi-frame DICOM ({frames} frames); pneumoseg reads one X-ray per "
            "file: export each frame as its own DICOM"
        )


def _decoder_hint(ds) -> str:
    """Why pydicom could not decode: a missing plugin is named only when it is really missing."""
    try:
        from pydicom.pixels import get_decoder

        ts = ds.file_meta.TransferSyntaxUID
        decoder = get_decoder(ts)
    except Exception:
        return "its transfer syntax is not one pydicom decodes"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "see pydicom's documentation"
        return f"no decoder for {ts.name} is installed ({missing})"
    if not ts.is_compressed:
        return "the pixel data does not match its image attributes (truncated or corrupt)"
    plugins = ", ".join(decoder.available_plugins)
    return (f"its {ts.name} stream is corrupt or truncated, or a variant that the installed "
            f"decoders ({plugins}) refuse")  # fmt: skip


def decode_dicom_pixels(ds, where: str) -> np.ndarray:
    """The stored values of frame 1 (raw: no LUT applied; colour converted to RGB by pydicom)."""
    refuse_multiframe(ds, where)
    if "PixelData" not in ds:
        raise DicomReadError(f"{where}: no pixel data (file truncated?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except Exception as e:
        # pydicom lists each plugin's failure on its own line after a generic first line
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        why = "; ".join(lines[1:] if len(lines) > 1 else lines)[:240]
        raise DicomReadError(
            f"{where}: cannot decode the pixel data: {_decoder_hint(ds)} "
            f"({type(e).__name__}: {why})"
        ) from e


def dicom_to_uint8(arr: np.ndarray, ds, where: str) -> Intake:
    """Stored values -> 8-bit MONOCHROME2 via pydicom's LUT handlers (see the module doc)."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 8) or 8)
    if photometric in _COLOUR or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        return _dicom_colour(arr, ds, photometric, bits, where)
    if arr.ndim != 2:
        raise DicomReadError(f"{where}: unsupported pixel array shape {arr.shape}")
    pad = _padding(arr, ds)
    has_voi = bool(ds.get("VOILUTSequence")) or "WindowCenter" in ds
    rescaled = bool(ds.get("ModalityLUTSequence")) or _has_rescale(ds)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits <= 8 and not (has_voi or rescaled or signed or pad.any()):
        image, window, rng = _by_bits(arr, bits)
    else:
        image, window, rng = _windowed(arr, ds, pad, has_voi, where)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        image = 255 - image  # MONOCHROME1: low = white; flip so that bright = dense everywhere
    if pad.any():
        image[pad] = 0
    info = IntakeInfo("dicom", bits, photometric or "?", window, rng, inverted,
                      int(pad.sum()), rescaled)  # fmt: skip
    return Intake(np.ascontiguousarray(image), info)


def _has_rescale(ds) -> bool:
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return False
    return slope != 1 or intercept != 0


def _by_bits(arr: np.ndarray, bits: int) -> tuple[np.ndarray, str, tuple[float, float]]:
    top = float(2**bits - 1)
    if bits == 8 and arr.dtype == np.uint8:
        return arr.copy(), "as-stored", (0.0, 255.0)
    return _linear(arr, 0.0, top), "bits", (0.0, top)


def _linear(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo``..``hi`` -> 0..255, clipped and rounded."""
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    a = (np.asarray(arr, np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _padding(arr: np.ndarray, ds) -> np.ndarray:
    """Pixels whose stored value is the padding value (or in its range), as a bool mask."""
    pad = np.zeros(arr.shape, bool)
    if "PixelPaddingValue" not in ds:
        return pad
    try:
        a = int(ds.PixelPaddingValue)
        b = int(ds.get("PixelPaddingRangeLimit", a))
    except (TypeError, ValueError):
        return pad
    lo, hi = min(a, b), max(a, b)
    return (arr >= lo) & (arr <= hi)


def _windowed(arr, ds, pad, has_voi: bool, where: str):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings(), np.errstate(over="ignore"):
            warnings.simplefilter("ignore")
            values = apply_modality_lut(arr, ds)
            if not has_voi:
                keep = values[~pad] if pad.any() else values
                if keep.size == 0:
                    return np.zeros(arr.shape, np.uint8), "percentile", None
                lo, hi = (float(v) for v in np.percentile(keep, ROBUST_PERCENTILES))
                return _linear(values, lo, hi), "percentile", (lo, hi)
            shown = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            lo, hi = _voi_range(ds, values)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError,
            NotImplementedError) as e:  # fmt: skip
        raise DicomReadError(
            f"{where}: its modality or VOI LUT cannot be applied ({type(e).__name__}: "
            f"{str(e)[:120]}); fix or remove the LUT/window attributes"
        ) from e
    kind = "voi-lut" if ds.get("VOILUTSequence") else "window"
    return _linear(shown, lo, hi), kind, (lo, hi)


def _voi_range(ds, values: np.ndarray) -> tuple[float, float]:
    """The output range of the VOI step: for a window, what pydicom maps everything below and
    above it to; for a LUT, its smallest and largest entry (the descriptor's bit depth is often
    16 for 12-bit entries, so the entries themselves are the honest range)."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        n, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        probe = np.arange(first, first + n, dtype=np.int64)
        lut = apply_voi_lut(probe, ds, index=0, prefer_lut=True)
        return float(lut.min()), float(lut.max())
    probe = np.array([-1e300, 1e300])
    lo, hi = apply_voi_lut(probe, ds, index=0, prefer_lut=False)
    return float(lo), float(hi)


def _dicom_colour(arr, ds, photometric: str, bits: int, where: str) -> Intake:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise DicomReadError(f"{where}: its palette cannot be applied ({e})") from e
        bits = 16 if arr.dtype.itemsize > 1 else 8
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise DicomReadError(f"{where}: unsupported colour pixel array shape {arr.shape}")
    rgb, window, rng = _by_bits(np.ascontiguousarray(arr[..., :3]), bits)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    info = IntakeInfo("dicom", bits, photometric or "RGB", window, rng, False)
    return Intake(grey, info)


def read_dicom(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a DICOM file to ``(uint8 H×W MONOCHROME2 image, header tags)``."""
    intake, tags = read_dicom_intake(path)
    return intake.image, tags


def read_dicom_intake(path: str | Path) -> tuple[Intake, dict[str, Any]]:
    """Decode a DICOM file to its :class:`Intake` and its header tags (see ``io.read_dicom_tags``)."""
    path = Path(path)
    ds = _dcmread(path)
    try:
        tags = _tags(ds)
    except (TypeError, ValueError) as e:
        raise DicomReadError(f"{path}: a header value is invalid ({e})") from None
    _require_size(path, tags)
    arr = decode_dicom_pixels(ds, str(path))
    intake = dicom_to_uint8(arr, ds, str(path))
    if intake.image.shape != (tags["Rows"], tags["Columns"]):
        raise DicomReadError(
            f"{path}: pixel data decodes to {intake.image.shape}, but Rows/Columns say "
            f"{(tags['Rows'], tags['Columns'])} (corrupt)"
        )
    return intake, tags


def _check_pixel_bytes(path: Path, ds) -> None:
    """Refuse what pydicom cannot decode, without decoding when the bytes prove it can."""
    if "PixelData" not in ds:
        raise DicomReadError(f"{path}: no pixel data (file truncated?)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and ts.is_encapsulated:
        from pydicom.encaps import generate_fragments

        try:
            frags = [f for f in generate_fragments(ds.PixelData) if len(f)]
        except Exception as e:
            raise DicomReadError(f"{path}: corrupt encapsulated pixel data ({e})") from e
        if not frags:
            raise DicomReadError(f"{path}: empty encapsulated pixel data")
        # A JPEG stream ends with its end-of-image marker, then at most one pad byte to an even
        # length (00, or FF as in pydicom's JPGExtended.dcm). Without it the stream is cut:
        # pylibjpeg would still "decode" it (a SIIM file cut to 70 % decodes with a mean error of
        # 40 grey levels), so this cheap proof is kept instead of a decode.
        jpeg = str(ts).startswith("1.2.840.10008.1.2.4.5") or str(ts).endswith(".4.70")
        tail = bytes(frags[-1][-4:])
        if jpeg and not (tail.endswith(_EOI) or tail[:-1].endswith(_EOI)):
            raise DicomReadError(f"{path}: JPEG stream has no end-of-image marker (truncated?)")
        return
    from pydicom.pixels.utils import get_expected_length

    try:
        need = int(get_expected_length(ds, "bytes"))  # knows YBR_FULL_422 and 1-bit packing
    except Exception as e:  # e.g. a NumberOfFrames of '1A' (pydicom's badVR.dcm)
        raise DicomReadError(
            f"{path}: its image attributes (Rows, Columns, bits, frames) are invalid "
            f"({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if len(ds.PixelData) < need:
        raise DicomReadError(f"{path}: pixel data has {len(ds.PixelData)} bytes, expected {need}")


def check_dicom(path: str | Path) -> dict[str, Any]:
    """Header tags, after checking the raw pixel bytes are all there (for manifests).

    Reads the whole file but decodes nothing when the bytes prove the image whole: catches
    truncated files at ~1/10 of the cost of decoding. Multi-frame files are refused.
    """
    path = Path(path)
    ds = _dcmread(path)
    try:
        tags = _tags(ds)
        refuse_multiframe(ds, str(path))
        _require_size(path, tags)
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DicomReadError(f"{path}: a header value is invalid ({e})") from None
    _check_pixel_bytes(path, ds)
    return tags


# ------------------------------------------------------------------------------------ PNG and JPEG
def png_significant_bits(data: bytes) -> int | None:
    """The grey (or first colour) channel's significant bits from a PNG's ``sBIT`` chunk."""
    i, n = 8, len(data)
    while i + 8 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        if kind == b"sBIT" and length >= 1 and i + 9 <= n:
            return int(data[i + 8])
        if kind in (b"IDAT", b"IEND"):
            return None  # sBIT must come before the image data
        i += 12 + length
    return None


def raster_to_uint8(arr: np.ndarray, kind: str, sbit: int | None = None) -> Intake:
    """What OpenCV decoded (grey, BGR, BGRA; 8/16-bit) -> 8-bit grey, scaled by its real range."""
    colour = arr.ndim == 3
    if colour:
        code = cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        arr = cv2.cvtColor(arr, code)
    if arr.dtype == np.uint8:
        image, window, rng, bits = arr, "as-stored", (0.0, 255.0), 8
    elif arr.dtype.kind in "ui":
        top = int(arr.max(initial=0))
        bits = sbit if sbit and 8 <= sbit <= 16 else max(8, top.bit_length())
        image, window, rng = _by_bits(arr, bits)
    else:
        raise DataError(f"a {kind.upper()} with {arr.dtype} pixels is not supported")
    info = IntakeInfo(kind, bits, "RGB" if colour else "GREY", window, rng, False)
    return Intake(np.ascontiguousarray(image), info)


def decode_raster(data: bytes, kind: str, where: str) -> Intake:
    """PNG/JPEG bytes -> :class:`Intake`."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{where}: cannot decode the {kind.upper()} (corrupt or truncated)")
    sbit = png_significant_bits(data) if kind == "png" else None
    return raster_to_uint8(arr, kind, sbit)


# ---------------------------------------------------------------------------------------- entries
def read_intake(path: str | Path) -> Intake:
    """Any supported image file -> :class:`Intake`, the type decided by content."""
    path = existing_file(path)
    kind = sniff_file(path)
    if kind == "dicom":
        intake = read_dicom_intake(path)[0]
    elif kind in ("png", "jpeg"):
        intake = decode_raster(path.read_bytes(), kind, str(path))
    else:
        raise DataError(
            f"{path}: not a DICOM, PNG or JPEG file (checked by content, not by name); a DICOM "
            "file starts with a 128-byte preamble and 'DICM'"
        )
    log.debug("%s: %s", path.name, intake.info.as_dict())
    return intake


def read_image(path: str | Path) -> np.ndarray:
    """uint8 H×W MONOCHROME2 image of any supported file (see :func:`read_intake`)."""
    return read_intake(path).image


def read_mask_png(path: str | Path) -> np.ndarray:
    """A mask PNG (0/255, 0/1, any bit depth or colour) as a bool H×W array: any non-zero is in."""
    path = existing_file(path)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: cannot decode the mask image (corrupt, empty, or not a PNG)")
    return arr[..., :3].any(axis=2) if arr.ndim == 3 else arr > 0  # alpha is not the mask


def decode_dicom_bytes(data: bytes, where: str = "upload") -> Intake:
    """A DICOM's bytes -> :class:`Intake` (no size checks: callers of untrusted bytes check)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:
        raise DicomReadError(f"{where}: not a readable DICOM file") from e
    return dicom_to_uint8(decode_dicom_pixels(ds, where), ds, where)
