"""DICOM SEG outputs of predict.py (--image and --submission with --dicom-seg) and of the web app
(outputs=seg): each SEG holds exactly the predicted mask, references its source, and bad inputs
are refused before anything is predicted."""

from __future__ import annotations

import base64
import csv
import io
import shutil

import cv2
import numpy as np
import pydicom
import pytest
from test_predict import DEMO, _real_setup, predict

from pneumoseg.data.rle import rle_decode
from pneumoseg.inference.dicom_seg import read_seg_mask, replaced_uids

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _rows(text: str) -> dict[str, str]:
    lines = [x for x in text.strip().splitlines() if x]
    return {r[0]: r[1] for r in csv.reader(lines[1:])}


def _stage2(real_dir, n=2):
    return sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[:n]


def test_image_segs_hold_the_predicted_mask(tmp_path, real_dir, capsys):
    _, _, over = _real_setup(tmp_path, real_dir)
    dcms = _stage2(real_dir)
    png = tmp_path / "xray.png"
    cv2.imwrite(str(png), pydicom.dcmread(dcms[0]).pixel_array)
    segs = tmp_path / "segs"
    argv = ["--config", DEMO, *[a for d in dcms for a in ("--image", str(d))], "--image",
            str(png), "--dicom-seg", str(segs), *over]  # fmt: skip
    assert predict.main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {d.stem for d in dcms} | {"xray"}  # the PNG's row is still written
    assert sorted(p.name for p in segs.iterdir() if not p.name.startswith(".")) == sorted(
        f"{d.stem}.seg.dcm" for d in dcms
    )  # no SEG for the PNG
    for d in dcms:
        seg = segs / f"{d.stem}.seg.dcm"
        want = rle_decode(rows[d.stem], (1024, 1024)) > 0
        assert np.array_equal(read_seg_mask(seg), want)
        ds = pydicom.dcmread(seg)
        assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
        # the stage-2 id is no UID: the SEG references a derived one and keeps the original
        assert replaced_uids(ds)["SOPInstanceUID"].original == d.stem
        assert ds.PatientSex == pydicom.dcmread(d).PatientSex

    # again: refused before anything is predicted, every SEG untouched
    before = {p: p.read_bytes() for p in segs.glob("*.seg.dcm")}
    code, out = run_cli("predict", *argv)
    assert code == 2 and "2 SEG(s) exist in" in out and "--force" in out
    assert "Traceback" not in out and "ImageId,EncodedPixels" not in out
    assert {p: p.read_bytes() for p in segs.glob("*.seg.dcm")} == before
    # --force replaces them (the same masks: the same pixels)
    assert predict.main([*argv, "--force"]) == 0
    for d in dcms:
        assert np.array_equal(read_seg_mask(segs / f"{d.stem}.seg.dcm"),
                              read_seg_mask_bytes(before[segs / f"{d.stem}.seg.dcm"]))  # fmt: skip


def read_seg_mask_bytes(data: bytes) -> np.ndarray:
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    return seg.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, ..., 0] > 0


def test_fractional_and_skip_empty(tmp_path, real_dir, capsys, monkeypatch):
    _, _, over = _real_setup(tmp_path, real_dir)
    dcm = _stage2(real_dir, 1)[0]
    frac = tmp_path / "frac"
    argv = ["--config", DEMO, "--image", str(dcm), *over]
    assert predict.main([*argv, "--dicom-seg", str(frac), "--seg-fractional"]) == 0
    ds = pydicom.dcmread(frac / f"{dcm.stem}.seg.dcm")
    assert ds.SegmentationType == "FRACTIONAL" and ds.MaximumFractionalValue == 255
    capsys.readouterr()
    # an empty prediction (post-processing that keeps nothing): an empty segment by default,
    # no SEG with --seg-skip-empty
    from pneumoseg.inference.predictor import Predictor

    real_finish = Predictor.finish

    def nothing(self, prob, cls_prob, params=None):
        mask, _ = real_finish(self, prob, cls_prob, params)
        return np.zeros_like(mask), "-1"

    monkeypatch.setattr(Predictor, "finish", nothing)
    empty, skip = tmp_path / "empty", tmp_path / "skip"
    assert predict.main([*argv, "--dicom-seg", str(empty)]) == 0
    assert not read_seg_mask(empty / f"{dcm.stem}.seg.dcm").any()
    assert predict.main([*argv, "--dicom-seg", str(skip), "--seg-skip-empty"]) == 0
    assert not list(skip.glob("*.seg.dcm"))


def test_seg_flags_probed(tmp_path, real_dir, capsys):
    _, _, over = _real_setup(tmp_path, real_dir)
    dcm = _stage2(real_dir, 1)[0]
    base = ["--config", DEMO, "--image", str(dcm), *over]
    with pytest.raises(SystemExit) as stop:  # argparse: usage and the message, exit 2
        predict.main([*base, "--seg-fractional"])
    assert stop.value.code == 2 and "go with --dicom-seg DIR" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, out = run_cli("predict", *base, "--dicom-seg", str(afile))
    assert code == 2 and "is a file: pass a folder" in out and afile.read_text() == "x"
    twin = tmp_path / "other"
    twin.mkdir()
    shutil.copy(dcm, twin / dcm.name)  # two inputs, one SEG name
    code, out = run_cli("predict", *base, "--image", str(twin / dcm.name), "--dicom-seg",
                        str(tmp_path / "segs"))  # fmt: skip
    assert code == 2 and "share a SEG name" in out and not (tmp_path / "segs").exists()
    # a DICOM a SEG cannot reference (no SOPInstanceUID): its row is written, its SEG refused
    ds = pydicom.dcmread(dcm)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    code, out = run_cli("predict", "--config", DEMO, "--image", str(dcm), "--image",
                        str(tmp_path / "nouid.dcm"), "--dicom-seg", str(tmp_path / "s2"), *over)  # fmt: skip
    assert code == 1 and "nouid.dcm: the DICOM has no SOPInstanceUID" in out
    assert "Traceback" not in out and (tmp_path / "s2" / f"{dcm.stem}.seg.dcm").is_file()
    assert "nouid," in out  # its row was predicted


def test_submission_writes_one_seg_per_test_dicom(tmp_path, real_dir):
    ids, sample, over = _real_setup(tmp_path, real_dir)
    segs = tmp_path / "segs"
    argv = ["--config", DEMO, "--submission", "--sample", str(sample), "--quiet",
            "--dicom-seg", str(segs), *over]  # fmt: skip
    assert predict.main(argv) == 0
    sub = tmp_path / "subs" / "realtest.csv"
    with open(sub, newline="") as fh:
        rows = dict(list(csv.reader(fh))[1:])
    assert sorted(p.name for p in segs.glob("*.seg.dcm")) == sorted(f"{i}.seg.dcm" for i in ids)
    for i in ids[:5]:
        want = rle_decode(rows[i], (1024, 1024)) > 0
        assert np.array_equal(read_seg_mask(segs / f"{i}.seg.dcm"), want), i
    # --force replaces the submission and the SEGs; without it, refused: nothing touched
    code, out = run_cli("predict", *argv, "--force")
    assert code == 0, out
    before = sub.read_bytes()
    segs_before = {p: p.read_bytes() for p in segs.glob("*.seg.dcm")}
    code, out = run_cli("predict", *argv)
    assert code == 2 and "exists" in out and sub.read_bytes() == before
    assert {p: p.read_bytes() for p in segs.glob("*.seg.dcm")} == segs_before


def test_app_seg_download(tmp_path, real_dir):
    """``outputs=seg``: a DICOM upload's SEG (base64) holds the response's mask; a PNG gets a
    note and its other outputs."""
    from fastapi.testclient import TestClient

    from pneumoseg.config import load_config
    from pneumoseg.serve import create_app

    _, _, over = _real_setup(tmp_path, real_dir)
    cfg = load_config(DEMO, over)
    client = TestClient(create_app(cfg))
    dcm = _stage2(real_dir, 1)[0]
    png = cv2.imencode(".png", pydicom.dcmread(dcm).pixel_array)[1].tobytes()
    files = [("files", ("a.dcm", dcm.read_bytes(), "application/dicom")),
             ("files", ("b.png", png, "image/png"))]  # fmt: skip
    r = client.post("/api/predict?outputs=seg,mask", files=files)
    assert r.status_code == 200, r.text
    a, b = r.json()["results"]
    seg = pydicom.dcmread(io.BytesIO(base64.b64decode(a["seg_dcm"])))
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(a["mask_png"]), np.uint8), 0) > 0
    assert seg.Modality == "SEG" and np.array_equal(
        read_seg_mask_bytes(base64.b64decode(a["seg_dcm"])), mask
    )
    assert "seg_dcm" not in b and "PNG input" in b["seg_note"] and b["mask_png"]
    assert a["intake"]["window"] == "as-stored" and a["intake"]["kind"] == "dicom"
    # a DICOM that a SEG cannot reference: the fixed note, the prediction still answered
    ds = pydicom.dcmread(dcm)
    del ds.SOPInstanceUID
    ds.PatientName = "Planted^Secret"
    buf = io.BytesIO()
    ds.save_as(buf)
    r = client.post("/api/predict?outputs=seg", files=[("files", ("c.dcm", buf.getvalue()))])
    (c,) = r.json()["results"]
    assert r.status_code == 200 and "rle" in c and c["seg_note"].startswith("no DICOM SEG: this")
    assert "Planted" not in r.text and "seg_dcm" not in c
    # the schema documents it
    schema = client.get("/openapi.json").json()["components"]["schemas"]["FileResult"]
    assert {"seg_dcm", "seg_note", "intake"} <= set(schema["properties"])


@pytest.mark.parametrize(
    "experiments,ensemble,recorded",
    [
        ([], None, "sel"),  # the experiment alone
        ([["a", 0.25], ["b", 0.75]], None, "a:0.25+b:0.75"),  # predict.experiments
        ([], [["a", 0.2], ["b", 0.8]], "a:0.2+b:0.8"),  # the selection's ensemble.yaml
        ([["a", 1]], [["a", 0.2], ["b", 0.8]], "a:1"),  # predict.experiments wins
    ],
)  # fmt: skip
def test_seg_records_the_blend_every_stage_predicts(tmp_path, experiments, ensemble, recorded):
    """The SEG's algorithm names the models predicted by the one blend rule
    (config.blend_members), a selected blend included."""
    import yaml

    from pneumoseg.config import load_config
    from pneumoseg.inference.seg_outputs import algorithm_of

    cfg = load_config(DEMO, ["exp=sel", f"train.out_dir={tmp_path}",
                             f"predict.experiments={experiments}"])  # fmt: skip
    if ensemble is not None:
        (tmp_path / "sel").mkdir()
        (tmp_path / "sel" / "ensemble.yaml").write_text(yaml.safe_dump({"members": ensemble}))
    assert algorithm_of(cfg, {"method": "threshold", "threshold": 0.4}).experiment == recorded
