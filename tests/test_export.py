"""ONNX export (issue 18, part 1): parity per family on real X-rays, the export of a trained
experiment with its manifest, and every way an export can be refused or go stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoseg.config import load_config
from pneumoseg.errors import ModelFileError
from pneumoseg.inference import export as ex
from pneumoseg.models.families import family_for
from pneumoseg.models.registry import build_model
from pneumoseg.tuning.provenance import file_digest

from conftest import REPO, real_xrays, run_cli, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
EXP = "exp_onnx"

# one tiny model per family that builds without downloads (64 px inputs)
FAMILIES = {
    "smp unet": {"arch": "unet", "encoder": "resnet18", "encoder_weights": None,
                 "decoder_channels": [16, 8, 8, 8, 8]},
    "smp unet, aux head, 1 channel": {"arch": "unet", "encoder": "resnet18",
                                      "encoder_weights": None, "in_channels": 1,
                                      "decoder_channels": [16, 8, 8, 8, 8], "aux_head": True},
    "smp fpn": {"arch": "fpn", "encoder": "resnet18", "encoder_weights": None},
    "classic unet": {"arch": "unet_classic", "encoder": None, "encoder_weights": None, "depth": 3, "width": 4},
    "double unet": {"arch": "doubleunet", "encoder": None, "encoder_weights": None, "depth": 2},
}  # fmt: skip


def _model_cfg(overrides: dict) -> dict:
    cfg = load_config(None, [])["model"]
    return {**cfg, **overrides}


def _real_images(real_dir: Path, n: int, in_channels: int) -> torch.Tensor:
    from pneumoseg.data.dataset import normalize

    return normalize(real_xrays(real_dir, n), in_channels)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_with_parity_on_real_xrays(name, real_dir, tmp_path):
    """Each exportable family's probability head matches torch fp32 (max |Δp| <= 1e-4) on real
    SIIM X-rays, also at a batch size and image size it was not exported with."""
    torch.manual_seed(0)
    mcfg = _model_cfg(FAMILIES[name])
    fam = family_for(mcfg)
    model = build_model(mcfg).eval()
    member = type("M", (), {"model": model, "path": tmp_path / "fold0" / "model.pt"})
    member.path.parent.mkdir()
    torch.save(model.state_dict(), member.path)
    x = _real_images(real_dir, 2, int(mcfg.get("in_channels", 3)))
    row = ex._export_member(fam, member, x, tmp_path / "m.onnx", "fold0.onnx")
    assert row["max_abs_dp"] <= ex.PARITY_TOL
    assert row["outputs"] == (["probs", "cls"] if mcfg.get("aux_head") else ["probs"])
    # dynamic batch and size: 3 images at 96 px
    x3 = torch.nn.functional.interpolate(
        torch.cat([x, x[:1].flip(-1)]), size=(96, 96), mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        ref = ex._ProbsNet(fam, model)(x3)
    refs = ref if isinstance(ref, tuple) else (ref,)
    got = ex.run_onnx(tmp_path / "m.onnx", x3.numpy())
    assert [g.shape for g in got] == [tuple(r.shape) for r in refs]
    assert max(float(np.abs(r.numpy() - g).max()) for r, g in zip(refs, got, strict=True)) <= 1e-4


# --------------------------------------------------------------------------------------------------
# a trained tiny experiment, exported through the command line
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_data) -> Path:
    over = [*tiny_overrides(tiny_data), f"exp={EXP}", "train.epochs=1", "train.top_k=1"]
    for fold in ("0", "1"):
        code, out = run_cli("train", "--config", DEMO, "--fold", fold, "--quiet", *over)
        assert code == 0, out
    return tiny_data


def _over(root: Path, *extra: str) -> list[str]:
    # fp32 only (export.int8=[]): NNCF's accuracy control takes minutes per export, and int8 is
    # tested by the first test here and in test_backends.py
    return [*tiny_overrides(root), f"exp={EXP}", "export.int8=[]", *extra]


def _fresh_export(root: Path, *extra: str) -> Path:
    code, out = run_cli("export", "--config", DEMO, "--force", *_over(root, *extra))
    assert code == 0, out
    return root / "runs" / EXP / "export"


def test_export_writes_checked_models_and_a_manifest(trained):
    folder = _fresh_export(trained, "export.int8=[onnxruntime,openvino]")  # the default
    manifest = ex.check_export(folder)
    int8 = [name for record in manifest["int8"].values() if record["passed"]
            for row in record["folds"] for name in row["digests"]]  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["fold0.onnx", "fold1.onnx", MANIFEST, *int8]
    )
    assert set(manifest["int8"]) == {"onnxruntime", "openvino"}
    assert manifest["exp"] == EXP and manifest["family"] == "smp" and manifest["opset"] >= 17
    assert manifest["input"]["channels"] == 3 and manifest["input"]["size"] == 64
    assert manifest["tta"] == ["hflip"]
    for k, row in enumerate(manifest["folds"]):
        assert row["model"] == f"fold{k}/model.pt" and row["max_abs_dp"] <= 1e-4
        assert row["model_digest"] == file_digest(trained / "runs" / EXP / f"fold{k}" / "model.pt")
    # the exported graph on the experiment's own cache: what torch's ensemble member gives
    cfg = load_config(DEMO, _over(trained))
    member = ex._members_of(cfg, EXP)[0]
    x = ex._check_images(cfg, 3)
    with torch.no_grad():
        ref = ex._ProbsNet(family_for(member.cfg), member.model)(x).numpy()
    got = ex.run_onnx(folder / "fold0.onnx", x.numpy())[0]
    assert np.abs(ref - got).max() <= 1e-4


MANIFEST = ex.MANIFEST


def test_existing_export_is_kept_without_force(trained):
    folder = _fresh_export(trained)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out = run_cli("export", "--config", DEMO, *_over(trained))
    assert code == 2 and "exists; pass --force" in out and "Traceback" not in out, out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_stale_export_is_refused(trained, tmp_path):
    folder = _fresh_export(trained)
    model = trained / "runs" / EXP / "fold1" / "model.pt"
    saved = tmp_path / "model.pt"
    shutil.copy2(model, saved)
    try:
        model.write_bytes(model.read_bytes() + b"retrained")
        with pytest.raises(ex.ExportError, match=r"fold1.onnx is stale: .*fold1/model.pt changed"):
            ex.check_export(folder)
    finally:
        shutil.copy2(saved, model)
    ex.check_export(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_onnx_is_refused(trained, damage):
    folder = _fresh_export(trained)
    onnx = folder / "fold0.onnx"
    if damage == "truncated":
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 3])
    elif damage == "garbage":
        onnx.write_bytes(b"not an onnx model")
    else:
        onnx.unlink()
    with pytest.raises(ex.ExportError, match=r"fold0\.onnx is missing or changed"):
        ex.check_export(folder)
    if damage != "missing":  # loading it anyway is a clean error, not onnxruntime's traceback
        with pytest.raises(ModelFileError, match="ONNX Runtime cannot load it"):
            ex.run_onnx(onnx, np.zeros((1, 3, 64, 64), np.float32))


def test_manifest_of_another_experiment_is_refused(trained):
    """An export folder copied under another experiment points at that experiment's models."""
    folder = _fresh_export(trained)
    other = trained / "runs" / "exp_other"
    for k in (0, 1):
        (other / f"fold{k}").mkdir(parents=True, exist_ok=True)
        (other / f"fold{k}" / "model.pt").write_bytes(b"another training")
    shutil.copytree(folder, other / "export", dirs_exist_ok=True)
    with pytest.raises(ex.ExportError, match="is stale"):
        ex.check_export(other / "export")


@pytest.mark.parametrize("damage", ["not json", "no folds", "missing"])
def test_damaged_manifest_is_refused(trained, damage):
    folder = _fresh_export(trained)
    path = folder / MANIFEST
    if damage == "missing":
        path.unlink()
        match = "no manifest.json"
    else:
        path.write_text("{" if damage == "not json" else json.dumps({"exp": EXP}))
        match = "manifest.json is damaged"
    with pytest.raises(ex.ExportError, match=match):
        ex.check_export(folder)


def test_failed_parity_writes_nothing_and_keeps_the_old_export(trained, monkeypatch):
    folder = _fresh_export(trained)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(ex, "PARITY_TOL", -1.0)  # any difference is too large
    code, out = run_cli("export", "--config", DEMO, "--force", *_over(trained))
    assert code == 2 and "differs from torch by max |Δp|" in out and "not exported" in out, out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp left either


def test_export_target_that_is_a_file_is_refused(trained):
    target = trained / "runs" / "exp_file"
    (target / "fold0").mkdir(parents=True, exist_ok=True)
    (target / "export").write_text("mine")
    code, out = run_cli("export", "--config", DEMO, "--force",
                        *_over(trained), "exp=exp_file")  # fmt: skip
    assert code == 2 and "is a file" in out, out
    assert (target / "export").read_text() == "mine"


def test_a_family_that_cannot_be_exported_is_refused_by_name(trained, monkeypatch):
    """A family listed in NOT_EXPORTABLE (none today) is refused with its reason."""
    monkeypatch.setitem(ex.NOT_EXPORTABLE, "smp", "its graph needs an op no runtime has")
    cfg = load_config(DEMO, _over(trained))
    with pytest.raises(ex.ExportError, match="the smp family cannot be exported: its graph needs"):
        ex.export_experiments(cfg, force=True)
    assert not (trained / "runs" / EXP / "export" / "fold0.tmp.onnx").exists()


def test_missing_models_and_bad_keys_are_clean_errors(trained):
    code, out = run_cli("export", "--config", DEMO, *_over(trained), "exp=nothing_here")
    assert code == 2 and "no model.pt" in out and "Traceback" not in out, out
    code, out = run_cli("export", "--config", DEMO, *_over(trained), "predict.folds=[5]")
    assert code == 2 and "predict.folds" in out, out


def test_a_second_export_of_the_same_experiment_is_refused(trained):
    from pneumoseg.locks import exclusive, lock_file_for

    folder = trained / "runs" / EXP / "export"
    with exclusive(lock_file_for(folder), "a test"):  # another export holds it
        code, out = run_cli("export", "--config", DEMO, "--force", *_over(trained))
    assert code == 2 and "the export of exp_onnx" in out and "Traceback" not in out, out
