import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoseg.cli import run
from pneumoseg.data import folds_file
from pneumoseg.data.folds import (
    TRAIN_ONLY,
    UNKNOWN_AREA_BIN,
    FoldsError,
    area_bin,
    fold_report,
    folds_csv,
    import_folds,
    load_patient_map,
    make_folds,
    patients_split,
    read_folds,
    write_folds,
)

from conftest import run_script

REPO = Path(__file__).resolve().parents[1]


def fake_manifest(seed=0, n_patients=250, n_images=600, pos_rate=0.22):
    """600 images of 250 patients with 1-5 images each, ~22% positive, log-normal areas."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_patients)
    while sizes.sum() < n_images:  # make sure there are enough images
        sizes[rng.integers(n_patients)] += 1
    pats = np.repeat(np.arange(n_patients), sizes)[:n_images]
    rng.shuffle(pats)
    has = rng.random(n_images) < pos_rate
    area = np.where(has, rng.lognormal(8.5, 1.2, n_images).astype(int) + 1, 0)
    return pd.DataFrame(
        {
            "id": [f"1.2.3.{i}" for i in rng.permutation(n_images)],
            "has_mask": has,
            "mask_area": area,
            "n_instances": has.astype(int),
            "patient_id": [f"{p:08d}" for p in pats],
        }
    )


def partition(folds):
    """Folds as a set of frozensets of ids (independent of fold numbering)."""
    return {frozenset(g["id"]) for _, g in folds.groupby("fold")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_balanced_grouped_complete(seed):
    m = fake_manifest(seed)
    folds = make_folds(m, n_folds=5, seed=42)
    assert list(folds.columns) == ["id", "fold", "has_mask", "area_bin", "patient"]
    # every id exactly once
    assert sorted(folds["id"]) == sorted(m["id"])
    assert folds["id"].is_unique
    assert set(folds["fold"]) == set(range(5))
    # no patient in two folds
    assert folds.groupby("patient")["fold"].nunique().max() == 1
    assert patients_split(folds).patients == 0
    # positive rate per fold within 2 points of the total
    total = m["has_mask"].mean()
    rates = folds.groupby("fold")["has_mask"].mean()
    assert (rates - total).abs().max() <= 0.02, rates
    # fold sizes reasonable
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 0.1 * len(m)
    # labels carried over
    merged = folds.merge(m, on="id")
    assert (merged["has_mask_x"] == merged["has_mask_y"].astype(int)).all()
    assert (merged["patient"] == merged["patient_id"]).all()


def test_folds_deterministic_and_seeded():
    m = fake_manifest(3)
    a = make_folds(m, seed=7)
    b = make_folds(m.sample(frac=1.0, random_state=1), seed=7)  # row order does not matter
    pd.testing.assert_frame_equal(a, b)
    c = make_folds(m, seed=8)
    assert partition(a) != partition(c)


def test_area_bins():
    has = [0, 1, 1, 1, 1, 1, 1]
    area = [0, 0, 1, 1999, 2000, 30000, np.nan]
    assert area_bin(has, area, [0, 1, 2000, 8000, 25000]).tolist() == [0, 1, 1, 1, 2, 4, -1]
    assert area_bin([1, 0], None).tolist() == [UNKNOWN_AREA_BIN, 0]
    with pytest.raises(FoldsError):
        area_bin([1], [5], [0, 0])


def test_folds_without_area_or_patient():
    m = fake_manifest(4)[["id", "has_mask"]]
    folds = make_folds(m, n_folds=4, seed=0)
    assert set(folds["area_bin"]) <= {0, UNKNOWN_AREA_BIN}
    assert folds["patient"].nunique() == len(m)  # each image is its own patient
    rates = folds.groupby("fold")["has_mask"].mean()
    assert (rates - m["has_mask"].mean()).abs().max() <= 0.02


def test_too_few_patients():
    m = pd.DataFrame(
        {"id": list("abcdef"), "has_mask": [1, 0, 0, 1, 0, 0], "patient_id": list("xxyyzz")}
    )
    with pytest.raises(FoldsError, match="only 3 patients for 5 folds"):
        make_folds(m, n_folds=5)
    assert make_folds(m, n_folds=3)["fold"].nunique() == 3
    with pytest.raises(FoldsError, match="n_folds"):
        make_folds(m, n_folds=1)
    with pytest.raises(FoldsError, match="duplicate"):
        make_folds(pd.concat([m, m]), n_folds=2)
    with pytest.raises(FoldsError, match="lacks column"):
        make_folds(m.drop(columns="has_mask"))


def test_report_and_leakage():
    folds = pd.DataFrame(
        {
            "id": list("abcdef"),
            "fold": [0, 0, 1, 1, 2, 2],
            "has_mask": [1, 0, 1, 1, 0, 0],
            "area_bin": [1, 0, 2, 3, 0, 0],
            "patient": ["p", "q", "p", "r", "s", "s"],
            "mask_area": [100, 0, 300, 500, 0, 0],
        }
    )
    rep = fold_report(folds)
    assert rep.loc[0, "n_images"] == 2 and rep.loc[1, "positives"] == 2
    assert rep.loc[1, "pos_rate"] == 1.0 and rep.loc[1, "mean_area"] == 400
    assert rep.loc["all", "n_patients"] == 4 and rep.loc["all", "mean_area"] == 300
    leak = patients_split(folds)
    assert (leak.patients, leak.images) == (1, 2)
    # an explicit map overrides the folds' own column
    leak = patients_split(folds, {"a": "x", "b": "x", "c": "y", "d": "y", "e": "y"})
    assert (leak.patients, leak.images, leak.unmapped) == (1, 3, 1)  # y: folds 1 and 2


def test_write_read_roundtrip(tmp_path):
    folds = make_folds(fake_manifest(5))
    path = write_folds(folds, tmp_path / "f" / "folds.csv")
    back = read_folds(path)
    pd.testing.assert_frame_equal(
        back.sort_values("id").reset_index(drop=True),
        folds.sort_values("id").reset_index(drop=True),
    )
    assert folds_csv(back) == path.read_text()
    # patient ids with leading zeros stay strings
    assert back["patient"].str.len().eq(8).all()


def test_import_checks_manifest(tmp_path):
    m = fake_manifest(6, n_images=100, n_patients=40)
    rows = pd.DataFrame(
        {
            "fname": [f"{i}.png" for i in m["id"][:90]] + ["9.9.9.png"],
            "fold": [i % 5 for i in range(90)] + ["stage_2"],
            "exist_labels": [*(~m["has_mask"][:90]).astype(int), 0],  # all labels wrong
        }
    )
    path = tmp_path / "foreign.csv"
    rows.to_csv(path, index=False)
    with pytest.raises(FoldsError, match="10 manifest ids are in no fold"):
        import_folds(path, manifest=m)
    folds = import_folds(path, manifest=m, allow_missing=True)
    rep = folds.attrs["import"]
    assert rep["extra"] == ["9.9.9"] and len(rep["missing"]) == 10
    assert rep["label_mismatch"] == 90
    assert len(folds) == 90 and not folds["id"].str.endswith(".png").any()
    # the manifest's labels, areas and patients win
    merged = folds.merge(m, on="id")
    assert (merged["has_mask_x"] == merged["has_mask_y"].astype(int)).all()
    assert (merged["patient"] == merged["patient_id"]).all()
    assert (merged["area_bin"] > 0).eq(merged["has_mask_y"]).all()
    # without a manifest: the file's labels, unknown areas, train-only group
    alone = import_folds(path)
    assert len(alone) == 91 and (alone["fold"] == TRAIN_ONLY).sum() == 1
    assert set(alone.loc[alone["has_mask"] == 1, "area_bin"]) == {UNKNOWN_AREA_BIN}


def test_import_rejects_bad_files(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("name,split\na,0\n")
    with pytest.raises(FoldsError, match="id column"):
        import_folds(p)
    p.write_text("id,fold\na,0\na,1\n")
    with pytest.raises(FoldsError, match="more than once"):
        import_folds(p)
    p.write_text("id,fold\na,0.5\n")
    with pytest.raises(FoldsError, match="integers"):
        import_folds(p)
    with pytest.raises(FoldsError, match="not found"):
        import_folds(tmp_path / "nope.csv")


# ---------------------------------------------------------------- real SIIM metadata
def test_first_place_folds_leak_patients(real_dir):
    meta = real_dir / "metadata"
    folds = import_folds(meta / "2nd_stage_folds.csv", patient_map=meta / "nih_id.csv")
    assert len(folds) == 12047 and folds["has_mask"].sum() == 2669
    assert (folds["fold"] == TRAIN_ONLY).sum() == 1372  # the 'stage_2' rows
    leak = patients_split(folds)
    assert (leak.patients, leak.images, leak.unmapped) == (1792, 7496, 0)
    # same numbers straight from the map path
    leak2 = patients_split(folds, meta / "nih_id.csv")
    assert (leak2.patients, leak2.images) == (1792, 7496)


def test_our_folds_on_real_ids(real_dir):
    meta = real_dir / "metadata"
    first = pd.read_csv(meta / "2nd_stage_folds.csv", dtype=str)
    pmap = load_patient_map(meta / "nih_id.csv")
    assert pmap.nunique() == 6171
    ids = first["fname"].str.removesuffix(".png")
    m = pd.DataFrame(
        {
            "id": ids,
            "has_mask": first["exist_labels"].astype(int).astype(bool),
            "mask_area": np.nan,  # unknown here: stratify on mask presence only
            "patient_id": ids.map(pmap),
        }
    )
    folds = make_folds(m, n_folds=5, seed=42)
    assert len(folds) == 12047 and folds["id"].is_unique
    leak = patients_split(folds, pmap)
    assert (leak.patients, leak.images) == (0, 0)
    rates = fold_report(folds)["pos_rate"]
    assert (rates.drop("all") - rates["all"]).abs().max() <= 0.02


# ---------------------------------------------------------------- CLI
def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "src" / "make_folds.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_import(tmp_path):
    src = tmp_path / "foreign.csv"
    src.write_text("fname,fold,exist_labels\na.png,0,1\nb.png,1,0\nc.png,stage_2,0\n")
    out = tmp_path / "folds" / "folds.csv"
    common = [f"folds.import_from={src}", f"folds.file={out}", f"data.root={tmp_path / 'none'}"]
    r = run_cli(*common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "per-fold table" in r.stderr and "patients split across folds: 0" in r.stderr
    df = read_folds(out)
    assert df["id"].tolist() == ["a", "b", "c"] and df["fold"].tolist() == [0, 1, TRAIN_ONLY]
    # same content: no-op
    r = run_cli(*common, cwd=tmp_path)
    assert r.returncode == 0 and "already up to date" in r.stderr
    # different content: refused without --force
    src.write_text("fname,fold,exist_labels\na.png,1,1\nb.png,0,0\nc.png,0,0\n")
    before = out.read_text()
    r = run_cli(*common, cwd=tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr
    assert out.read_text() == before
    r = run_cli(*common, "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_folds(out)["fold"].tolist() == [1, 0, 0]
    # bad override: clean error
    r = run_cli("folds.nope=1", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key" in r.stderr


def test_cli_import_real_leakage(real_dir, tmp_path):
    meta = real_dir / "metadata"
    out = tmp_path / "folds.csv"
    r = run_cli(
        f"folds.import_from={meta / '2nd_stage_folds.csv'}",
        f"folds.file={out}",
        f"data.root={tmp_path / 'none'}",
        f"data.patient_map={meta / 'nih_id.csv'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "1792 patients (7496 images) in more than one fold" in r.stderr
    assert "5 folds, 1372 train-only" in r.stderr


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_folds_cli", REPO / "src" / "make_folds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_make(tmp_path, monkeypatch, caplog):
    cli = _load_cli()
    m = fake_manifest(7)
    monkeypatch.setattr(folds_file, "_build_manifest", lambda dcfg: m)
    out = tmp_path / "folds.csv"
    caplog.set_level("INFO")
    assert cli.main([f"folds.file={out}", "folds.n_folds=4", "folds.seed=3"]) == 0
    folds = read_folds(out)
    assert sorted(folds["id"]) == sorted(m["id"]) and folds["fold"].nunique() == 4
    assert "per-fold table" in caplog.text and "mean_area" in caplog.text
    assert "0 patients (0 images) in more than one fold" in caplog.text
    first = out.read_text()
    assert cli.main([f"folds.file={out}", "folds.n_folds=4", "folds.seed=3"]) == 0
    assert out.read_text() == first  # deterministic: identical rerun is a no-op
    assert run(cli.main, [f"folds.file={out}", "folds.n_folds=4", "folds.seed=4"]) == 2
    assert out.read_text() == first
    assert "--force" in caplog.text
    # too few patients -> clean error
    tiny = m.head(3)
    monkeypatch.setattr(folds_file, "_build_manifest", lambda dcfg: tiny)
    assert run(cli.main, [f"folds.file={tmp_path / 'x.csv'}"]) == 2
    assert "patients for 5 folds" in caplog.text


def test_make_folds_from_config(tmp_path, monkeypatch):
    """The library call behind the script: what it made and what it did with the file."""
    from pneumoseg.config import load_config
    from pneumoseg.errors import OutputExistsError

    m = fake_manifest(7)
    monkeypatch.setattr(folds_file, "_build_manifest", lambda dcfg: m)
    out = tmp_path / "folds.csv"
    cfg = load_config(None, [f"folds.file={out}", "folds.n_folds=4", "folds.seed=3"])
    made = folds_file.make_folds(cfg)
    assert (made.path, made.written, made.replaced, made.imported) == (out, True, False, False)
    assert made.n_cv == 4 and made.n_train_only == 0 and made.leakage.patients == 0
    assert list(made.report.index) == [0, 1, 2, 3, "all"] and "mean_area" in made.report_text()
    assert read_folds(out)["id"].tolist() == sorted(m["id"]) == sorted(made.folds["id"])
    again = folds_file.make_folds(cfg)  # identical: left alone
    assert (again.written, again.replaced) == (False, False)
    other = load_config(None, [f"folds.file={out}", "folds.n_folds=4", "folds.seed=4"])
    first = out.read_text()
    with pytest.raises(OutputExistsError, match="--force"):
        folds_file.make_folds(other)
    assert out.read_text() == first
    forced = folds_file.make_folds(other, force=True)
    assert (forced.written, forced.replaced) == (True, True) and out.read_text() != first
    src = tmp_path / "foreign.csv"
    src.write_text("fname,fold,exist_labels\na.png,0,1\nb.png,1,0\nc.png,stage_2,0\n")
    over = [f"folds.import_from={src}", f"folds.file={tmp_path / 'imported.csv'}",
            f"data.root={tmp_path / 'none'}"]  # fmt: skip
    imported = folds_file.make_folds(load_config(None, over))
    assert imported.imported and imported.written and imported.n_train_only == 1


def test_cli_on_synthetic_set(tmp_path):
    """End to end through the real manifest builder, grouped by the synthetic NIH patient map."""
    data = tmp_path / "syn"
    run_script(
        "make_synthetic",
        "--out",
        str(data),
        "--n-train",
        "80",
        "--n-test",
        "2",
        "--size",
        "64",
        "--seed",
        "1",
    )
    out = tmp_path / "folds.csv"
    common = [
        f"data.root={data}",
        "data.original_size=64",
        "data.patient_map=nih_id.csv",
        f"folds.file={out}",
        "folds.n_folds=4",
    ]
    r = run_cli(*common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "patients split across folds: 0 patients" in r.stderr
    folds = read_folds(out)
    assert len(folds) == 80 and set(folds["fold"]) == {0, 1, 2, 3}
    pmap = load_patient_map(data / "nih_id.csv")
    assert patients_split(folds, pmap).patients == 0
    assert folds["patient"].nunique() < 80  # grouped by the map, not one patient per image
    r = run_cli(*common, cwd=tmp_path)
    assert r.returncode == 0 and "already up to date" in r.stderr
