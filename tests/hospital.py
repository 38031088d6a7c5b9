"""One real SIIM X-ray re-encoded the ways hospitals store X-rays (for the intake tests).

Every variant is built from the 8-bit MONOCHROME2 pixels ``v`` of a real SIIM DICOM so that the
right intake recovers ``v`` (exactly for the lossless ones):

* 12-bit with a window and a burned-in marker: stored ``1000 + 8 v`` with WindowCenter 2020.5 /
  WindowWidth 2041 (pydicom's LINEAR window maps 1000..3040 onto the full output range, so
  ``v`` comes back exactly) and a 3x3 marker at 4095 (min-max scaling squeezed the lung field
  into grey levels 62-94);
* the same as signed 16-bit with a 24-px PixelPaddingValue border of -2000;
* MONOCHROME1: stored ``3095 - 8 v`` with the mirrored window (center 2075.5);
* the 12-bit file compressed by DCMTK's ``dcmcjpeg``: JPEG Extended (lossy, 12-bit; .4.51) and
  JPEG Lossless (.4.57, and SV1 .4.70);
* a 16-bit PNG holding 12-bit data (``round(v * 4095 / 255)``), and an 8-bit JPEG (quality 95).
"""

from __future__ import annotations

import shutil
import subprocess  # nosec B404
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

MARKER = (slice(10, 13), slice(10, 13))  # the burned-in marker's pixels
PAD = 24  # the padding border's width
LOSSLESS = ("mono2_8bit", "window12_marker", "padding_signed16", "mono1_12bit", "jpeg_lossless",
            "jpeg_lossless_sv1", "png16_12bit")  # fmt: skip
LOSSY = ("jpeg_extended12", "jpeg8")


def _native(src: Path, dst: Path, stored: np.ndarray, bits: int, signed: bool, **attrs) -> Path:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = attrs.pop("photometric", "MONOCHROME2")
    for tag in ("LossyImageCompression", "LossyImageCompressionMethod"):
        if tag in ds:
            delattr(ds, tag)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if "PixelPaddingValue" in ds:
        ds["PixelPaddingValue"].VR = "SS" if signed else "US"  # ambiguous until set
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _dcmcjpeg(src: Path, dst: Path, *flags: str) -> Path:
    exe = shutil.which("dcmcjpeg")
    if exe is None:
        raise FileNotFoundError("dcmcjpeg (Debian package dcmtk) is not installed")
    subprocess.run([exe, *flags, str(src), str(dst)], check=True, capture_output=True)  # nosec B603
    return dst


def with_sbit(png: bytes, bits: int) -> bytes:
    """``png`` with an ``sBIT`` chunk (significant bits of the grey channel) after IHDR."""
    body = b"sBIT" + bytes([bits])
    chunk = (1).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR chunk (25)


def build(src: Path, out: Path) -> tuple[np.ndarray, dict[str, Path]]:
    """(the 8-bit pixels of ``src``, {variant name: file}) written under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    v = pydicom.dcmread(src).pixel_array.astype(np.int32)
    window = {"WindowCenter": 2020.5, "WindowWidth": 2041}
    stored = 1000 + 8 * v
    stored[MARKER] = 4095
    files = {"mono2_8bit": shutil.copy(src, out / "mono2_8bit.dcm")}
    files["window12_marker"] = _native(src, out / "window12.dcm", stored, 12, False, **window)
    padded = 1000 + 8 * v
    padded[:PAD, :] = padded[-PAD:, :] = padded[:, :PAD] = padded[:, -PAD:] = -2000
    files["padding_signed16"] = _native(
        src, out / "padding.dcm", padded, 16, True, PixelPaddingValue=-2000, **window
    )
    files["mono1_12bit"] = _native(
        src, out / "mono1.dcm", 3095 - 8 * v, 12, False, photometric="MONOCHROME1",
        WindowCenter=2075.5, WindowWidth=2041,
    )  # fmt: skip
    w12 = files["window12_marker"]
    files["jpeg_extended12"] = _dcmcjpeg(w12, out / "jpeg_ext12.dcm", "+ee", "+q", "95")
    files["jpeg_lossless"] = _dcmcjpeg(w12, out / "jpeg_ll.dcm", "+el")
    files["jpeg_lossless_sv1"] = _dcmcjpeg(w12, out / "jpeg_sv1.dcm", "+e1")
    cv2.imwrite(str(out / "png16.png"), np.round(v * 4095 / 255).astype(np.uint16))
    files["png16_12bit"] = out / "png16.png"
    cv2.imwrite(str(out / "x.jpg"), v.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    files["jpeg8"] = out / "x.jpg"
    return v.astype(np.uint8), files


def reference(name: str, v: np.ndarray) -> np.ndarray:
    """The 8-bit image a variant must read as: the source, with the padded variant's border
    black (padding is no image: the 8-bit source's pixels there are gone from that file)."""
    if name != "padding_signed16":
        return v
    out = v.copy()
    out[:PAD, :] = out[-PAD:, :] = out[:, :PAD] = out[:, -PAD:] = 0
    return out


def compared(name: str, shape: tuple[int, int]) -> np.ndarray:
    """The pixels where a variant must equal its reference: all but the burned-in marker."""
    keep = np.ones(shape, bool)
    if name in ("window12_marker", "jpeg_extended12", "jpeg_lossless", "jpeg_lossless_sv1"):
        keep[MARKER] = False
    return keep


def padding(shape: tuple[int, int]) -> np.ndarray:
    """The padded variant's border pixels."""
    pad = np.ones(shape, bool)
    pad[PAD:-PAD, PAD:-PAD] = False
    return pad
