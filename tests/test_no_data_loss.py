"""No command deletes or rewrites data it did not create (issue 14, item 1).

Every deleting path of the demo, the synthetic generator and the cache is run here against a
folder holding someone else's files (the real SIIM files where they are available): the command
refuses with exit 2 and a reason, and every byte stays. Where the command may delete (its own
marked outputs), files a user planted next to or inside them survive byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pneumoseg.config import load_config, save_config
from pneumoseg.data.cache import CACHE_MARKER, build_cache, cache_dir, remove_cache
from pneumoseg.data.synthetic import INFO, MARKER, read_marker, synthetic_ids, write_dataset
from pneumoseg.errors import CacheError, UserError

from conftest import REPO, TINY_DEMO, run_cli

TINY = TINY_DEMO  # (conftest)
N_TRAIN, N_TEST = 12, 3


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a folder, or a link's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {p.readlink()}"
        elif p.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def demo_config(tmp: Path, name: str = "demo", **sections) -> Path:
    """configs/demo.yaml made tiny, with every path the demo writes inside ``tmp``."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    paths = {
        "data": {"root": str(tmp / "data")},
        "cache": {"dir": str(tmp / "cache")},
        "folds": {"file": str(tmp / "folds" / "demo_folds.csv")},
        "train": {"out_dir": str(tmp / "runs")},
        "predict": {"out_dir": str(tmp / "submissions")},
    }
    for extra in (TINY, paths, sections):
        for key, values in extra.items():
            cfg.setdefault(key, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fake_kaggle(root: Path) -> None:
    """Files in the Kaggle layout that the synthetic generator did not write."""
    dcm = root / "dicom-images-train" / "1.2.3" / "1.2.4" / "1.2.5.dcm"
    dcm.parent.mkdir(parents=True)
    dcm.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)))
    (root / "dicom-images-test").mkdir()
    (root / "dicom-images-test" / "ID_0123456789.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n1.2.5, -1\n")
    (root / "nih_id.csv").write_text("Kaggle_ID,NIH_ID\n1.2.5,00000001_000.png\n")
    (root / "stage_2_sample_submission.csv").write_text("ImageId,EncodedPixels\nID_0123456789,-1\n")


def real_kaggle(root: Path, real_dir: Path) -> None:
    """Real SIIM files (../shared/data/siim-real) laid out as the Kaggle download."""
    for src in sorted((real_dir / "sample_images").glob("*.dcm"))[:4]:
        dest = root / "dicom-images-train" / "study" / "series" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (root / "dicom-images-test").mkdir()
    for src in sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[:2]:
        shutil.copy(src, root / "dicom-images-test" / src.name)
    shutil.copy(real_dir / "train_extract" / "train-rle-extract.csv", root / "train-rle.csv")
    lines = (real_dir / "metadata" / "nih_id.csv").read_text().splitlines()[:20]
    (root / "nih_id.csv").write_text("\n".join(lines) + "\n")
    shutil.copy(
        real_dir / "stage2_test" / "stage_2_sample_submission.csv",
        root / "stage_2_sample_submission.csv",
    )


@pytest.fixture(params=["fake", "real"])
def kaggle_root(request, tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    if request.param == "real":
        real_kaggle(root, request.getfixturevalue("real_dir"))
    else:
        fake_kaggle(root)
    return root


# --------------------------------------------------------------------------------------------------
# someone else's data: refused, every byte kept
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [[], ["--fresh"], ["--clean"]], ids=["run", "fresh", "clean"])
def test_demo_refuses_a_data_root_it_did_not_make(kaggle_root, tmp_path, mode):
    """``demo.py --config <an ordinary experiment>``: exit 2 before anything runs or goes."""
    config = demo_config(tmp_path)
    before = tree(tmp_path)
    code, out = run_cli("demo", "--config", str(config), *mode)
    assert code == 2 and "Traceback" not in out, out
    assert str(kaggle_root) in out and "did not write" in out and "nothing was deleted" in out
    assert tree(tmp_path) == before  # nothing deleted, rewritten or created


@pytest.mark.parametrize("extra", [[], ["--no-png", "--seed", "4"]])
def test_make_synthetic_force_refuses_a_folder_it_did_not_write(kaggle_root, extra):
    before = tree(kaggle_root)
    code, out = run_cli("make_synthetic", "--out", str(kaggle_root), "--force", "--size", "64",
                        "--n-train", "2", "--n-test", "1", *extra)  # fmt: skip
    assert code == 2 and "Traceback" not in out, out
    assert str(kaggle_root) in out and "refusing --force, nothing was deleted" in out
    assert tree(kaggle_root) == before


def test_make_synthetic_force_refuses_a_symbolic_link(tmp_path):
    """A link among the generator's names points at someone else's data: never followed."""
    out = tmp_path / "syn"
    write_dataset(out, n_train=2, n_test=1, size=64)
    mine = tmp_path / "mine"
    mine.mkdir()
    fake_kaggle(mine)
    shutil.rmtree(out / "dicom-images-test")
    (out / "dicom-images-test").symlink_to(mine / "dicom-images-test")
    before, theirs = tree(out), tree(mine)
    code, msg = run_cli("make_synthetic", "--out", str(out), "--force", "--size", "64")
    assert code == 2 and "symbolic link" in msg and "dicom-images-test" in msg, msg
    assert tree(out) == before and tree(mine) == theirs


# --------------------------------------------------------------------------------------------------
# the generator's own folder: rebuilt or removed, a user's files in it kept
# --------------------------------------------------------------------------------------------------
PLANTED = {
    "notes.txt": b"my notes",
    "dicom-images-train/mine.dcm": b"\0" * 128 + b"DICM mine",
    "png_images/keep/deep.png": b"\x89PNG mine",
}


def plant(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def assert_planted(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


@pytest.mark.parametrize("legacy", [False, True], ids=["marker", "info-only"])
def test_make_synthetic_force_rebuilds_only_its_own_files(tmp_path, legacy):
    """``--force`` in a marked folder (or one of an earlier version: synthetic_info.json only)
    replaces the old set's files; a user's files next to and inside them stay."""
    out = tmp_path / "syn"
    write_dataset(out, n_train=4, n_test=2, size=64, seed=1)
    if legacy:
        (out / MARKER).unlink()
    plant(out, PLANTED)
    code, msg = run_cli("make_synthetic", "--out", str(out), "--force", "--size", "64",
                        "--n-train", "3", "--n-test", "1", "--seed", "2", "--no-png")  # fmt: skip
    assert code == 0, msg
    assert_planted(out, PLANTED)
    fresh = tmp_path / "ref"
    write_dataset(fresh, n_train=3, n_test=1, size=64, seed=2, png=False)
    mine = {rel for rel in tree(out) if rel.startswith(("notes", "png_images")) or "mine" in rel}
    assert {k: v for k, v in tree(out).items() if k not in mine} == tree(fresh)
    assert not (out / "png_masks").exists()  # the old set's, empty once its PNGs went
    assert read_marker(out)["seed"] == 2


def test_interrupted_removal_and_temp_files(tmp_path):
    """A killed run's temp files of the generator's names go with the set; the set's marker stays
    until the end, so an interrupted removal is finished by the next one."""
    out = tmp_path / "syn"
    write_dataset(out, n_train=3, n_test=1, size=64, seed=7)
    test_id = synthetic_ids(read_marker(out))[1][0]
    plant(out, {".train-rle.csv.ab12cd34.tmp": b"partial",
                f"dicom-images-test/.{test_id}.dcm.zz99yy88.tmp": b"partial",
                ".notes.txt.ab12cd34.tmp": b"a user's temp file"})  # fmt: skip
    (out / INFO).unlink()  # as if killed half-way through a removal
    from pneumoseg.data.synthetic import remove_dataset

    assert remove_dataset(out) == [".notes.txt.ab12cd34.tmp"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, ".notes.txt.ab12cd34.tmp"])
    (out / ".notes.txt.ab12cd34.tmp").unlink()
    assert remove_dataset(out) == [] and not out.exists()


# --------------------------------------------------------------------------------------------------
# the cache: a rebuild deletes only in a folder the cache marked
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def syn_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "data"
    write_dataset(root, n_train=N_TRAIN, n_test=N_TEST, size=64, seed=3, positive_rate=0.4)
    return root


def cache_cfg(tmp: Path, data: Path, *extra: str) -> dict:
    over = [f"data.root={data}", f"cache.dir={tmp / 'cache'}", "data.original_size=64",
            "cache.size=64", "cache.n_jobs=1", "oof.size=32", *extra]  # fmt: skip
    return load_config(REPO / "configs" / "demo.yaml", over)


@pytest.mark.parametrize("force", [False, True])
def test_cache_rebuild_refuses_files_it_did_not_write(syn_data, tmp_path, force):
    cfg = cache_cfg(tmp_path, syn_data)
    path = cache_dir(cfg, "train")
    plant(path, {"images.npy": b"my array", "manifest.csv": b"id\nmine\n", "notes.txt": b"x"})
    before = tree(path)
    with pytest.raises(CacheError, match=r"did not write.*nothing was deleted"):
        build_cache(cfg, "train", force=force)
    assert tree(path) == before


def test_cache_rebuild_and_removal_keep_a_users_file(syn_data, tmp_path):
    cfg = cache_cfg(tmp_path, syn_data)
    path = build_cache(cfg, "train").path
    marker = json.loads((path / CACHE_MARKER).read_text())
    assert marker["root"] == str(syn_data.resolve()) and marker["split"] == "train"
    plant(path, {"notes.txt": b"mine"})
    (path / CACHE_MARKER).unlink()  # a cache of an earlier version: its meta.json vouches
    assert build_cache(cfg, "train", force=True).last_build["processed"] == N_TRAIN
    assert (path / "notes.txt").read_bytes() == b"mine" and (path / CACHE_MARKER).is_file()
    assert remove_cache(path) == ["notes.txt"]
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]
    with pytest.raises(CacheError, match="nothing was deleted"):
        remove_cache(path)  # no longer a cache
    assert (path / "notes.txt").read_bytes() == b"mine"


# --------------------------------------------------------------------------------------------------
# demo --fresh / --clean (make clean-demo): what the demo made, checked first, then removed
# --------------------------------------------------------------------------------------------------
USER_FILES = {  # planted next to / inside every target; all must survive
    "data/notes.txt": b"mine",
    "data/dicom-images-train/mine.dcm": b"\0" * 128 + b"DICM mine",
    "runs/demo/notes.txt": b"mine",
    "submissions/other.csv": b"ImageId,EncodedPixels\nID_x,-1\n",
    "folds/other_folds.csv": b"id,fold\n",
}


def finish_layout(tmp: Path, folds=(0,)) -> dict:
    """Next to the data in ``tmp/data``, what a finished tiny demo leaves, made directly: the
    caches, the folds file, trained fold folders, the tuning and the submission."""
    cfg = load_config(demo_config(tmp))
    for split in ("train", "test"):
        build_cache(cfg, split)
    train_ids, test_ids = synthetic_ids(read_marker(tmp / "data"))
    files = {
        "folds/demo_folds.csv": "id,fold,has_mask,area_bin,patient\n"
        + "".join(f"{i},{k % 2},0,0,p{k}\n" for k, i in enumerate(train_ids)),
        "runs/demo/postprocess.yaml": "threshold: 0.5\n",
        "submissions/demo.csv": "ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in test_ids),
    }
    for k in folds:
        files.update(
            {f"runs/demo/fold{k}/model.pt": "weights", f"runs/demo/fold{k}/oof_ids.csv": "id\n"}
        )
    plant(tmp, {rel: text.encode() for rel, text in files.items()})
    for k in folds:
        save_config(cfg, tmp / "runs" / "demo" / f"fold{k}" / "config.yaml")
    return cfg


def demo_layout(tmp: Path, syn_data: Path) -> dict:
    """A finished tiny demo's outputs plus the user's files of USER_FILES."""
    shutil.copytree(syn_data, tmp / "data")
    cfg = finish_layout(tmp)
    plant(tmp, USER_FILES)
    return cfg


def test_demo_clean_removes_only_what_it_made(syn_data, tmp_path):
    cfg = demo_layout(tmp_path, syn_data)
    config = tmp_path / "demo.yaml"
    code, out = run_cli("demo", "--config", str(config), "--clean")
    assert code == 0, out
    assert_planted(tmp_path, USER_FILES)
    left = {rel for rel in tree(tmp_path) if not rel.startswith("demo.yaml")}
    assert left == {*USER_FILES, "data", f"data/{MARKER}", "data/dicom-images-train", "runs",
                    "runs/demo", "submissions", "folds", "cache"}, left  # fmt: skip
    assert not cache_dir(cfg, "train").exists()
    code, out = run_cli("demo", "--config", str(config), "--clean")  # again: nothing left to do
    assert code == 0, out
    assert_planted(tmp_path, USER_FILES)


def _other_fold(tmp: Path) -> None:
    plant(tmp, {"runs/demo/fold1/config.yaml": b"data: {root: /elsewhere/siim}\n",
                "runs/demo/fold1/model.pt": b"a real model"})  # fmt: skip


def _fold_without_config(tmp: Path) -> None:
    plant(tmp, {"runs/demo/fold1/model.pt": b"a real model"})


def _tuning_alone(tmp: Path) -> None:
    shutil.rmtree(tmp / "runs" / "demo" / "fold0")


def _other_submission(tmp: Path) -> None:
    plant(tmp, {"submissions/demo.csv": b"ImageId,EncodedPixels\nID_0123456789,-1\n"})


def _other_folds(tmp: Path) -> None:
    plant(tmp, {"folds/demo_folds.csv": b"id,fold\n1.2.5,0\n"})


def _cache_of_other_data(tmp: Path) -> None:
    marker = tmp / "cache" / "data_test_64" / CACHE_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "root": "/elsewhere/siim"}))


def _not_a_cache(tmp: Path) -> None:
    for name in (CACHE_MARKER, "meta.json"):
        (tmp / "cache" / "data_train_64" / name).unlink()


def _linked_data(tmp: Path) -> None:
    shutil.rmtree(tmp / "data" / "png_masks")
    (tmp / "mine").mkdir()
    (tmp / "data" / "png_masks").symlink_to(tmp / "mine")


# name: (break the layout, modes refused (a run also overwrites the tuning and submission),
# what the message names)
REFUSED = {
    "fold trained on other data": (_other_fold, "run fresh clean", "runs/demo/fold1"),
    "fold without config.yaml": (_fold_without_config, "run fresh clean", "runs/demo/fold1"),
    "tuning without its folds": (_tuning_alone, "run fresh clean", "postprocess.yaml"),
    "submission of other ids": (_other_submission, "run fresh clean", "submissions/demo.csv"),
    "folds file of other ids": (_other_folds, "fresh clean", "folds/demo_folds.csv"),
    "cache of other data": (_cache_of_other_data, "fresh clean", "data_test_64"),
    "not a cache": (_not_a_cache, "fresh clean", "data_train_64"),
    "link in the data": (_linked_data, "run fresh clean", "png_masks"),
}


@pytest.mark.parametrize(
    "case,mode", [(case, mode) for case, spec in REFUSED.items() for mode in spec[1].split()]
)
def test_demo_refusal_deletes_nothing(syn_data, tmp_path, case, mode):
    breaks, _, named = REFUSED[case]
    demo_layout(tmp_path, syn_data)
    breaks(tmp_path)
    before = tree(tmp_path)
    flag = [] if mode == "run" else [f"--{mode}"]
    code, out = run_cli("demo", "--config", str(tmp_path / "demo.yaml"), *flag)
    assert code == 2 and "Traceback" not in out, out
    assert named in out and "nothing was deleted" in out, out
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# the normal flow still works: a fresh clone, a re-run, then --fresh (tiny sizes)
# --------------------------------------------------------------------------------------------------
class Stop(UserError):
    pass


@pytest.fixture
def stages(monkeypatch):
    """The demo's stages, recorded and skipped (each stage has its own tests; here: what runs, in
    which order, with which flags). Those in ``real`` run; one in ``stop_at`` stops the demo."""
    from pneumoseg.demo import run as demo

    real_stage = demo.run_stage
    rec = SimpleNamespace(calls=[], real=set(), stop_at=set())

    def stage(name, script, *args, timings):
        rec.calls.append((name, args))
        if name in rec.stop_at:
            raise Stop(f"stopped at {name}")
        if name in rec.real:
            real_stage(name, script, *args, timings=timings)

    monkeypatch.setattr(demo, "run_stage", stage)
    return rec


def test_demo_flow_fresh_clone_rerun_fresh(tmp_path, stages):
    config = str(demo_config(tmp_path))
    size = ["--n-train", str(N_TRAIN), "--n-test", str(N_TEST)]
    stages.real.add("synthetic data")
    stages.stop_at.add("validate")  # (the summary would read what the skipped stages write)
    code, out = run_cli("demo", "--config", config, *size)  # a fresh clone: nothing there yet
    assert code == 2 and "stopped at validate" in out, out
    assert [c[0] for c in stages.calls] == ["synthetic data", "preprocess", "folds", "train",
                                           "train", "tune", "predict", "validate"]  # fmt: skip
    assert "--force" not in stages.calls[0][1] and "--resume" not in stages.calls[3][1]
    data = tree(tmp_path / "data")
    assert read_marker(tmp_path / "data")["n_train"] == N_TRAIN

    finish_layout(tmp_path, folds=(0, 1))  # what the skipped stages make
    made = tree(tmp_path)
    stages.calls.clear()
    code, out = run_cli("demo", "--config", config, *size)  # re-run: data and folds are kept
    assert code == 2 and "stopped at validate" in out, out  # the checks passed: its own outputs
    assert [c[0] for c in stages.calls] == ["preprocess", "folds", "tune", "predict", "validate"]
    assert [c[1][-1] for c in stages.calls[2:4]] == ["--force", "--force"]
    assert tree(tmp_path) == made

    theirs = {k: v for k, v in USER_FILES.items() if not k.startswith("data/")}
    plant(tmp_path, theirs)
    stages.calls.clear()
    stages.stop_at = {"preprocess"}
    code, out = run_cli("demo", "--config", config, *size, "--fresh")
    assert code == 2 and "stopped at preprocess" in out, out
    assert [c[0] for c in stages.calls] == ["synthetic data", "preprocess"]
    assert "--force" not in stages.calls[0][1]  # the old set and its folder were removed
    assert_planted(tmp_path, theirs)
    now = tree(tmp_path)
    assert {k for k in now if not k.startswith("data")} == {
        *theirs, "demo.yaml", "runs", "runs/demo", "submissions", "folds", "cache"}  # fmt: skip
    assert tree(tmp_path / "data") == data  # made again: the same set


def test_run_demo_from_python_with_a_loaded_config(tmp_path, stages, monkeypatch):
    """``pneumoseg.demo.run_demo(cfg)`` with a loaded config (overrides included): every stage
    gets it as a --config file that loads back to it, gone once the demo returns; ``clean``
    returns what it removed and no summary."""
    from pneumoseg.demo import run as demo
    from pneumoseg.demo import run_demo

    cfg = load_config(demo_config(tmp_path), ["train.lr=0.002"])
    recorded, seen = demo.run_stage, []  # the stages fixture's recorder

    def stage(name, script, *args, timings):
        if "--config" in args:
            path = Path(args[args.index("--config") + 1])
            seen.append((path, load_config(path)))
        recorded(name, script, *args, timings=timings)

    monkeypatch.setattr(demo, "run_stage", stage)
    stages.stop_at.add("train")
    with pytest.raises(Stop, match="stopped at train"):
        run_demo(cfg, n_train=N_TRAIN, n_test=N_TEST)
    assert [c[0] for c in stages.calls] == ["synthetic data", "preprocess", "folds", "train"]
    assert len(seen) == 3 and all(loaded == cfg for _, loaded in seen), seen
    assert not seen[0][0].exists()
    result = run_demo(cfg, n_train=N_TRAIN, n_test=N_TEST, clean=True)
    assert (result.mode, result.ran, result.removed) == ("clean", False, [])
    with pytest.raises(ValueError, match="no summary"):
        result.summary()


@pytest.mark.slow
def test_demo_real_tiny_run_then_rerun_and_fresh(tmp_path, stages):
    """The real stages once (64 px, 12 images, 2 folds of one step): their outputs pass the
    checks of a re-run and are what --fresh removes."""
    config = str(demo_config(tmp_path))
    size = ["--n-train", str(N_TRAIN), "--n-test", str(N_TEST)]
    stages.real.update(["synthetic data", "preprocess", "folds", "train", "tune", "predict",
                        "validate"])  # fmt: skip
    code, out = run_cli("demo", "--config", config, *size)
    assert code == 0, out
    assert "pneumoseg demo: summary" in out and "submissions/demo.csv" in out
    made = tree(tmp_path)
    assert (tmp_path / "data" / MARKER).is_file() and "runs/demo/fold1/model.pt" in made

    stages.real.clear()
    stages.calls.clear()
    code, out = run_cli("demo", "--config", config, *size)  # re-run: data and folds are kept
    assert code == 0, out  # the checks let the demo re-tune and re-predict its own outputs
    assert [c[0] for c in stages.calls] == ["preprocess", "folds", "tune", "predict", "validate"]
    assert tree(tmp_path) == made

    plant(tmp_path, USER_FILES)
    stages.calls.clear()
    stages.real.add("synthetic data")
    stages.stop_at.add("preprocess")
    code, out = run_cli("demo", "--config", config, *size, "--fresh")
    assert code == 2 and "stopped at preprocess" in out, out
    assert "--force" in stages.calls[0][1]  # the user's files kept the folder: rebuilt around them
    assert_planted(tmp_path, USER_FILES)
    now = tree(tmp_path)
    assert not any(k.startswith(("cache/data_", "runs/demo/fold")) for k in now), now
    assert "submissions/demo.csv" not in now and "folds/demo_folds.csv" not in now
    assert {k: v for k, v in now.items() if k.startswith("data/") and k[5:] not in
            ("notes.txt", "dicom-images-train/mine.dcm")} == {
        k: v for k, v in made.items() if k.startswith("data/")}  # fmt: skip


def test_make_clean_demo_goes_through_the_checks():
    """``make clean-demo`` runs ``demo.py --clean`` (the checks above), not a raw ``rm -rf``."""
    text = (REPO / "Makefile").read_text()
    recipe = text.split("\nclean-demo:", 1)[1].split("\n\n", 1)[0]
    assert "src/demo.py --clean" in recipe and "rm " not in recipe
