"""DICOM/PNG readers (pneumoseg.io) and manifests (pneumoseg.data.dataset) on real and tmp files."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pneumoseg import io as pio
from pneumoseg.data import intake
from pneumoseg.data.dataset import (
    MANIFEST_COLUMNS,
    build_manifest,
    dataset_name,
    load_manifest,
    load_patient_map,
    read_image,
    read_mask,
    rle_table,
    save_manifest,
)
from pneumoseg.data.rle import read_rle_csv, rle_encode, union_mask

SAMPLE_CSV = "train-rle-sample.csv"


def real_dicoms(real_dir: Path) -> list[Path]:
    files = sorted(real_dir.rglob("*.dcm"))
    assert len(files) == 32, "expected the 32 real DICOMs described in siim-real/README.md"
    return files


def sample_cfg(root: Path, **kw) -> dict:
    return {"layout": "siim", "root": str(root), "train_images": ".", "rle_csv": SAMPLE_CSV, **kw}


def write_dicom(src: Path, dst: Path, arr: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """Re-encode a real DICOM's header with new (uncompressed) pixels: other sizes, depths..."""
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape
    for tag in ("LossyImageCompression", "LossyImageCompressionMethod"):
        if tag in ds:
            delattr(ds, tag)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def copy_sample(real_dir: Path, dst: Path, nested: bool = False) -> Path:
    """Copy sample_images/ to ``dst`` (flat or nested ``<study>/<series>/<id>.dcm``) + its CSV."""
    src = real_dir / "sample_images"
    for k, f in enumerate(sorted(src.glob("*.dcm"))):
        target = dst / f"study{k}" / f"series{k}" / f.name if nested else dst / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    shutil.copy(src / SAMPLE_CSV, dst / SAMPLE_CSV)
    return dst


# ==================================================================================================
# io
# ==================================================================================================
def test_every_real_dicom_reads(real_dir):
    for f in real_dicoms(real_dir):
        img, tags = intake.read_dicom(f)
        assert img.shape == (1024, 1024) and img.dtype == np.uint8, f
        assert img.max() > img.min()
        assert tags["PatientSex"] in ("M", "F"), f
        assert tags["ViewPosition"] in ("PA", "AP"), f
        assert isinstance(tags["PatientAge"], float) and 0 < tags["PatientAge"] < 120, f
        assert (tags["Rows"], tags["Columns"]) == (1024, 1024)
        header = pio.read_dicom_tags(f)
        assert header == tags
        assert intake.check_dicom(f) == tags
        assert np.array_equal(intake.read_image(f), img)


def test_parse_age():
    assert pio.parse_age("38") == 38.0
    assert pio.parse_age("038Y") == 38.0
    assert pio.parse_age("6M") == 0.5
    assert math.isnan(pio.parse_age("")) and math.isnan(pio.parse_age(None))
    assert math.isnan(pio.parse_age("abc"))


def test_dicom_monochrome1_and_16bit(real_dir, tmp_path):
    src = real_dicoms(real_dir)[0]
    ramp = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    inv = intake.read_dicom(write_dicom(src, tmp_path / "m1.dcm", ramp, "MONOCHROME1"))[0]
    assert np.array_equal(inv, 255 - ramp)
    deep = (np.tile(np.arange(256, dtype=np.uint16), (8, 1)) * 16).astype(np.uint16)  # 12-bit
    path = write_dicom(src, tmp_path / "d16.dcm", deep)
    img = intake.read_dicom(path)[0]  # no window in the file: the robust percentile window
    lo, hi = np.percentile(deep, intake.ROBUST_PERCENTILES)
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    assert np.array_equal(img, np.clip(np.round((deep - lo) * 255 / (hi - lo)), 0, 255))
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 2040.5, 4081  # maps 0..4080 onto the full range
    ds.save_as(path)
    assert np.array_equal(intake.read_dicom(path)[0], ramp)


def test_dicom_errors_name_the_file(real_dir, tmp_path):
    src = real_dicoms(real_dir)[0]
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a dicom" * 100)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(src.read_bytes()[:-2000])
    for reader in (intake.read_dicom, pio.read_dicom_tags, intake.check_dicom):
        with pytest.raises(pio.DicomReadError, match=r"garbage\.dcm"):
            reader(garbage)
    with pytest.raises(pio.DicomReadError, match=r"truncated\.dcm"):
        intake.read_dicom(truncated)
    with pytest.raises(pio.DicomReadError, match=r"truncated\.dcm"):
        intake.check_dicom(truncated)
    with pytest.raises(FileNotFoundError, match=r"nothere\.dcm"):
        intake.read_dicom(tmp_path / "nothere.dcm")


def test_png_reading(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "c.png"), np.dstack([gray] * 3))
    cv2.imwrite(str(tmp_path / "w.png"), gray.astype(np.uint16) * 257)  # 8 -> 16 bit: x 257
    for name in ("g.png", "c.png", "w.png"):
        out = intake.read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (20, 30)
        assert np.array_equal(out, gray), name
    assert pio.png_size(tmp_path / "g.png") == (20, 30)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"bad\.png"):
        intake.read_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match=r"none\.png"):
        intake.read_image(tmp_path / "none.png")


def test_atomic_write_permissions(tmp_path):
    with pio.atomic_write(tmp_path / "a.txt") as fh:
        fh.write("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o044  # readable by others (not mkstemp's 0600)


# ==================================================================================================
# siim manifests
# ==================================================================================================
def test_manifest_real_sample_flat(real_dir, tmp_path):
    root = real_dir / "sample_images"
    df = build_manifest(sample_cfg(root), "train")
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 10 and int(df["has_mask"].sum()) == 5
    truth = read_rle_csv(root / SAMPLE_CSV)
    for row in df.itertuples():
        assert row.id in truth and Path(row.image_path).stem == row.id
        assert row.mask_area == int(union_mask(truth[row.id]).sum())
        assert row.n_instances == len(truth[row.id])
        assert row.has_mask == (row.mask_area > 0)
        assert row.sex in ("M", "F") and row.view in ("PA", "AP") and row.age > 0
        assert (row.height, row.width, row.source) == (1024, 1024, "siim")
        assert row.rle_csv == str(root / SAMPLE_CSV) and row.rle_format == "relative"
        assert row.mask_path == ""
    for row in df.to_dict("records")[:4]:
        mask = read_mask(row)
        assert mask.dtype == np.uint8 and mask.shape == (1024, 1024)
        assert int(mask.sum()) == row["mask_area"] and set(np.unique(mask)) <= {0, 1}
        assert read_image(pd.Series(row)).shape == (1024, 1024)
    # patient ids without a map: the per-image DICOM PatientID
    assert df["patient_id"].nunique() == 10
    # round trip
    save_manifest(df, tmp_path / "m.csv")
    back = load_manifest(tmp_path / "m.csv")
    pd.testing.assert_frame_equal(back, df)
    assert dataset_name({"root": str(root)}) == "sample_images"


def test_manifest_train_extract_masks(real_dir):
    root = real_dir / "train_extract"
    cfg = {"root": str(root), "train_images": ".", "rle_csv": "train-rle-extract.csv"}
    df = build_manifest(cfg, "train").set_index("id")
    r301 = df.loc["1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"]
    r307 = df.loc["1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"]
    assert r307.n_instances == 4 and r301.n_instances == 1
    mask = read_mask(r301)
    png = intake.read_image(root / "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319_mask.png")
    assert int(mask.sum()) == 10099 == r301.mask_area
    assert int((mask & (png > 0)).sum()) == 10099  # inside the independent ground truth


def test_manifest_nested_layout(real_dir, tmp_path):
    root = tmp_path / "kaggle"
    copy_sample(real_dir, root / "dicom-images-train", nested=True)
    shutil.move(root / "dicom-images-train" / SAMPLE_CSV, root / "train-rle.csv")
    df = build_manifest({"root": str(root)}, "train")  # base.yaml defaults for the folder names
    flat = build_manifest(sample_cfg(real_dir / "sample_images"), "train")
    assert len(df) == 10 and int(df["has_mask"].sum()) == 5
    assert all("/study" in p and "/series" in p for p in df["image_path"])
    cols = ["id", "mask_area", "n_instances", "patient_id", "sex", "age", "view"]
    pd.testing.assert_frame_equal(df[cols], flat[cols])


def test_manifest_test_split(real_dir):
    root = real_dir / "stage2_test"
    df = build_manifest({"root": str(root), "test_images": "."}, "test")
    assert len(df) == 20 and not df["has_mask"].any()
    assert (df["rle_csv"] == "").all() and (df["mask_area"] == 0).all()
    assert df["id"].str.match(r"^ID_[0-9a-f]{9}$").all()
    assert df["patient_id"].nunique() == 20  # empty PatientID: each image is its own patient
    assert read_mask(df.iloc[0]).sum() == 0


def test_manifest_problems_summary_and_strict(real_dir, tmp_path, caplog):
    root = copy_sample(real_dir, tmp_path / "broken")
    files = sorted(root.glob("*.dcm"))
    data = files[0].read_bytes()
    (root / "trunc_img.dcm").write_bytes(data[: len(data) // 2])
    (root / "garbage_img.dcm").write_bytes(b"\x00garbage" * 500)
    write_dicom(files[1], root / "small_img.dcm", np.full((512, 512), 7, np.uint8))
    shutil.copy(files[2], root / "unlisted_img.dcm")
    with open(root / SAMPLE_CSV, "a", encoding="utf-8") as fh:
        fh.write("\n")  # the real file has no final newline (blank lines are skipped)
        for name in ("trunc_img", "garbage_img", "small_img", "nofile_img"):
            fh.write(f"{name},-1\n")
        fh.write(f"bigrle_img,{rle_encode(np.ones((1024, 1024), np.uint8))}\n")
    shutil.copy(files[3], root / "bigrle_img.dcm")
    write_dicom(files[3], root / "bigrle_img.dcm", np.zeros((512, 512), np.uint8))

    cfg = sample_cfg(root)
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.dataset"):
        df = build_manifest(cfg, "train")
    text = caplog.text
    for name in ("trunc_img.dcm", "garbage_img.dcm", "nofile_img.dcm", "small_img.dcm"):
        assert name in text, name
    assert "unlisted_img.dcm" in text and "bigrle_img.dcm" in text
    assert "1 listed id(s) with no image file" in text
    assert "2 unreadable or corrupt image(s)" in text
    assert "image(s) of unexpected size" in text and "512x512" in text
    assert "1 mask(s) that do not fit their image" in text
    assert set(df["id"]) == {f.stem for f in files} | {"small_img"}  # odd size kept, bad ones out
    small = df.set_index("id").loc["small_img"]
    assert (small.height, small.width) == (512, 512)
    assert read_image(small).shape == (512, 512)

    with pytest.raises(ValueError, match=r"trunc_img\.dcm") as exc:
        build_manifest(cfg, "train", strict=True)
    assert "nofile_img.dcm" in str(exc.value) and "garbage_img.dcm" in str(exc.value)
    with pytest.raises(ValueError, match=r"small_img\.dcm"):
        build_manifest({**cfg, "strict": True}, "train")


def test_manifest_size_only_strict(real_dir, tmp_path):
    root = copy_sample(real_dir, tmp_path / "sz")
    with pytest.raises(ValueError, match="unexpected size"):
        build_manifest(sample_cfg(root, original_size=512), "train", strict=True)


def test_patient_map(real_dir, tmp_path, caplog):
    root = real_dir / "sample_images"
    ids = sorted(f.stem for f in root.glob("*.dcm"))
    lines = ["Kaggle_ID,NIH_ID"]
    lines += [f"{i},00000042_{k:03d}.png" for k, i in enumerate(ids[:3])]
    lines += [f"{i},00000777_{k:03d}.png" for k, i in enumerate(ids[3:6])]
    (tmp_path / "nih_id.csv").write_text("\n".join(lines) + "\n")
    assert load_patient_map(tmp_path / "nih_id.csv")[ids[0]] == "00000042"
    cfg = sample_cfg(root, patient_map=str(tmp_path / "nih_id.csv"))
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.dataset"):
        df = build_manifest(cfg, "train").set_index("id")
    assert "covers 6/10 ids" in caplog.text
    assert (df.loc[ids[:3], "patient_id"] == "00000042").all()
    assert (df.loc[ids[3:6], "patient_id"] == "00000777").all()
    assert df["patient_id"].nunique() == 2 + 4  # two mapped patients, four fall back to PatientID
    save_manifest(df.reset_index(), tmp_path / "m.csv")
    assert load_manifest(tmp_path / "m.csv")["patient_id"].str.startswith("0000").sum() == 6


def test_real_patient_map(real_dir):
    root = real_dir / "train_extract"
    cfg = {
        "root": str(root),
        "train_images": ".",
        "rle_csv": "train-rle-extract.csv",
        "patient_map": str(real_dir / "metadata" / "nih_id.csv"),
    }
    df = build_manifest(cfg, "train")
    assert df["patient_id"].str.fullmatch(r"\d{8}").all()


def test_rle_table_cached(real_dir):
    path = real_dir / "sample_images" / SAMPLE_CSV
    assert rle_table(path) is rle_table(path)


# ==================================================================================================
# png layout
# ==================================================================================================
def make_png_set(root: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A tiny vbookshelf-style set: png_images/, png_masks/, stage_1_{train,test}_images.csv."""
    rng = np.random.default_rng(seed)
    (root / "png_images").mkdir(parents=True, exist_ok=True)
    (root / "png_masks").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = []
        for i in range(n):
            label = int(i % 2 == 1)
            name = f"{i}_{split}_{label}_.png"
            img = rng.integers(0, 256, (size, size), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            if label:
                cv2.circle(mask, (size // 3, size // 2), size // 6 + i % 3, 255, -1)
                if i % 4 == 3:
                    cv2.rectangle(mask, (size - 12, 2), (size - 4, 10), 255, -1)
            cv2.imwrite(str(root / "png_images" / name), img)
            cv2.imwrite(str(root / "png_masks" / name), mask)
            rows.append((name, f"1.2.3.{split}.{i}", label))
        pd.DataFrame(rows, columns=["new_filename", "ImageId", "has_pneumo"]).to_csv(
            root / f"stage_1_{split}_images.csv", index=False
        )
    return root


def png_cfg(root: Path, **kw) -> dict:
    return {
        "layout": "png",
        "root": str(root),
        "train_images": "png_images",
        "test_images": "png_images",
        "train_masks": "png_masks",
        "original_size": 64,
        **kw,
    }


def test_png_layout(tmp_path, caplog):
    root = make_png_set(tmp_path / "pngs")
    df = build_manifest(png_cfg(root), "train")
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 8 and int(df["has_mask"].sum()) == 4
    assert (df["source"] == "png").all() and (df["rle_csv"] == "").all()
    assert (df["patient_id"] == df["id"]).all() and df["age"].isna().all()
    by_id = df.set_index("id")
    assert by_id.loc["1.2.3.train.3", "n_instances"] == 2
    assert by_id.loc["1.2.3.train.1", "n_instances"] == 1
    for row in df.to_dict("records"):
        mask = read_mask(row)
        assert set(np.unique(mask)) <= {0, 1} and int(mask.sum()) == row["mask_area"]
        assert np.array_equal(read_image(row), cv2.imread(row["image_path"], 0))
    test = build_manifest(png_cfg(root), "test")
    assert len(test) == 8 and test["id"].str.contains("test").all()

    # problems: a listed file missing, an unlisted train png, a label contradicting its mask
    (root / "png_images" / "0_train_0_.png").unlink()
    shutil.copy(root / "png_images" / "1_train_1_.png", root / "png_images" / "99_train_1_.png")
    index = pd.read_csv(root / "stage_1_train_images.csv")
    index.loc[2, "has_pneumo"] = 1
    index.to_csv(root / "stage_1_train_images.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.dataset"):
        df = build_manifest(png_cfg(root), "train")
    assert len(df) == 7
    for name in ("0_train_0_.png", "99_train_1_.png", "2_train_0_.png"):
        assert name in caplog.text
    with pytest.raises(ValueError, match=r"0_train_0_\.png"):
        build_manifest(png_cfg(root, strict=True), "train")


def test_png_patient_map(tmp_path):
    root = make_png_set(tmp_path / "pngs", n=4)
    (root / "map.csv").write_text(
        "Kaggle_ID,NIH_ID\n1.2.3.train.0,0001_000.png\n1.2.3.train.1,0001_001.png\n"
    )
    df = build_manifest(png_cfg(root, patient_map="map.csv"), "train")
    assert df["patient_id"].tolist() == ["0001", "0001", "1.2.3.train.2", "1.2.3.train.3"]


def test_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        build_manifest({"root": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="layout"):
        build_manifest({"root": str(tmp_path), "layout": "jpeg"})
    with pytest.raises(ValueError, match="split"):
        build_manifest({"root": str(tmp_path)}, "valid")
    with pytest.raises(FileNotFoundError, match="DICOM folder"):
        build_manifest({"root": str(tmp_path)}, "train")
