"""Untrusted uploads -> uint8 grey images, in two steps: :func:`inspect_upload` reads what a file
says about itself without decoding a pixel, :func:`decode` decodes it (the app calls it only once
the request holds a run slot and its pixels fit in the server's budget).

The type is decided by the bytes alone (``DICM`` at offset 128 exactly, the PNG and JPEG
signatures), never by the file name or the client's MIME type. The size is read from every header
that a decoder will trust and refused above ``max_pixels`` (413) before anything is decoded: PNG
IHDR, JPEG frame headers, and for a DICOM both Rows/Columns and its pixel stream's own header (the
JPEG or JPEG-LS frame header, the JPEG 2000 SIZ marker, the RLE segment table, the length of
uncompressed pixel data), which must agree with Rows/Columns (422): a 64x64 DICOM whose JPEG stream
says 12000x12000 is refused, not decoded. Transfer syntaxes outside :data:`TRANSFER_SYNTAXES` are
refused by name (415), deflated ones before pydicom would inflate them. DICOM is read without
``force``. Nothing is written to disk.

Every failure is an :class:`UploadError` with an HTTP status and a fixed public message: exception
text, paths and tag values never reach the client (or the logs).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pneumoseg.data.intake import DICOM_MAGIC_OFFSET, IntakeInfo, sniff
from pneumoseg.errors import UserError

# frame headers: JPEG SOF0..SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (F7)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_LSE = 0xF8  # JPEG-LS preset parameters; id 4 carries image dimensions above 65535
# The next marker that has a length or ends an image: 0xFF then C0-CF or D8-FE. Inside
# entropy-coded data 0xFF is followed by 00 (JPEG stuffing), D0-D7 (restart) or < 0x80 (JPEG-LS
# bit stuffing), so one search skips a whole scan at C speed; FF FF fill bytes fall out too.
_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")
_MAX_SEGMENTS = 4096  # real JPEGs have tens; a body of empty segments would cost CPU per segment
_MAX_J2K_TILES = 65535  # the J2K limit (Isot is 16-bit); 1x1 tiles would cost memory per tile
# explicit-VR elements with a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


class UploadError(UserError):
    """An upload that cannot be predicted: ``status`` is the HTTP code, the message is public."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Header:
    """What an upload says about itself; no pixel decoded yet."""

    kind: str  # dicom | png | jpeg
    height: int
    width: int
    image_id: str | None  # the DICOM's raw SOPInstanceUID (untrusted text); None for PNG/JPEG
    source: Any  # the bytes (PNG/JPEG) or the pydicom Dataset (pixel data still encoded)

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray  # uint8 H×W grey
    kind: str  # dicom | png | jpeg
    image_id: str | None  # the DICOM's raw SOPInstanceUID; None for PNG/JPEG
    info: IntakeInfo | None = None  # what the intake did to the pixels (window, inversion...)
    dataset: Any = None  # a DICOM's pydicom Dataset (header; for its DICOM SEG), else None


def png_dims(data: bytes) -> tuple[int, int]:
    """(height, width) from the IHDR chunk (width comes first in the file)."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise UploadError(422, "the PNG has no image header (truncated or corrupt)")
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def jpeg_frames(data: bytes) -> list[tuple[int, int, int | None]]:
    """(height, width, components) of every frame header of a JPEG or JPEG-LS stream, in order,
    entropy-coded data skipped; a JPEG-LS oversize-dimensions record (LSE id 4) counts as a
    frame header with unknown components."""
    return _jpeg_scan(data)[0]


def _jpeg_scan(data: bytes) -> tuple[list[tuple[int, int, int | None]], bool]:
    """:func:`jpeg_frames` and whether an end-of-image marker follows the last frame header."""
    corrupt = UploadError(422, "the JPEG stream is corrupt (a marker segment runs past its end)")
    if not data.startswith(b"\xff\xd8"):
        raise UploadError(422, "the JPEG stream has no start-of-image marker (corrupt)")
    frames: list[tuple[int, int, int | None]] = []
    i, n, ended = 2, len(data), False
    for _ in range(_MAX_SEGMENTS):
        m = _MARKER.search(data, i)
        if m is None:
            return frames, ended
        j = m.start()
        marker = data[j + 1]
        if marker in (0xD8, 0xD9):  # SOI, EOI: no length (another image may follow)
            ended, i = marker == 0xD9, j + 2
            continue
        length = int.from_bytes(data[j + 2 : j + 4], "big")
        end = j + 2 + length
        if j + 4 > n or length < 2 or end > n:
            raise corrupt
        seg = data[j + 4 : end]
        if marker in _SOF:
            if len(seg) < 6:
                raise corrupt
            frames.append(
                (int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5])
            )
            ended = False  # this image needs its own end-of-image marker
        elif marker == _LSE and seg[:1] == b"\x04":
            size = seg[1] if len(seg) > 1 else 0
            if not 2 <= size <= 4 or len(seg) < 2 + 2 * size:
                raise corrupt
            h, w = seg[2 : 2 + size], seg[2 + size : 2 + 2 * size]
            frames.append((int.from_bytes(h, "big"), int.from_bytes(w, "big"), None))
        i = end
    raise UploadError(422, f"the JPEG stream has over {_MAX_SEGMENTS} marker segments (corrupt)")


def jpeg_dims(data: bytes) -> tuple[int, int]:
    """(height, width) from the first frame header: the image a JPEG decoder returns."""
    frames = jpeg_frames(data)
    if not frames:
        raise UploadError(422, "the JPEG has no frame header (truncated or corrupt)")
    return frames[0][0], frames[0][1]


def j2k_header(data: bytes) -> tuple[int, int, int, int]:
    """(height, width, components, tiles) from the SIZ marker of a JPEG 2000 codestream, bare
    or inside a JP2 file's ``jp2c`` box."""
    corrupt = UploadError(422, "the JPEG 2000 stream has no valid size header (SIZ; corrupt)")
    cs = _jp2_codestream(data) if data[4:8] == b"jP  " else data
    if len(cs) < 42 or cs[:4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ right after it
        raise corrupt
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = (
        int.from_bytes(cs[k : k + 4], "big") for k in range(8, 40, 4)
    )
    w, h = xsiz - xo, ysiz - yo
    if w <= 0 or h <= 0 or xt <= 0 or yt <= 0 or xto > xo or yto > yo:
        raise corrupt
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    return h, w, int.from_bytes(cs[40:42], "big"), tiles


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of a JP2 file's ``jp2c`` box (b"" when there is none)."""
    i, n = 0, len(data)
    for _ in range(64):  # a JP2 file has a handful of top-level boxes
        if i + 8 > n:
            break
        size, kind, head = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8], 8
        if size == 1:  # 64-bit length follows
            size, head = int.from_bytes(data[i + 8 : i + 16], "big"), 16
        elif size == 0:  # runs to the end of the file
            size = n - i
        if kind == b"jp2c":
            return data[i + head : i + size]
        if size < head:
            break
        i += size
    return b""


def _check_dims(h: int, w: int, max_pixels: int, what: str = "the image") -> None:
    if h <= 0 or w <= 0:
        raise UploadError(422, f"{what} header gives no size (truncated or corrupt)")
    if h * w > max_pixels:
        raise UploadError(
            413, f"{what} has {h}x{w} pixels, more than the server accepts ({max_pixels:,})"
        )


# ------------------------------------------------------------------------------------------ DICOM
class Geometry(NamedTuple):
    rows: int
    cols: int
    samples: int  # SamplesPerPixel
    bits: int  # BitsAllocated


def _stream_dims(h: int, w: int, g: Geometry, max_pixels: int) -> None:
    """The pixel stream's own size: within the cap (413) and equal to Rows x Columns (422)."""
    _check_dims(h, w, max_pixels, "the DICOM's pixel stream")
    if (h, w) != (g.rows, g.cols):
        raise UploadError(
            422, f"the DICOM's pixel stream is {h}x{w} but its header says {g.rows}x{g.cols} "
            "(corrupt or hostile; nothing was decoded)",
        )  # fmt: skip


def _components(found: int | None, g: Geometry, codec: str) -> None:
    if found is not None and found != g.samples:
        raise UploadError(
            422, f"the DICOM's {codec} stream has {found} components but its header says "
            f"{g.samples} samples per pixel (corrupt or hostile)",
        )  # fmt: skip


def _first_frame(ds) -> bytes:
    """The encoded bytes pydicom decodes for frame 0 of a single-frame dataset."""
    from pydicom.encaps import get_frame

    try:
        return get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception:
        raise UploadError(422, "the DICOM's encapsulated pixel data is corrupt") from None


def _check_native(ds, g: Geometry, max_pixels: int) -> None:
    from pydicom.pixels.utils import get_expected_length

    if g.bits not in (1, 8, 16, 32, 64):
        raise UploadError(422, f"the DICOM has {g.bits} bits allocated per sample (unsupported)")
    try:  # pydicom's own count: it knows YBR_FULL_422's subsampling and 1-bit packing
        need = get_expected_length(ds, "bytes")
    except Exception:
        raise UploadError(422, "the DICOM's image attributes are invalid (corrupt)") from None
    have = len(ds.PixelData)
    if not need <= have <= need + 1:  # + 1: the pad byte of an odd length
        raise UploadError(
            422, f"the DICOM's pixel data has {have:,} bytes but {g.rows}x{g.cols} pixels need "
            f"{need:,} (truncated or corrupt)",
        )  # fmt: skip


def _check_jpeg(ds, g: Geometry, max_pixels: int) -> None:
    frames, ended = _jpeg_scan(_first_frame(ds))
    if not frames:
        raise UploadError(422, "the DICOM's JPEG stream has no frame header (corrupt)")
    for h, w, comps in frames:  # every one: a decoder may use any of them
        _stream_dims(h, w, g, max_pixels)
        _components(comps, g, "JPEG")
    if not ended:
        raise UploadError(422, "the DICOM's JPEG stream has no end-of-image marker (truncated)")


def _check_j2k(ds, g: Geometry, max_pixels: int) -> None:
    h, w, comps, tiles = j2k_header(_first_frame(ds))
    _stream_dims(h, w, g, max_pixels)
    _components(comps, g, "JPEG 2000")
    if tiles > _MAX_J2K_TILES:
        raise UploadError(422, f"the DICOM's JPEG 2000 stream has {tiles:,} tiles (corrupt)")


def _check_rle(ds, g: Geometry, max_pixels: int) -> None:
    """RLE has no size of its own: its header must list one segment per sample byte, in order,
    each long enough to expand to Rows x Columns bytes (PackBits expands 2 bytes to at most 128)."""
    frame = _first_frame(ds)
    need = g.samples * g.bits // 8 if g.bits in (8, 16, 32, 64) else 0
    count = int.from_bytes(frame[:4], "little") if len(frame) >= 64 else -1
    if count != need or not 1 <= count <= 15:
        raise UploadError(422, "the DICOM's RLE header does not match its samples and bits "
                               "(corrupt)")  # fmt: skip
    starts = [int.from_bytes(frame[4 + 4 * k : 8 + 4 * k], "little") for k in range(count)]
    ends = [*starts[1:], len(frame)]
    least = 2 * -(-(g.rows * g.cols) // 128)
    if starts[0] != 64 or any(e - s < least for s, e in zip(starts, ends, strict=True)):
        raise UploadError(
            422, f"the DICOM's RLE segments are too short for {g.rows}x{g.cols} pixels (corrupt, "
            "or Rows/Columns enlarged)",
        )  # fmt: skip


@dataclass(frozen=True)
class Syntax:
    name: str
    family: str
    check: Callable[[Any, Geometry, int], None]  # (dataset, geometry, max_pixels): raises


_TS4 = "1.2.840.10008.1.2.4."  # the compressed syntaxes' common prefix
# The transfer syntaxes accepted, each with the check of its pixel stream; pydicom decodes them
# with the installed plugins (pylibjpeg-libjpeg, Pillow, its own RLE decoder).
TRANSFER_SYNTAXES: dict[str, Syntax] = {
    "1.2.840.10008.1.2": Syntax("Implicit VR Little Endian", "uncompressed", _check_native),
    "1.2.840.10008.1.2.1": Syntax("Explicit VR Little Endian", "uncompressed", _check_native),
    "1.2.840.10008.1.2.2": Syntax("Explicit VR Big Endian", "uncompressed", _check_native),
    _TS4 + "50": Syntax("JPEG Baseline", "JPEG", _check_jpeg),
    _TS4 + "51": Syntax("JPEG Extended", "JPEG", _check_jpeg),
    _TS4 + "57": Syntax("JPEG Lossless", "JPEG", _check_jpeg),
    _TS4 + "70": Syntax("JPEG Lossless SV1", "JPEG", _check_jpeg),
    _TS4 + "80": Syntax("JPEG-LS Lossless", "JPEG-LS", _check_jpeg),
    _TS4 + "81": Syntax("JPEG-LS Near-Lossless", "JPEG-LS", _check_jpeg),
    _TS4 + "90": Syntax("JPEG 2000 Lossless", "JPEG 2000", _check_j2k),
    _TS4 + "91": Syntax("JPEG 2000", "JPEG 2000", _check_j2k),
    _TS4 + "201": Syntax("HTJ2K Lossless", "HTJ2K", _check_j2k),
    _TS4 + "202": Syntax("HTJ2K Lossless RPCL", "HTJ2K", _check_j2k),
    _TS4 + "203": Syntax("HTJ2K", "HTJ2K", _check_j2k),
    "1.2.840.10008.1.2.5": Syntax("RLE Lossless", "RLE", _check_rle),
}
ACCEPTED = ", ".join(dict.fromkeys(s.family for s in TRANSFER_SYNTAXES.values()))


def transfer_syntax_of(data: bytes) -> str | None:
    """The Transfer Syntax UID (0002,0010) from the file meta group, read here and not by pydicom:
    pydicom inflates a deflated dataset whole while reading it (a few KB can become GBs)."""
    i, n = DICOM_MAGIC_OFFSET + 4, len(data)
    for _ in range(64):  # the meta group has about ten elements
        if i + 8 > n or data[i : i + 2] != b"\x02\x00":  # little endian group 0002
            return None
        elem, vr = int.from_bytes(data[i + 2 : i + 4], "little"), data[i + 4 : i + 6]
        if vr in _LONG_VRS:
            length, i = int.from_bytes(data[i + 8 : i + 12], "little"), i + 12
        else:
            length, i = int.from_bytes(data[i + 6 : i + 8], "little"), i + 8
        if i + length > n:
            return None
        if elem == 0x0010:
            return data[i : i + length].decode("ascii", "replace").strip("\x00 ")
        i += length
    return None


def _refuse_syntax(ts: str | None) -> UploadError:
    from pydicom.uid import UID

    if not ts:
        return UploadError(422, "the DICOM names no transfer syntax (corrupt)")
    try:
        name = UID(ts).name
    except Exception:
        name = ts
    # a registered name is public text; an unregistered UID is the file's and is not echoed
    what = f"transfer syntax {name!r}" if name != ts else "an unknown transfer syntax"
    return UploadError(415, f"the DICOM uses {what}, which this server does not decode; "
                            f"accepted: {ACCEPTED}")  # fmt: skip


def _inspect_dicom(data: bytes, max_pixels: int) -> Header:
    ts = transfer_syntax_of(data)
    if ts not in TRANSFER_SYNTAXES:
        raise _refuse_syntax(ts)
    # pydicom converts values lazily and warns (and logs) about odd ones quoting the value, e.g.
    # "Invalid value for VR UI: '<the UID>'": every access stays inside the silenced block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _inspect_dataset(data, ts, max_pixels)


def _inspect_dataset(data: bytes, ts: str, max_pixels: int) -> Header:
    import pydicom

    bad = UploadError(422, "the DICOM cannot be read (truncated, corrupt or not an image)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        g = Geometry(*(int(ds.get(k, d) or d) for k, d in
                       (("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1), ("BitsAllocated", 8))))  # fmt: skip
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        read_ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        uid = str(ds.get("SOPInstanceUID", "") or "") or None
    except Exception:
        raise bad from None
    if read_ts != ts or "PixelData" not in ds:
        raise bad
    _check_dims(g.rows, g.cols, max_pixels)
    if frames != 1:
        raise UploadError(422, "multi-frame DICOMs are not supported: send one X-ray per file")
    if g.samples not in (1, 3):
        raise UploadError(422, f"the DICOM has {g.samples} samples per pixel (1 or 3 accepted)")
    if "ExtendedOffsetTable" in ds or "ExtendedOffsetTableLengths" in ds:
        # only multi-frame data needs one, and pydicom would read frames by it
        raise UploadError(422, "the DICOM has an extended offset table (multi-frame only)")
    TRANSFER_SYNTAXES[ts].check(ds, g, max_pixels)
    return Header("dicom", g.rows, g.cols, uid, ds)


def _decode_dicom(h: Header) -> tuple[np.ndarray, IntakeInfo]:
    from pydicom.pixels import get_decoder

    from pneumoseg.data.intake import dicom_to_uint8

    ds = h.source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # frame 0 only (the bytes checked above), and not cached on the dataset
            arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=0)
            intake = dicom_to_uint8(arr, ds, "upload")
    except Exception:
        raise UploadError(422, "the DICOM cannot be decoded (truncated, corrupt or not an "
                               "image)") from None  # fmt: skip
    if intake.image.shape != (h.height, h.width):
        raise UploadError(422, "the DICOM decodes to another size than its header says")
    return intake.image, intake.info


# ------------------------------------------------------------------------------------ PNG and JPEG
def _inspect_raster(data: bytes, kind: str, max_pixels: int) -> Header:
    if kind == "png":
        h, w = png_dims(data)
    else:
        frames, ended = _jpeg_scan(data)
        if not frames:
            raise UploadError(422, "the JPEG has no frame header (truncated or corrupt)")
        if not ended:  # OpenCV would fill the missing part with grey
            raise UploadError(422, "the JPEG has no end-of-image marker (truncated)")
        for fh, fw, _ in frames[1:]:  # images after the first are not decoded, but still capped
            _check_dims(fh, fw, max_pixels)
        h, w, comps = frames[0]
        if comps not in (1, 3, 4):
            raise UploadError(422, f"the JPEG has {comps} components (1, 3 or 4 accepted)")
    _check_dims(h, w, max_pixels)
    return Header(kind, h, w, None, data)


def _decode_raster(h: Header) -> tuple[np.ndarray, IntakeInfo]:
    import cv2

    from pneumoseg.data.intake import png_significant_bits, raster_to_uint8

    arr = cv2.imdecode(np.frombuffer(h.source, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape[:2] != (h.height, h.width):
        raise UploadError(422, f"the {h.kind.upper()} cannot be decoded (truncated or corrupt)")
    sbit = png_significant_bits(h.source) if h.kind == "png" else None
    try:
        intake = raster_to_uint8(arr, h.kind, sbit)
    except UserError:
        raise UploadError(422, f"the {h.kind.upper()} has a pixel type this server does not "
                               "read") from None  # fmt: skip
    return intake.image, intake.info


def inspect_upload(data: bytes, max_pixels: int) -> Header:
    """Bytes of one upload -> its :class:`Header`, read without decoding any pixel;
    :class:`UploadError` (415/413/422) otherwise."""
    if not data:
        raise UploadError(422, "the file is empty")
    kind = sniff(data)
    if kind is None:
        raise UploadError(415, "not a DICOM, PNG or JPEG file (checked by content, not by name)")
    if kind == "dicom":
        return _inspect_dicom(data, max_pixels)
    return _inspect_raster(data, kind, max_pixels)


def decode(header: Header) -> Decoded:
    """The pixels of an inspected upload; :class:`UploadError` (422) when they do not decode to
    the size its header promised."""
    image, info = _decode_dicom(header) if header.kind == "dicom" else _decode_raster(header)
    dataset = header.source if header.kind == "dicom" else None
    return Decoded(image, header.kind, header.image_id, info, dataset)


def decode_upload(data: bytes, max_pixels: int) -> Decoded:
    """:func:`inspect_upload` then :func:`decode`, for one file on its own."""
    return decode(inspect_upload(data, max_pixels))
