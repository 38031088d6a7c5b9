"""Untrusted uploads -> uint8 grey images, checked by content and size before decoding.

The type is decided by the bytes alone (the DICOM preamble's ``DICM`` at offset 128, the PNG and
JPEG signatures), never by the file name or the client's MIME type. The image size is read from
the header (DICOM Rows/Columns without the pixels, PNG IHDR, JPEG SOF) and refused above
``max_pixels`` before any pixel is decoded. DICOM is read without ``force``. Nothing is written to
disk.

Every failure is an :class:`UploadError` with an HTTP status and a fixed public message: exception
text, paths and tag values never reach the client (or the logs, which get the same fixed text).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from pneumoseg.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class UploadError(UserError):
    """An upload that cannot be predicted: ``status`` is the HTTP code, the message is public."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray  # uint8 H×W grey
    kind: str  # dicom | png | jpeg
    image_id: str | None  # DICOM SOPInstanceUID (the Kaggle ImageId); None for PNG/JPEG


def sniff(data: bytes) -> str | None:
    """``dicom`` | ``png`` | ``jpeg`` from the leading bytes, or None."""
    if len(data) >= DICOM_MAGIC_OFFSET + 4 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    return None


def png_dims(data: bytes) -> tuple[int, int]:
    """(height, width) from the IHDR chunk."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise UploadError(422, "the PNG has no image header (truncated or corrupt)")
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def jpeg_dims(data: bytes) -> tuple[int, int]:
    """(height, width) from the first start-of-frame segment."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF:
            if i + 9 > n:
                break
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(
                data[i + 7 : i + 9], "big"
            )
        if length < 2:
            break
        i += 2 + length
    raise UploadError(422, "the JPEG has no frame header (truncated or corrupt)")


def _check_dims(h: int, w: int, max_pixels: int) -> None:
    if h <= 0 or w <= 0:
        raise UploadError(422, "the image header gives no size (truncated or corrupt)")
    if h * w > max_pixels:
        raise UploadError(
            413, f"the image has {h}x{w} pixels, more than the server accepts ({max_pixels:,})"
        )


def _decode_raster(data: bytes, kind: str, max_pixels: int) -> np.ndarray:
    import cv2

    from pneumoseg.io import gray_uint8

    h, w = png_dims(data) if kind == "png" else jpeg_dims(data)
    _check_dims(h, w, max_pixels)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape[:2] != (h, w):
        raise UploadError(422, f"the {kind.upper()} cannot be decoded (truncated or corrupt)")
    return gray_uint8(arr)


def _decode_dicom(data: bytes, max_pixels: int) -> tuple[np.ndarray, str | None]:
    # pydicom converts values lazily and warns (and logs) about odd ones quoting the value, e.g.
    # "Invalid value for VR UI: '<the UID>'": every access stays inside the silenced block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(data, max_pixels)


def _read_dicom(data: bytes, max_pixels: int) -> tuple[np.ndarray, str | None]:
    import pydicom

    from pneumoseg.io import _check_pixel_bytes, _to_uint8

    bad = UploadError(422, "the DICOM cannot be read (truncated, corrupt or not an image)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        raise bad from None
    _check_dims(rows, cols, max_pixels)
    if frames != 1:
        raise UploadError(422, "multi-frame DICOMs are not supported: send one X-ray per file")
    try:
        _check_pixel_bytes("upload", ds)
        image = _to_uint8(ds.pixel_array, ds, "upload")
        uid = str(ds.get("SOPInstanceUID", "") or "").strip() or None
    except Exception:
        raise bad from None
    if image.shape != (rows, cols):
        raise bad
    return image, uid


def decode_upload(data: bytes, max_pixels: int) -> Decoded:
    """Bytes of one upload -> :class:`Decoded`; :class:`UploadError` (415/413/422) otherwise."""
    if not data:
        raise UploadError(422, "the file is empty")
    kind = sniff(data)
    if kind is None:
        raise UploadError(415, "not a DICOM, PNG or JPEG file (checked by content, not by name)")
    if kind == "dicom":
        image, uid = _decode_dicom(data, max_pixels)
        return Decoded(image, kind, uid)
    return Decoded(_decode_raster(data, kind, max_pixels), kind, None)
