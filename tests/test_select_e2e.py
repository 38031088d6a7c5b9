"""select_ensemble.py end to end on the tiny synthetic world: two trained experiments -> the
selection (ensemble.yaml + its tuning) -> predict.py with the selection config -> a submission
that validates; and the selection's refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pneumoseg.config import blend_members, load_config
from pneumoseg.inference.submission import validate_submission

from conftest import REPO, load_script, run_cli, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
GRIDS = ["tune.thresholds=[0.3, 0.5]", "tune.min_areas=[0, 4096]", "tune.top_thresholds=[0.6]",
         "tune.top_areas=[0]", "tune.bottom_thresholds=[0.3]"]  # fmt: skip


@pytest.fixture(scope="module")
def two_experiments(tiny_data):
    """Experiments sel_a and sel_b (other seeds), each trained on folds 0 and 1 (one step)."""
    for exp, seed in (("sel_a", 1), ("sel_b", 2)):
        for fold in ("0", "1"):
            code, out = run_cli("train", "--config", DEMO, "--fold", fold, "--quiet",
                                *tiny_overrides(tiny_data), f"exp={exp}", f"seed={seed}",
                                "train.epochs=1", "train.max_steps_per_epoch=1")  # fmt: skip
            assert code == 0, out
    return tiny_data


def _over(root, exp="sel", *extra):
    return [*tiny_overrides(root), f"exp={exp}", "select.candidates=[sel_a, sel_b]", *GRIDS,
            f"predict.out_dir={root / 'subs'}", *extra]  # fmt: skip


def test_select_then_predict_the_selection(two_experiments):
    root = two_experiments
    code, out = run_cli("select_ensemble", "--config", DEMO, "--jobs", "1", *_over(root))
    assert code == 0, out
    exp_dir = root / "runs" / "sel"
    doc = yaml.safe_load((exp_dir / "ensemble.yaml").read_text())
    names = [m[0] for m in doc["members"]]
    assert set(names) <= {"sel_a", "sel_b"} and abs(sum(w for _, w in doc["members"]) - 1) < 1e-5
    best_single = max(c["cv_dice"] for c in doc["candidates"].values())
    assert doc["cv_dice"] >= best_single - 1e-9  # the selection starts from the best single one
    assert doc["cv_dice_nested"] is not None and len(doc["nested_folds"]) == 2
    assert "selected blend" in out and "alone" in out
    tuned = yaml.safe_load((exp_dir / "postprocess.yaml").read_text())
    assert [[e, round(w, 6)] for e, w in tuned["source"]["experiments"]] == doc["members"]
    cfg = load_config(DEMO, _over(root))
    assert [[e, round(w, 6)] for e, w in blend_members(cfg)] == doc["members"]
    # the blend's report: plots and page, and the selection's own (honest) nested CV beside the
    # tuning's, which keeps the chosen blend fixed
    report = exp_dir / "report"
    assert {p.name for p in report.iterdir()} >= {
        "report.html",
        "metrics.json",
        "roc.png",
        "pr.png",
        "reliability.png",
        "dice_by_size.png",
    }
    cv = json.loads((report / "metrics.json").read_text())["cv"]
    key = "nested CV Dice of the selection (chosen and tuned without the fold scored)"
    assert cv[key] == pytest.approx(doc["cv_dice_nested"], abs=1e-6)
    assert key in (report / "report.html").read_text()

    # predict.py with the selection config predicts the selected ensemble
    code, out = run_cli("predict", "--config", DEMO, "--submission", "--quiet", *_over(root),
                        "predict.folds=[0, 1]")  # fmt: skip
    assert code == 0, out
    assert "postprocess.yaml not found" not in out and "tuned for other models" not in out
    sub = root / "subs" / "sel.csv"
    sample = root / "data" / "stage_2_sample_submission.csv"
    assert validate_submission(sub, sample, (64, 64)) == []

    # again without --force: refused, nothing replaced
    before = (exp_dir / "ensemble.yaml").read_bytes()
    code, out = run_cli("select_ensemble", "--config", DEMO, *_over(root))
    assert code == 2 and "exists; pass --force" in out
    assert (exp_dir / "ensemble.yaml").read_bytes() == before
    code, out = run_cli("select_ensemble", "--config", DEMO, "--force", "--jobs", "1",
                        *_over(root), "select.nested=false")  # fmt: skip
    assert code == 0, out
    assert yaml.safe_load((exp_dir / "ensemble.yaml").read_text())["cv_dice_nested"] is None


def test_selection_refusals(two_experiments, tmp_path):
    root = two_experiments
    cases = [
        (["select.candidates=[]"], "select.candidates is empty"),
        (["predict.experiments=[[sel_a, 1]]"], "predict.experiments is set"),
        (["select.candidates=[sel_a, nothere]"], "no complete OOF predictions"),
    ]
    for extra, message in cases:
        code, out = run_cli("select_ensemble", "--config", DEMO, *_over(root, "sel_bad", *extra))
        assert code == 2 and message in out and "Traceback" not in out, out
    # a candidate trained with another OOF TTA cannot be blended: every difference named
    runs = root / "runs"
    shutil.copytree(runs / "sel_b", runs / "sel_c", dirs_exist_ok=True)
    for k in (0, 1):
        path = runs / "sel_c" / f"fold{k}" / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["oof"]["hflip"] = not cfg["oof"]["hflip"]
        path.write_text(yaml.safe_dump(cfg))
    code, out = run_cli("select_ensemble", "--config", DEMO,
                        *_over(root, "sel_bad", "select.candidates=[sel_a, sel_c]"))  # fmt: skip
    assert code == 2 and "cannot be blended" in out and "oof.hflip" in out, out
    assert not (runs / "sel_bad" / "ensemble.yaml").exists()
    # a damaged ensemble.yaml: prediction says what to do
    bad = runs / "sel_dmg"
    bad.mkdir()
    (bad / "ensemble.yaml").write_text("members: [[sel_a, x]]\n")
    code, out = run_cli("predict", "--config", DEMO, "--submission", *_over(root, "sel_dmg"))
    assert code == 2 and "damaged member list" in out, out


@pytest.mark.parametrize("script", ["select_ensemble", "oof_tune"])
@pytest.mark.parametrize(
    "value,message",
    [("0", "0 threads: give 1..1024"), ("-3", "-3 threads"), ("1025", "1025 threads"),
     ("two", "not a whole number: 'two'"), ("1.5", "not a whole number")],
)  # fmt: skip
def test_jobs_is_checked(script, value, message, capsys):
    """``--jobs`` 0 or negative silently meant "all cores" or "one thread": refused now, by the
    argument parser (usage and the reason, exit code 2) before any config is read."""
    with pytest.raises(SystemExit) as e:
        load_script(script).parse_args(["--config", DEMO, "--jobs", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --jobs: {message}" in err, err
