"""DICOM SEG output (pneumoseg.inference.dicom_seg): round trips on real SIIM DICOMs and pydicom's
bundled files, read back with highdicom and pydicom and checked with dciodvfy (dicom3tools)."""

import logging
import os
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes
from pydicom.valuerep import validate_value

import pneumoseg
from pneumoseg.data.rle import read_rle_csv, union_mask
from pneumoseg.errors import ConfigError, DataError, MissingFileError, OutputExistsError
from pneumoseg.inference import dicom_seg
from pneumoseg.inference.dicom_seg import (
    ALGORITHM_FAMILY_CODE,
    CATEGORY_CODE,
    PROPERTY_TYPE_CODE,
    SegAlgorithm,
    SegWriteError,
    derive_uid,
    read_seg_mask,
    render_seg_overlay,
    replaced_uids,
    write_seg,
)

ALGO = SegAlgorithm("demo", "0,1,2", "hflip", "threshold=0.5 min_area=128")
ID_301 = "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"
ID_307 = "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"
STAGE2 = "stage2_test/ID_0011fe81e.dcm"
REAL_FILES = [
    f"train_extract/{ID_301}.dcm",  # ground truth: one instance
    f"train_extract/{ID_307}.dcm",  # ground truth: union of 4 overlapping instances
    "sample_images/1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027.dcm",
    "sample_images/1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709.dcm",
    STAGE2,
    "stage2_test/ID_018f96b48.dcm",  # PatientAge '2' -> '002Y'
]
DCIODVFY = shutil.which("dciodvfy")


# ---------------------------------------------------------------------------------------- helpers
def dciodvfy_errors(path) -> list[str]:
    """The "Error" lines dciodvfy reports for ``path``; none when dicom3tools is absent (then
    test_dciodvfy_finds_errors skips and says so, and the other checks still count)."""
    if DCIODVFY is None:
        return []
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [x for x in (res.stdout + res.stderr).splitlines() if x.startswith("Error")]


def header(path):
    with config.disable_value_validation():  # the SIIM files' own invalid values: not under test
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for _ in ds:  # values are converted (and validated) when first read: now
            pass
    return ds


def blob(shape, seed=0) -> np.ndarray:
    """A mask with a few rectangles, some at the edges (the 1-bit packing's corner cases)."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    h, w = shape
    for _ in range(4):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[y : y + int(rng.integers(1, h // 3 + 2)), x : x + int(rng.integers(1, w // 3 + 2))] = 1
    m[-1, -1] = m[0, 0] = 1
    return m


def ground_truth(real_dir, name) -> np.ndarray:
    rles = read_rle_csv(real_dir / "train_extract" / "train-rle-extract.csv")
    return union_mask(rles[name])


def real_mask(real_dir, rel: str) -> np.ndarray:
    stem = rel.split("/")[-1][: -len(".dcm")]
    if stem in (ID_301, ID_307):
        return ground_truth(real_dir, stem)
    return blob((1024, 1024), seed=len(stem))


def referenced(seg) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance) UIDs of the image a SEG references."""
    series = seg.ReferencedSeriesSequence[0]
    sop = series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == sop
    return str(seg.StudyInstanceUID), str(series.SeriesInstanceUID), str(sop)


def seg_pixels(path) -> np.ndarray:
    """The segment of a SEG file as highdicom reads it (float for FRACTIONAL)."""
    seg = hd.seg.segread(path)
    uid = seg.get_source_image_uids()[0][2]
    return seg.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, ..., 0]


def check_common(seg, src) -> None:
    """What every SEG carries: the segment, the algorithm, the series and device attributes."""
    assert seg.Modality == "SEG" and seg.NumberOfFrames == 1
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    item = seg.SegmentSequence[0]
    assert item.SegmentLabel == "Pneumothorax" and item.SegmentAlgorithmType == "AUTOMATIC"
    cat, typ = (
        item.SegmentedPropertyCategoryCodeSequence[0],
        item.SegmentedPropertyTypeCodeSequence[0],
    )
    assert (cat.CodeValue, cat.CodingSchemeDesignator, cat.CodeMeaning) == CATEGORY_CODE
    assert (typ.CodeValue, typ.CodingSchemeDesignator, typ.CodeMeaning) == PROPERTY_TYPE_CODE
    algo = hd.AlgorithmIdentificationSequence.from_sequence(
        item.SegmentationAlgorithmIdentificationSequence
    )
    assert (algo.name, algo.version) == ("pneumoseg", pneumoseg.__version__)
    assert (algo.family.value, algo.family.scheme_designator) == ALGORITHM_FAMILY_CODE[:2]
    assert algo.parameters == {"experiment": "demo", "folds": "0;1;2", "tta": "hflip",
                               "postprocess": "threshold:0.5 min_area:128"}  # fmt: skip
    assert (
        seg.SeriesDescription == f"AI pneumothorax segmentation (pneumoseg {pneumoseg.__version__})"
    )
    assert seg.Manufacturer == "pneumoseg" and seg.ManufacturerModelName == "pneumoseg"
    assert seg.SoftwareVersions == pneumoseg.__version__
    assert seg.DeviceSerialNumber == ALGO.device_serial and seg.SeriesNumber == 9001
    assert seg.ContentLabel == "PNEUMOTHORAX" and seg.ContentDescription.startswith("AI pneumo")


def check_patient(seg, src) -> None:
    """The patient module as in the source, the age in the standard form."""
    for kw in ("PatientID", "PatientName", "PatientSex", "PatientBirthDate", "StudyDate"):
        assert str(seg.get(kw, "")) == str(src.get(kw, "")), kw
    age = str(src.PatientAge)
    assert seg.PatientAge == (age if len(age) == 4 else f"{int(age):03d}Y")
    validate_value("AS", seg.PatientAge, config.RAISE)


def test_dciodvfy_finds_errors(tmp_path):
    """The validator is there and would see what the SEG rules fix (a SIIM-style age '64')."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed, so no SEG was validated by it; "
                    "CI installs it (.ci/run)")  # fmt: skip
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with config.disable_value_validation():
        ds.PatientAge = "64"
    ds.save_as(tmp_path / "bad_age.dcm")
    assert any("Patient's Age" in e for e in dciodvfy_errors(tmp_path / "bad_age.dcm"))


# ----------------------------------------------------------------------------------------- codes
def test_codes_are_in_their_context_groups():
    """The segment's codes are members of the DICOM context groups the README cites."""

    def members(cid: int, scheme: str) -> dict[str, str]:
        table = getattr(codes, scheme)
        return {getattr(table, kw).value: getattr(table, kw).meaning
                for kw in cid_concepts[cid].get(scheme, [])}  # fmt: skip

    value, scheme, meaning = CATEGORY_CODE
    assert members(7150, scheme)[value] == meaning  # Segmentation Property Category
    value, scheme, meaning = PROPERTY_TYPE_CODE
    assert members(6102, scheme)[value] == meaning
    assert members(6105, scheme)[value] == meaning
    assert value not in members(7151, scheme)  # CID 7151 is extensible: we extend it
    value, scheme, meaning = ALGORITHM_FAMILY_CODE
    assert members(7162, scheme)[value] == meaning  # the SEG's Algorithm Family context group


# ------------------------------------------------------------------------------ real SIIM files
@pytest.mark.parametrize("rel", REAL_FILES, ids=lambda r: r.split("/")[-1][-16:])
def test_real_round_trip(real_dir, tmp_path, rel):
    source = real_dir / rel
    mask = real_mask(real_dir, rel)
    assert mask.any()
    out = write_seg(source, mask, tmp_path / "seg.dcm", ALGO)
    assert out == tmp_path / "seg.dcm" and os.listdir(tmp_path) == ["seg.dcm"]
    np.testing.assert_array_equal(seg_pixels(out), mask)
    np.testing.assert_array_equal(read_seg_mask(out), mask.astype(bool))
    seg, src = pydicom.dcmread(out), header(source)
    check_common(seg, src)
    check_patient(seg, src)
    if "ID_" not in rel:  # stage-2 files: derived UIDs, see test_real_stage2_quirks
        assert referenced(seg) == (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
        assert "ImageComments" not in seg
    assert (
        "FrameOfReferenceUID" not in seg
        and "PixelMeasuresSequence" not in (seg.SharedFunctionalGroupsSequence[0])
    )  # CR Secondary Capture: no coordinate system (see QUIRK_RULES)
    assert dciodvfy_errors(out) == []


def test_real_stage2_quirks(real_dir, tmp_path, caplog):
    """ID_ SOP Instance UID, empty Study/Series UIDs and PatientID, age '64': valid derived UIDs,
    the same on every run, the originals in ImageComments; no values in the logs."""
    source = real_dir / STAGE2
    src = header(source)
    assert (src.SOPInstanceUID, src.StudyInstanceUID, src.SeriesInstanceUID) == (
        "ID_0011fe81e", "", "")  # fmt: skip
    assert (src.PatientID, str(src.PatientName), src.PatientAge) == ("", "", "64")
    mask = blob((1024, 1024), seed=3)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        first = pydicom.dcmread(write_seg(source, mask, tmp_path / "a.dcm", ALGO))
    records = list(caplog.records)
    again = pydicom.dcmread(write_seg(source, mask, tmp_path / "b.dcm", ALGO))
    study, series, sop = referenced(first)
    assert referenced(again) == (study, series, sop)  # deterministic
    assert first.SOPInstanceUID != again.SOPInstanceUID  # each SEG is a new instance
    assert first.SeriesInstanceUID != series  # ... of a new series
    for uid in (study, series, sop):
        validate_value("UI", uid, config.RAISE)
    assert sop == derive_uid("SOPInstanceUID", "ID_0011fe81e")
    assert study == derive_uid("StudyInstanceUID", "ID_0011fe81e")
    kept = replaced_uids(first)
    assert {k: (r.original, r.uid) for k, r in kept.items()} == {
        "SOPInstanceUID": ("ID_0011fe81e", sop),
        "StudyInstanceUID": ("", study),
        "SeriesInstanceUID": ("", series),
    }
    assert (first.PatientID, str(first.PatientName), first.PatientAge) == ("", "", "064Y")
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "empty StudyInstanceUID and SeriesInstanceUID" in warnings[0]
    assert not [r for r in records if r.name.startswith("pydicom")]  # they quote values
    logged = " ".join(r.getMessage() for r in records)
    assert "'64'" not in logged and "Invalid value" not in logged and "ID_0011fe81e'" not in logged
    assert dciodvfy_errors(tmp_path / "a.dcm") == []


def test_real_empty_mask(real_dir, tmp_path):
    source = real_dir / REAL_FILES[2]
    out = write_seg(source, np.zeros((1024, 1024), bool), tmp_path / "empty.dcm", ALGO)
    seg = pydicom.dcmread(out)
    assert seg.NumberOfFrames == 1 and len(seg.SegmentSequence) == 1
    assert not seg_pixels(out).any()
    assert dciodvfy_errors(out) == []


def test_real_fractional(real_dir, tmp_path):
    source = real_dir / f"train_extract/{ID_301}.dcm"
    rng = np.random.default_rng(0)
    prob = rng.random((1024, 1024), dtype=np.float32)
    prob[:2, :2] = [[0.0, 1.0], [0.5 / 255, 254.5 / 255]]  # the ends and the rounding edges
    mask = prob >= 0.5
    out = write_seg(source, mask, tmp_path / "p.dcm", ALGO, prob=prob, fractional=True)
    seg = pydicom.dcmread(out)
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert seg.MaximumFractionalValue == 255 and seg.BitsAllocated == 8
    got = seg_pixels(out)
    assert got.dtype.kind == "f" and np.abs(got - prob).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(read_seg_mask(out), got >= 0.5)
    assert dciodvfy_errors(out) == []


def test_real_invalid_values_left_out(real_dir, tmp_path):
    """A copied attribute whose value is invalid for its VR is written empty, not as it was;
    an overlong DS is re-formatted; the source file is not touched."""
    source = tmp_path / "src.dcm"
    shutil.copyfile(real_dir / REAL_FILES[0], source)
    with config.disable_value_validation():
        ds = pydicom.dcmread(source)
        ds.PatientBirthDate = "1901"  # DA wants YYYYMMDD
        ds.PatientSize = "1.7500000000000001"  # DS: 18 characters
        ds.save_as(source)
    before = source.read_bytes()
    seg = pydicom.dcmread(write_seg(source, blob((1024, 1024)), tmp_path / "s.dcm", ALGO))
    assert source.read_bytes() == before
    assert "PatientBirthDate" in seg and seg.PatientBirthDate == ""
    assert str(seg.PatientSize) == "1.75"
    assert dciodvfy_errors(tmp_path / "s.dcm") == []


def test_real_imager_pixel_spacing_with_thickness(real_dir, tmp_path):
    """Without a coordinate system, Pixel Measures are written only from a spacing (here
    ImagerPixelSpacing) and a slice thickness together; highdicom reads them back."""
    source = tmp_path / "dx.dcm"
    with config.disable_value_validation():
        ds = pydicom.dcmread(real_dir / REAL_FILES[0])
        del ds.PixelSpacing
        ds.ImagerPixelSpacing = ["0.15", "0.15"]
        ds.SliceThickness = "1"
        ds.save_as(source)
    mask = blob((1024, 1024), seed=5)
    out = write_seg(source, mask, tmp_path / "s.dcm", ALGO)
    measures = pydicom.dcmread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.15]
    np.testing.assert_array_equal(seg_pixels(out), mask)
    assert dciodvfy_errors(out) == []


def test_real_render_overlay(real_dir, tmp_path):
    """The picture comes from the SEG file read back: red where the ground truth is."""
    import cv2

    source = real_dir / f"train_extract/{ID_301}.dcm"
    mask = ground_truth(real_dir, ID_301)
    seg = write_seg(source, mask, tmp_path / "s.dcm", ALGO)
    png = render_seg_overlay(seg, source, tmp_path / "o.png", width=256)
    bgr = cv2.imread(str(png))
    assert bgr.shape == (256, 256, 3)
    red = (bgr[..., 2].astype(int) - bgr[..., 1]) > 40
    small = cv2.resize(mask.astype(np.float32), (256, 256), interpolation=cv2.INTER_AREA) >= 0.5
    assert red[small].mean() > 0.9 and red[~small].mean() < 0.02
    with pytest.raises(DataError, match="pass the SEG's own source"):
        render_seg_overlay(seg, get_testdata_file("CT_small.dcm"), tmp_path / "x.png")


# ------------------------------------------------------------------------- other sources, errors
@pytest.mark.parametrize(
    "name, frame_of_reference",
    [
        ("CT_small.dcm", True),  # patient coordinate system: FoR and Pixel Measures kept
        ("MR_small.dcm", True),
        ("JPEG-lossy.dcm", False),  # NM Secondary Capture: FoR but no position, no thickness
        ("image_dfl.dcm", False),  # Secondary Capture without any spacing
    ],
)
def test_pydicom_sources(tmp_path, name, frame_of_reference):
    source = get_testdata_file(name)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    mask = blob((src.Rows, src.Columns), seed=1)
    out = write_seg(source, mask, tmp_path / "s.dcm", ALGO)
    seg = pydicom.dcmread(out)
    check_common(seg, src)
    if src.get("PatientAge"):
        check_patient(seg, src)
    assert referenced(seg) == (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
    assert ("FrameOfReferenceUID" in seg) is frame_of_reference
    if frame_of_reference:
        assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in src.PixelSpacing]
    np.testing.assert_array_equal(seg_pixels(out), mask)
    assert dciodvfy_errors(out) == []


def test_multiframe_source_refused(tmp_path):
    source = get_testdata_file("SC_rgb_rle_2frame.dcm")
    with pytest.raises(DataError, match=r"SC_rgb_rle_2frame\.dcm: a multi-frame DICOM \(2 frames"):
        write_seg(source, np.zeros((100, 100), bool), tmp_path / "s.dcm", ALGO)
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_without_force(tmp_path):
    source = get_testdata_file("CT_small.dcm")
    out = tmp_path / "s.dcm"
    out.write_bytes(b"someone else's file")
    mask = blob((128, 128))
    with pytest.raises(OutputExistsError, match=f"{out} exists; pass force=True"):
        write_seg(source, mask, out, ALGO)
    assert out.read_bytes() == b"someone else's file"
    write_seg(source, mask, out, ALGO, force=True)
    np.testing.assert_array_equal(seg_pixels(out), mask)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_validation_leaves_nothing(tmp_path, monkeypatch, existing):
    """A SEG that reads back other pixels is never renamed into place: no file (or the old one
    untouched), no temp file left."""
    real_check = dicom_seg._check_written

    def corrupting(fh, expected, *args):  # the real check, against other pixels
        return real_check(fh, ~expected, *args)

    monkeypatch.setattr(dicom_seg, "_check_written", corrupting)
    out = tmp_path / "s.dcm"
    if existing:
        out.write_bytes(b"old SEG")
    with pytest.raises(SegWriteError, match=f"other pixels .* nothing was written to {out}"):
        write_seg(get_testdata_file("CT_small.dcm"), blob((128, 128)), out, ALGO, force=True)
    assert os.listdir(tmp_path) == (["s.dcm"] if existing else [])
    if existing:
        assert out.read_bytes() == b"old SEG"


def test_unreadable_written_seg_leaves_nothing(tmp_path, monkeypatch):
    def broken(ds, copy=True):
        raise ValueError("simulated reader failure")

    monkeypatch.setattr(hd.seg.Segmentation, "from_dataset", broken)
    out = tmp_path / "s.dcm"
    with pytest.raises(SegWriteError, match=r"does not read back .*simulated reader failure"):
        write_seg(get_testdata_file("CT_small.dcm"), blob((128, 128)), out, ALGO)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "mask, prob, fractional, message",
    [
        (np.zeros((128, 127), bool), None, False, r"mask for .*CT_small\.dcm is \(127, 128\) but "
                                                  r"the image is 128×128"),
        (np.zeros((128,), bool), None, False, r"mask for .*CT_small\.dcm is \(128,\)"),
        (np.zeros((128, 128), np.float32), None, False, "pass a bool or integer mask"),
        (np.zeros((128, 128), bool), None, True, "needs prob="),
        (np.zeros((128, 128), bool), np.zeros((64, 64)), True, r"probability map .* shape"),
        (np.zeros((128, 128), bool), np.full((128, 128), 1.5), True, r"outside \[0, 1\]"),
        (np.zeros((128, 128), bool), np.full((128, 128), np.nan), True, r"outside \[0, 1\]"),
    ],
)  # fmt: skip
def test_wrong_inputs_refused(tmp_path, mask, prob, fractional, message):
    with pytest.raises(DataError, match=message):
        write_seg(get_testdata_file("CT_small.dcm"), mask, tmp_path / "s.dcm", ALGO,
                  prob=prob, fractional=fractional)  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_unusable_sources_refused(tmp_path):
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a dicom file at all" * 20)
    with pytest.raises(DataError, match=r"x\.dcm: not a DICOM file"):
        write_seg(not_dicom, np.zeros((8, 8), bool), tmp_path / "s.dcm", ALGO)
    with pytest.raises(MissingFileError, match=r"missing\.dcm"):
        write_seg(tmp_path / "missing.dcm", np.zeros((8, 8), bool), tmp_path / "s.dcm", ALGO)
    no_uid = tmp_path / "no_uid.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ""
    ds.save_as(no_uid)
    with pytest.raises(DataError, match=r"no_uid\.dcm: the DICOM has no SOPInstanceUID"):
        write_seg(no_uid, np.zeros((128, 128), bool), tmp_path / "s.dcm", ALGO)
    assert sorted(os.listdir(tmp_path)) == ["no_uid.dcm", "x.dcm"]


# ------------------------------------------------------------------------------ rules, algorithm
@pytest.mark.parametrize(
    "vr, values, fixed",
    [
        ("AS", ["64"], "064Y"),
        ("AS", ["2"], "002Y"),
        ("AS", ["5m"], "005M"),
        ("AS", ["64.5"], None),
        ("AS", ["1200"], None),
        ("DS", ["0.14300000000000002"], "0.143"),
        ("DS", ["0.19431099999999998", "0.19431099999999998"], ["0.194311", "0.194311"]),
        ("DS", ["-1.2345678901234567e-300"], "-1.23456789e-300"),
        ("DS", ["nan"], None),
        ("DA", ["1901"], None),
        ("CS", ["lower case"], None),
    ],
)
def test_value_rules(vr, values, fixed):
    got = dicom_seg._repaired(vr, values)
    assert got == fixed
    for v in [] if got is None else [got] if isinstance(got, str) else got:
        validate_value(vr, v, config.RAISE)


def test_derived_uids_are_valid_and_deterministic():
    uid = derive_uid("SOPInstanceUID", "ID_0011fe81e")
    validate_value("UI", uid, config.RAISE)
    assert uid == derive_uid("SOPInstanceUID", "ID_0011fe81e")
    assert uid != derive_uid("SOPInstanceUID", "ID_003206608")
    assert uid != derive_uid("StudyInstanceUID", "ID_0011fe81e")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"experiment": "a\\b"}, "experiment"),
        ({"experiment": "x" * 65}, "experiment"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"version": "1" * 60}, "series description is longer than 64"),
        ({"tta": 3}, "tta must be a string"),
    ],
)
def test_algorithm_refuses_what_a_seg_cannot_hold(kwargs, message):
    fields = {"experiment": "demo", "folds": "0", "tta": "none", "postprocess": "", **kwargs}
    with pytest.raises(ConfigError, match=message):
        SegAlgorithm(**fields)


def test_quirk_rules_table_is_complete():
    """The README's list: every rule has a quirk and what is done about it."""
    assert len(dicom_seg.QUIRK_RULES) >= 8
    assert all(len(quirk) > 10 and len(rule) > 10 for quirk, rule in dicom_seg.QUIRK_RULES)
