"""Inference (ensemble × TTA), submissions (write/validate/score) and the predict CLI, on CPU."""

import csv
import re
import sys

import cv2
import numpy as np
import pytest
import torch

from pneumoseg.data.dataset import normalize
from pneumoseg.data.rle import rle_encode
from pneumoseg.inference.ensemble import Member, load_models, predict_probs, resize_to_original
from pneumoseg.inference.submission import (
    HEADER,
    check_submission,
    score_submission,
    validate_submission,
    write_submission,
)
from pneumoseg.models.registry import build_model, split_output

from conftest import REPO, run_cli, run_script, tiny_overrides

sys.path.insert(0, str(REPO / "src"))
import predict
import validate_submission as validate_cli

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = {"arch": "unet", "encoder": "resnet18", "encoder_weights": None,
        "decoder_channels": [16, 8, 8, 8, 8]}  # fmt: skip


def _tiny(seed: int, **kw) -> Member:
    torch.manual_seed(seed)
    cfg = {**TINY, **kw}
    return Member(build_model(cfg).eval(), 1.0, cfg)


def _images(n=3, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


# ------------------------------------------------------------------------------------- inference
def test_ensemble_with_hflip_equals_hand_computed_mean():
    a = _tiny(0, in_channels=3)
    b = _tiny(1, in_channels=1, aux_head=True, aux_dropout=0.0)
    members = [a, Member(b.model, 3.0, b.cfg)]
    imgs = _images()
    probs, cls = predict_probs(members, imgs, ["hflip"])
    assert probs.shape == (3, 64, 64) and cls.shape == (3,)

    want, cls_want = 0, []
    with torch.no_grad():
        for m, w in ((a, 1.0), (b, 3.0)):
            x = normalize(imgs, m.cfg["in_channels"])
            p0, c0 = split_output(m.model(x))
            p1, c1 = split_output(m.model(x.flip(-1)))
            want = want + w * (torch.sigmoid(p0) + torch.sigmoid(p1).flip(-1)) / 2
            if c0 is not None:
                cls_want = (torch.sigmoid(c0) + torch.sigmoid(c1)) / 2
    want = (want / 4).squeeze(1)
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, cls_want.squeeze(1), rtol=1e-4, atol=1e-5)  # aux model only


def test_vflip_and_scale_views():
    m = _tiny(2)
    imgs = _images(2)
    probs, cls = predict_probs([m], imgs, ["hflip", "vflip"])
    assert cls is None
    with torch.no_grad():
        x = normalize(imgs, 3)
        views = [((), x), ((-1,), x.flip(-1)), ((-2,), x.flip(-2)), ((-2, -1), x.flip((-2, -1)))]
        want = sum(torch.sigmoid(m.model(v)).flip(d) if d else torch.sigmoid(m.model(v))
                   for d, v in views) / 4  # fmt: skip
    torch.testing.assert_close(probs, want.squeeze(1), rtol=1e-4, atol=1e-5)
    one_pass, _ = predict_probs([m], imgs, ["hflip", "vflip"], max_forward=0, channels_last=False)
    torch.testing.assert_close(one_pass, probs, rtol=1e-4, atol=1e-5)  # CPU chunks of 4 = one pass
    # a 0.875 view of a 64² image is 56², padded to 64: runs, stays in [0, 1], differs a little
    p2, _ = predict_probs([m], imgs, ["hflip", 0.875, 1.25])
    assert p2.shape == probs.shape and float(p2.min()) >= 0 and float(p2.max()) <= 1
    assert float((p2 - probs).abs().mean()) < 0.2
    with pytest.raises(ValueError, match="unknown view"):
        predict_probs([m], imgs, ["rot90"])


def test_resize_back_to_original_size():
    probs, _ = predict_probs([_tiny(3)], _images(3), [])
    out = resize_to_original(probs, [(1024, 1024), (300, 200), (1024, 1024)])
    assert [o.shape for o in out] == [(1024, 1024), (300, 200), (1024, 1024)]
    assert all(o.dtype == np.float32 and o.min() >= 0 and o.max() <= 1 for o in out)
    # bilinear: the mean is preserved closely
    assert abs(float(out[0].mean()) - float(probs[0].mean())) < 0.01


def _save_model(folder, seed=0, **kw):
    m = _tiny(seed, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": m.model.state_dict(), "config": {"model": m.cfg}}, folder / "model.pt"
    )
    return m


def test_load_models_folds_blend_and_errors(tmp_path):
    runs = tmp_path / "runs"
    _save_model(runs / "a" / "fold0", 0)
    _save_model(runs / "a" / "fold1", 1)
    _save_model(runs / "a" / "full", 2)
    _save_model(runs / "b" / "fold0", 3, in_channels=1)
    (runs / "c" / "fold0").mkdir(parents=True)
    (runs / "c" / "fold0" / "last.pt").write_bytes(b"")
    cfg = {
        "exp": "a",
        "train": {"out_dir": str(runs)},
        "predict": {"experiments": [], "folds": None},
        "folds": {"n_folds": 2},
    }
    ms = load_models(cfg)
    assert len(ms) == 3 and all(abs(m.weight - 1 / 3) < 1e-9 for m in ms)
    cfg["predict"] = {"experiments": [["a", 0.6], ["b", 0.4]], "folds": [0]}
    ms = load_models(cfg)
    assert [round(m.weight, 6) for m in ms] == [0.6, 0.4] and ms[1].cfg["in_channels"] == 1
    predict_probs(ms, _images(2), ["hflip"])  # 1- and 3-channel models together
    cfg["predict"] = {"experiments": [["c", 1]], "folds": None}
    with pytest.raises(FileNotFoundError, match=r"fold\(s\) \[0, 1\].*fold0 \(last.pt only"):
        load_models(cfg)
    cfg["predict"] = {"experiments": [["b", 1]], "folds": None}  # b has fold0 only
    with pytest.raises(
        FileNotFoundError, match=r"fold\(s\) \[1\] of folds.n_folds=2.*predict.folds"
    ):
        load_models(cfg)
    cfg["predict"] = {"experiments": [["nope", 1]], "folds": None}
    with pytest.raises(FileNotFoundError, match=r"experiments under .*: a, b, c"):
        load_models(cfg)


# ------------------------------------------------------------------------------------- submissions
def _write_sample(path, ids):
    with open(path, "w", newline="") as fh:
        fh.write("ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in ids))
    return path


def test_write_validate_and_score(tmp_path):
    ids = ["ID_a", "ID_b", "ID_c"]
    sample = _write_sample(tmp_path / "sample.csv", ids)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 5:9] = 1
    sub = write_submission({"ID_a": rle_encode(mask), "ID_b": "", "ID_c": "-1"}, tmp_path / "s.csv")
    assert sub.read_text().splitlines()[0] == ",".join(HEADER)
    assert validate_submission(sub, sample, (64, 64)) == []
    check_submission(sub, sample, (64, 64))
    with pytest.raises(ValueError, match="invalid RLE"):
        check_submission(sub, sample, (8, 8))  # the mask does not fit an 8x8 image
    truth = tmp_path / "truth.csv"
    truth.write_text(
        f"ImageId,EncodedPixels\nID_a,{rle_encode(mask[:, ::-1].copy())}\nID_b,-1\nID_c,-1\n"
    )
    s = score_submission(sub, truth, (64, 64))
    assert s["n"] == 3 and s["n_pos"] == 1 and 0 <= s["dice"] <= 1
    assert s["dice"] == pytest.approx(2 / 3) and s["pos_dice"] == 0.0
    assert validate_cli.main([str(sub), "--sample", str(sample), "--shape", "64"]) == 0
    assert validate_cli.main([str(sub), "--sample", str(sample)]) == 0  # fits 1024 too


def test_write_is_atomic_and_never_clobbers(tmp_path):
    path = tmp_path / "sub.csv"

    def rows():
        yield "ID_a", "-1"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_submission(rows(), path)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp left behind
    write_submission([("ID_a", "-1")], path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        write_submission([("ID_b", "-1")], path)
    with pytest.raises(RuntimeError):
        write_submission(rows(), path, force=True)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
    write_submission([("ID_b", "-1")], path, force=True)
    assert "ID_b" in path.read_text()


BAD = {
    "missing_id": ("ImageId,EncodedPixels\nID_a,-1\nID_b,-1\n", "sample submission missing: ID_c"),
    "duplicate_id": ("ImageId,EncodedPixels\nID_a,-1\nID_b,-1\nID_c,-1\nID_a,1 2\n", "duplicate ImageId"),
    "bad_rle": ("ImageId,EncodedPixels\nID_a,5 x\nID_b,-1\nID_c,-1\n", "invalid RLE.*non-integer"),
    "rle_past_end": ("ImageId,EncodedPixels\nID_a,4000 200\nID_b,-1\nID_c,-1\n", "past the end"),
    "odd_tokens": ("ImageId,EncodedPixels\nID_a,1 2 3\nID_b,-1\nID_c,-1\n", "odd number"),
    "wrong_header": ("ImageId, EncodedPixels\nID_a,-1\nID_b,-1\nID_c,-1\n", "wrong header"),
    "no_header": ("ID_a,-1\nID_b,-1\nID_c,-1\n", "wrong header"),
    "extra_id": ("ImageId,EncodedPixels\nID_a,-1\nID_b,-1\nID_c,-1\nID_z,-1\n", "not in the sample"),
    "empty_rle": ("ImageId,EncodedPixels\nID_a,\nID_b,-1\nID_c,-1\n", "write -1"),
    "three_columns": ("ImageId,EncodedPixels\nID_a,-1,x\nID_b,-1\nID_c,-1\n", "2 columns"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_validator_rejects(tmp_path, case, capsys):
    text, match = BAD[case]
    sample = _write_sample(tmp_path / "sample.csv", ["ID_a", "ID_b", "ID_c"])
    sub = tmp_path / "sub.csv"
    sub.write_text(text)
    problems = validate_submission(sub, sample, (64, 64))
    assert problems and any(re.search(match, p) for p in problems), problems
    with pytest.raises(ValueError, match="invalid submission"):
        check_submission(sub, sample, (64, 64))
    assert validate_cli.main([str(sub), "--sample", str(sample), "--shape", "64x64"]) == 1
    assert "INVALID" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- real DICOMs
def _real_setup(tmp_path, real_dir):
    """An untrained tiny model as runs/realtest/fold0 and a config over the 20 stage-2 DICOMs."""
    ids = sorted(p.stem for p in (real_dir / "stage2_test").glob("ID_*.dcm"))
    assert len(ids) == 20
    with open(real_dir / "stage2_test" / "stage_2_sample_submission.csv", newline="") as fh:
        keep = [r[0] for r in csv.reader(fh) if r and r[0] in set(ids)]
    sample = _write_sample(tmp_path / "sample20.csv", keep)
    _save_model(tmp_path / "runs" / "realtest" / "fold0", 0)
    over = [
        "exp=realtest",
        f"data.root={real_dir / 'stage2_test'}",
        "data.test_images=.",
        "data.test_rle_csv=null",
        "data.patient_map=null",
        "data.original_size=1024",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.size=64",
        "cache.n_jobs=2",
        f"train.out_dir={tmp_path / 'runs'}",
        "train.device=cpu",
        f"predict.out_dir={tmp_path / 'subs'}",
        "predict.batch_size=8",
        "predict.folds=[0]",
    ]
    return ids, sample, over


def test_predict_real_stage2_dicoms(tmp_path, real_dir, caplog):
    ids, sample, over = _real_setup(tmp_path, real_dir)
    argv = ["--config", DEMO, "--submission", "--sample", str(sample), "--quiet"]
    assert predict.main([*argv, *over]) == 0
    out = tmp_path / "subs" / "realtest.csv"
    assert validate_submission(out, sample, (1024, 1024)) == []
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(HEADER) and sorted(r[0] for r in rows[1:]) == ids
    # the full 3,205-id sample: 3,185 ids have no image -> an error, or -1 rows when allowed
    full = real_dir / "stage2_test" / "stage_2_sample_submission.csv"
    over2 = [*over, "exp=realtest_full", "predict.experiments=[[realtest, 1]]"]
    argv2 = ["--config", DEMO, "--submission", "--sample", str(full), "--quiet"]
    code, out = run_cli("predict", *argv2, *over2)
    assert code == 2 and "3185 of 3205 id(s)" in out
    assert predict.main([*argv2, "--allow-missing", *over2]) == 0
    assert validate_submission(tmp_path / "subs" / "realtest_full.csv", full) == []


def test_image_overlay_for_a_real_dicom(tmp_path, real_dir, capsys):
    _, _, over = _real_setup(tmp_path, real_dir)
    dcm = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]
    out = tmp_path / "overlays"
    argv = ["--config", DEMO, "--image", str(dcm), "--overlay", str(out)]
    assert predict.main([*argv, *over]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "ImageId,EncodedPixels" and lines[1].startswith(f"{dcm.stem},")
    png = out / f"{dcm.stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pic = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert pic.shape == (1024, 1024, 3)


def test_image_type_by_content_extensionless_and_multiframe(tmp_path, real_dir, capsys):
    """``--image`` reads by content: a hospital DICOM without an extension is predicted like its
    .dcm copy; a DICOM named .png too; a multi-frame file and a corrupt one are refused by name
    with the intake's message (no blame on a missing decoder that is installed)."""
    import os
    import shutil

    import pydicom

    _, _, over = _real_setup(tmp_path, real_dir)
    dcm = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]
    bare = shutil.copy(dcm, tmp_path / "IM000001")
    odd = shutil.copy(dcm, tmp_path / "xray.png")
    argv = ["--config", DEMO, "--image", str(dcm), "--image", str(bare), "--image", str(odd)]
    assert predict.main([*argv, *over]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [dcm.stem, "IM000001", "xray"]
    assert len({r.split(",", 1)[1] for r in rows}) == 1  # the same mask three times
    multi = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files",
                         "SC_rgb_rle_2frame.dcm")  # fmt: skip
    corrupt = tmp_path / "IM000002"
    data = bytearray(dcm.read_bytes())
    start = data.find(b"\xff\xd8\xff") + 2
    data[start : start + 40] = b"\x00" * 40  # the JPEG stream's first segments zeroed
    corrupt.write_bytes(bytes(data))
    code, out = run_cli("predict", "--config", DEMO, "--image", str(bare), "--image", multi,
                        "--image", str(corrupt), *over)  # fmt: skip
    assert code == 1, out
    assert "SC_rgb_rle_2frame.dcm: a multi-frame DICOM (2 frames)" in out
    line = next(x for x in out.splitlines() if "IM000002: cannot decode the pixel data" in x)
    assert "stream is corrupt or truncated" in line and "no decoder" not in line
    assert "2 of 3 image(s) could not be read" in out and "Traceback" not in out


# ------------------------------------------------------------------------------------- end to end
def test_submission_end_to_end_on_tiny_data(tiny_data, caplog):
    over = [*tiny_overrides(tiny_data), "exp=predict_e2e", f"predict.out_dir={tiny_data / 'subs'}",
            "predict.folds=[0]"]  # fmt: skip
    run_script("train", "--config", DEMO, "--fold", "0", "--quiet", *over)
    args = ["--config", DEMO, "--submission", "--quiet", *over]
    proc = run_script("predict", *args)
    assert "score against" in proc.stderr and "postprocess.yaml not found" in proc.stderr
    sub = tiny_data / "subs" / "predict_e2e.csv"
    data = tiny_data / "data"
    sample = data / "stage_2_sample_submission.csv"
    assert validate_submission(sub, sample, (64, 64)) == []
    s = score_submission(sub, data / "test-rle.csv", (64, 64))
    assert s["n"] == 6 and 0.0 <= s["dice"] <= 1.0
    before = sub.read_bytes()
    code, out = run_cli("predict", *args)  # exists: refused, untouched
    assert code == 2 and "exists; pass --force" in out and sub.read_bytes() == before
    # --force with a bad sample: refused before anything replaces the good file
    empty = tiny_data / "empty_sample.csv"
    empty.write_text("ImageId,EncodedPixels\n")
    code, out = run_cli("predict", *args, "--force", "--sample", str(empty))
    assert code == 2 and "lists no ImageId" in out and sub.read_bytes() == before
    # without fold 1 and without predict.folds: an error naming the missing fold
    code, out = run_cli("predict", *args, "--force", "predict.folds=null")
    assert code == 2 and "fold(s) [1]" in out and sub.read_bytes() == before
    assert run_cli("predict", *args, "--force", "predict.tta=[hflip, vflip]")[0] == 0
    assert validate_submission(sub, sample, (64, 64)) == []
