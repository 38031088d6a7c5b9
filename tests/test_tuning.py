"""The tuning phase as a library call: ``pneumoseg.tuning.tune(cfg)`` returns what it wrote."""

from __future__ import annotations

import pytest

from pneumoseg.config import load_config
from pneumoseg.errors import OutputExistsError
from pneumoseg.postprocessing.postprocess import load_params
from pneumoseg.tuning import TUNING_FILES, TuneResult, tune
from pneumoseg.tuning.report import describe

from conftest import REPO, run_cli, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
GRIDS = ["tune.thresholds=[0.3, 0.5]", "tune.min_areas=[0, 4096]", "tune.top_thresholds=[0.6, 0.8]",
         "tune.top_areas=[0, 2048]", "tune.bottom_thresholds=[0.3]"]  # fmt: skip


def test_tune_returns_what_it_wrote(tiny_data, capsys):
    over = [*tiny_overrides(tiny_data), "exp=tune_api"]
    for fold in ("0", "1"):
        code, out = run_cli("train", "--config", DEMO, "--fold", fold, "--quiet", *over,
                            "train.epochs=1", "train.max_steps_per_epoch=1")  # fmt: skip
        assert code == 0, out
    capsys.readouterr()
    cfg = load_config(DEMO, [*over, *GRIDS])
    result = tune(cfg, jobs=1)
    assert capsys.readouterr().out == ""  # the library logs, it does not print

    exp = tiny_data / "runs" / "tune_api"
    assert isinstance(result, TuneResult) and result.exp_dir == exp
    assert result.files == {name: exp / name for name in TUNING_FILES}
    assert all(p.is_file() for p in result.files.values())
    assert result.postprocess == exp / "postprocess.yaml"
    # the returned setting, report and grid are the files' contents
    assert load_params(result.postprocess) == result.params
    assert result.params["method"] == result.family.removesuffix("+gate")
    assert result.cv_dice == result.params["cv_dice"]
    assert result.cv_dice_std == result.params["cv_dice_std"]
    # the report folder: plots, metrics.json and one self-contained page, and its headline
    assert sorted(result.report) == ["dice_by_size", "html", "metrics", "pr", "reliability", "roc"]
    assert all(p.is_file() and p.parent == exp / "report" for p in result.report.values())
    html = result.report["html"].read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html
    assert result.headline.startswith("CV Dice ") and "AUROC" in result.headline
    # nested CV: each fold scored with a setting tuned on the other: never above the plain CV
    assert result.cv_dice_nested is not None and result.cv_dice_nested <= result.cv_dice + 1e-9
    assert "nested CV Dice" in html
    assert result.setting == describe(result.params)
    assert result.folds == result.params["folds"] == [0, 1]
    assert result.n_images == result.params["n_images"] == 32
    report = result.table.to_csv(index=False, float_format="%.6f")
    assert report == result.files["oof_report.csv"].read_text()
    grid = result.grid.to_csv(index=False, float_format="%.6f")
    assert grid == result.files["oof_grid.csv"].read_text()
    assert len(result.grid) == 2 * 2 + 2 * 2 * 1
    assert result.cv_dice == pytest.approx(result.grid["dice"].max(), abs=1e-6)
    pooled = result.table[(result.table["setting"] == f"best {result.family}")
                          & (result.table["fold"] == "all")]  # fmt: skip
    assert pooled["dice"].iloc[0] == pytest.approx(result.cv_dice, abs=1e-6)
    assert result.files["oof_grid.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # another setting over an existing tuning: refused (the old set kept) unless force
    before = {n: p.read_bytes() for n, p in result.files.items()}
    narrow = load_config(
        DEMO, [*over, *GRIDS, "tune.thresholds=[0.9]", "tune.top_thresholds=[0.95]"]
    )
    with pytest.raises(OutputExistsError, match="pass --force"):
        tune(narrow, jobs=1)
    assert {n: p.read_bytes() for n, p in result.files.items()} == before
    forced = tune(narrow, force=True, jobs=1)
    assert load_params(forced.postprocess) == forced.params != result.params
