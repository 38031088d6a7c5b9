"""Faults a long job meets: a diverging run, two commands on one output, a kill while tuning, a full
disk while saving, and a tuning applied to other models than it was made for (issue 14)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import _Pixel  # the 1x1-conv model of the engine tests
from torch import nn

from pneumoseg.errors import ModelFileError, StaleTuningError, TrainingDivergedError
from pneumoseg.training import engine

from conftest import REPO, run_cli, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
TUNING = ("oof_report.csv", "oof_grid.csv", "oof_grid.png", "postprocess.yaml")
QUICK = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.top_k=1"]


def _over(root: Path, runs: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(root), f"train.out_dir={runs}", *extra]


def _train(root: Path, runs: Path, exp: str, fold: int, *extra: str) -> tuple[int, str]:
    return run_cli("train", "--config", DEMO, "--fold", str(fold), "--quiet",
                   *_over(root, runs, f"exp={exp}", *QUICK, *extra))  # fmt: skip


@pytest.fixture(scope="module")
def two_exps(tiny_data, tmp_path_factory) -> Path:
    """Experiments ``p`` and ``q`` (2 folds each, one step) trained on the tiny data set, and the
    50/50 blend ``pq`` tuned on their OOF maps; returns the runs folder."""
    runs = tmp_path_factory.mktemp("runs")
    for exp, lr in (("p", "train.lr=0.003"), ("q", "train.lr=0.01")):
        for fold in (0, 1):
            code, out = _train(tiny_data, runs, exp, fold, lr)
            assert code == 0, out
    code, out = run_cli("oof_tune", "--config", DEMO, *_blend(tiny_data, runs, 0.5, 0.5))
    assert code == 0, out
    return runs


def _blend(root: Path, runs: Path, wp: float, wq: float, *extra: str) -> list[str]:
    return _over(root, runs, "exp=pq", f"predict.experiments=[[p, {wp}], [q, {wq}]]", *extra)


def _copy_runs(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ==================================================================================================
# 2. a diverged run is never published
# ==================================================================================================
def test_nan_run_stops_with_a_message_and_publishes_nothing(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    code, out = _train(tiny_data, runs, "nan", 0, "train.lr=1e30", "train.epochs=2",
                       "train.max_steps_per_epoch=2")  # fmt: skip
    assert code == 2, out
    assert "Traceback" not in out
    assert "diverged" in out and "train.lr" in out and "non-finite" in out
    fold = runs / "nan" / "fold0"
    assert not (fold / "model.pt").exists()
    assert not list(fold.glob("checkpoints/*.pt")) and not (fold / "last.pt").exists()
    assert not (fold / "oof_ids.csv").exists()


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 1, 4, 4, generator=g),
             "mask": (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()} for _ in range(n)]  # fmt: skip


def _nan_on(bad: set[int]):
    """A loss that is NaN on the batches whose index is in ``bad`` (counted per call)."""
    calls = {"n": 0}

    def loss_fn(logits, target, cls=None):
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        i = calls["n"]
        calls["n"] += 1
        return (loss * float("nan") if i in bad else loss), {}

    return loss_fn


def _epoch(model, loss_fn, n: int, max_bad: int, epoch: int = 0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"accum_steps": 1, "clip_grad": 0.0, "channels_last": False, "max_bad_steps": max_bad}
    return engine.train_one_epoch(model, _batches(n), loss_fn, opt, None,
                                  torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
                                  epoch, cfg, show_progress=False)  # fmt: skip


def test_an_isolated_bad_step_is_skipped_and_the_weights_stay_finite():
    torch.manual_seed(0)
    model = _Pixel()
    before = [p.detach().clone() for p in model.parameters()]
    stats = _epoch(model, _nan_on({1}), n=4, max_bad=1)
    assert stats["bad_steps"] == 1
    assert math_finite(stats["loss"])
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # it learned
    # the skipped step changed nothing: the same as training on batches 0, 2, 3 only
    torch.manual_seed(0)
    ref = _Pixel()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i, b in enumerate(_batches(4)):
        if i == 1:
            continue
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(ref(b["image"]), b["mask"]).backward()
        opt.step()
    for a, b in zip(after, ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@pytest.mark.parametrize(
    "bad,max_bad,stops",
    [
        ({1}, 0, True),  # 0: the first bad step stops
        ({1, 2}, 1, True),  # two in a row, one allowed
        ({1, 3}, 1, False),  # never two in a row
        ({0, 1, 2, 3}, 10, True),  # a whole epoch of skipped steps learned nothing
    ],
)
def test_max_bad_steps(bad, max_bad, stops):
    model = _Pixel()
    if stops:
        with pytest.raises(TrainingDivergedError, match=r"train\.max_bad_steps"):
            _epoch(model, _nan_on(bad), n=4, max_bad=max_bad)
    else:
        assert _epoch(model, _nan_on(bad), n=4, max_bad=max_bad)["bad_steps"] == len(bad)


def _nan_state() -> dict:
    return {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}


def test_non_finite_weights_are_never_saved_or_averaged(tmp_path):
    ck = engine.Checkpoints(tmp_path / "ck", k=2)
    with pytest.raises(TrainingDivergedError, match="1 non-finite"):
        ck.update(0.5, 0, _nan_state(), {"config": {}})
    assert not list((tmp_path / "ck").glob("*.pt"))
    # files written by an older version: averaging them is refused too
    for i in range(2):
        torch.save({"state_dict": _nan_state()}, tmp_path / f"e{i}.pt")
    with pytest.raises(TrainingDivergedError, match=r"e0\.pt, e1\.pt"):
        engine.average_state_dicts([tmp_path / "e0.pt", tmp_path / "e1.pt"])


def test_a_model_file_with_non_finite_weights_is_refused_by_name(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert _train(tiny_data, runs, "ok", 0)[0] == 0
    assert _train(tiny_data, runs, "ok", 1)[0] == 0
    path = runs / "ok" / "fold1" / "model.pt"
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] * float("inf")
    torch.save(ckpt, path)
    code, out = run_cli("predict", "--config", DEMO, "--submission",
                        *_over(tiny_data, runs, "exp=ok", f"predict.out_dir={tmp_path}"))  # fmt: skip
    assert code == 2 and "Traceback" not in out, out
    assert "fold1/model.pt" in out and "non-finite" in out
    assert not (tmp_path / "ok.csv").exists()
    # as train.init_from too
    code, out = _train(tiny_data, runs, "ft", 0, f"train.init_from={path}")
    assert code == 2 and "fold1/model.pt" in out and "non-finite" in out, out


# ==================================================================================================
# 3. one run per output at a time
# ==================================================================================================
_HOLD = """
import sys, time
from pneumoseg.locks import exclusive
with exclusive(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_trainings_on_one_fold_folder(tiny_data, tmp_path):
    """The first run holds the folder; the second is refused with the folder and the first's
    pid; after the first is killed (-9) the lock is free again: never stale."""
    runs = tmp_path / "runs"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    first = subprocess.Popen(
        [sys.executable, str(REPO / "src" / "train.py"), "--config", DEMO, "--fold", "0",
         "--quiet", *_over(tiny_data, runs, "exp=lk", *QUICK, "train.epochs=200")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lock = runs / "lk" / ".fold0.lock"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and str(first.pid) not in _text(lock):
            time.sleep(0.2)
        assert str(first.pid) in _text(lock), "the first run never took its lock"
        time.sleep(3)  # well into its start-up: it has written config.yaml by now or soon
        code, out = _train(tiny_data, runs, "lk", 0, "--resume")
        assert code == 2 and "Traceback" not in out, out
        assert "being written by another" in out and str(first.pid) in out
        assert str(runs / "lk" / "fold0") in out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # free again after the kill; the same settings but epochs (safe to change on resume), so this
    # resumes whether or not the killed run got as far as its first last.pt
    code, out = _train(tiny_data, runs, "lk", 0, "--resume")
    assert code == 0, out
    assert (runs / "lk" / "fold0" / "model.pt").is_file()


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_tuning_and_predicting_refuse_a_held_output(two_exps, tiny_data, tmp_path):
    runs = _copy_runs(two_exps, tmp_path / "runs")
    held = _hold_lock(runs / "pq" / ".postprocess.yaml.lock")
    try:
        code, out = run_cli("oof_tune", "--config", DEMO, *_blend(tiny_data, runs, 0.5, 0.5))
        assert code == 2 and "being written by another" in out and str(held.pid) in out, out
        assert str(runs / "pq") in out
    finally:
        held.kill()
        held.wait()
    sub = tmp_path / "subs"
    held = _hold_lock(sub / ".pq.csv.lock")
    try:
        code, out = run_cli("predict", "--config", DEMO, "--submission",
                            *_blend(tiny_data, runs, 0.5, 0.5, f"predict.out_dir={sub}"))  # fmt: skip
        assert code == 2 and "being written by another" in out and "pq.csv" in out, out
    finally:
        held.kill()
        held.wait()
    assert not (sub / "pq.csv").exists()


# ==================================================================================================
# 4. outputs that belong together are replaced together
# ==================================================================================================
def _digests(folder: Path) -> tuple:
    return tuple(hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in TUNING)


_CRASH = """
import os, sys
from pathlib import Path
import pneumoseg.io as io
k = int(sys.argv[2])
calls = {"n": 0}
real = os.replace
def replace(a, b):
    if calls["n"] == k:
        os._exit(9)  # dies like kill -9: no cleanup, no finally
    calls["n"] += 1
    return real(a, b)
io.os.replace = replace
names = ["a.csv", "b.csv", "c.png", "d.yaml"]
io.replace_together(Path(sys.argv[1]), "set", {n: (lambda p, n=n: p.write_text("new " + n)) for n in names})
"""


def test_replace_together_is_old_or_new_after_a_kill_at_any_rename(tmp_path):
    """Kill the writer at each os.replace in turn (the journal's own, then each file's): after
    recovery the set is wholly old or wholly new, and no temp file is left."""
    from pneumoseg.io import recover_together

    names = ["a.csv", "b.csv", "c.png", "d.yaml"]
    seen = set()
    for k in range(6):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        for n in names:
            (folder / n).write_text("old " + n)
        proc = subprocess.run([sys.executable, "-c", _CRASH, str(folder), str(k)], cwd=REPO)
        recover_together(folder, "set", names)
        contents = {(folder / n).read_text().split()[0] for n in names}
        assert len(contents) == 1, f"kill at rename {k}: mixed set {contents}"
        seen |= contents
        assert sorted(p.name for p in folder.iterdir()) == sorted(names), k
        if proc.returncode == 0:
            assert contents == {"new"}
    assert seen == {"old", "new"}  # the kills fell on both sides of the commit


def test_kill_9_during_oof_tune_leaves_the_old_or_the_new_set(two_exps, tiny_data, tmp_path):
    runs = _copy_runs(two_exps, tmp_path / "runs")
    exp = runs / "pq"
    old = _digests(exp)
    args = ["--config", DEMO, *_blend(tiny_data, runs, 0.5, 0.5, "tune.thresholds=[0.3, 0.6]",
                                       "tune.top_thresholds=[]"), "--force"]  # fmt: skip
    saved = tmp_path / "old"
    shutil.copytree(exp, saved, ignore=shutil.ignore_patterns("fold*"))
    assert run_cli("oof_tune", *args)[0] == 0
    new = _digests(exp)
    assert new != old
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    outcomes = set()
    for delay in (0.5, 2.0, 3.5, 4.5, 5.5, 7.0):
        for n in TUNING:  # back to the old set
            shutil.copy2(saved / n, exp / n)
        proc = subprocess.Popen([sys.executable, str(REPO / "src" / "oof_tune.py"), *args],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the next reader (predict, the app, the next tuning) finishes or drops the killed one
        from pneumoseg.inference.predictor import postprocess_params

        cfg = _cfg(tiny_data, runs)
        postprocess_params(cfg)
        now = _digests(exp)
        assert now in (old, new), f"kill after {delay} s left a mixed set"
        outcomes.add("new" if now == new else "old")
        leftovers = [p.name for p in exp.iterdir() if p.name.endswith(("tmp", ".commit.json"))]
        assert not leftovers, leftovers
    assert "old" in outcomes  # (whether a kill landed after the commit depends on the machine)


def _cfg(root: Path, runs: Path, *extra: str) -> dict:
    from pneumoseg.config import load_config

    return load_config(DEMO, _blend(root, runs, 0.5, 0.5, *extra))


def test_a_folder_in_place_of_an_output_is_refused_before_anything_is_written(
    two_exps, tiny_data, tmp_path
):
    runs = _copy_runs(two_exps, tmp_path / "runs")
    exp = runs / "pq"
    before = _digests(exp)
    (exp / "oof_grid.png").unlink()
    (exp / "oof_grid.png").mkdir()
    code, out = run_cli("oof_tune", "--config", DEMO, *_blend(tiny_data, runs, 0.5, 0.5),
                        "--force")  # fmt: skip
    assert code == 2 and "Traceback" not in out, out
    assert "oof_grid.png is a folder" in out
    for i in (0, 1, 3):  # the report, the grid and the yaml: untouched
        assert hashlib.sha256((exp / TUNING[i]).read_bytes()).hexdigest() == before[i]
    assert (exp / "oof_grid.png").is_dir() and not list((exp / "oof_grid.png").iterdir())


# ==================================================================================================
# 5. environment faults are messages
# ==================================================================================================
class _FullDisk:
    """A file object whose writes fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, fh, budget: int):
        self.fh, self.budget = fh, budget

    def write(self, data):
        if len(data) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _disk_full_for(monkeypatch, name: str, budget: int = 4096) -> None:
    import pneumoseg.io as io

    real = io._open

    def fake(fd, mode, **kwargs):
        fh = real(fd, mode, **kwargs)
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        return _FullDisk(fh, budget) if f".{name}." in target else fh

    monkeypatch.setattr(io, "_open", fake)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_disk_full_while_torch_save_writes_last_pt(tiny_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _disk_full_for(monkeypatch, "last.pt")
    for extra in ((), ("--resume",)):  # the first run, and a rerun on the still-full disk
        code, out = _train(tiny_data, runs, "full", 0, *extra)
        assert code == 2, out
        assert "Traceback" not in out and "enforce fail" not in out and "unexpected pos" not in out
        assert "the disk is full" in out and str(runs / "full" / "fold0" / "last.pt") in out
    left = [p.name for p in (runs / "full" / "fold0").rglob("*") if p.name.endswith(".tmp")]
    assert not left, left
    monkeypatch.undo()
    code, out = _train(tiny_data, runs, "full", 0, "--resume")  # space freed: it goes on
    assert code == 0, out


def test_memory_and_folder_faults_are_messages(tmp_path, caplog):
    from pneumoseg.cli import run

    def numpy_oom(argv):
        raise MemoryError(
            "Unable to allocate 480. GiB for an array with shape (48, 100000, 100000)"
        )

    def torch_oom(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def folder(argv):
        from pneumoseg.io import atomic_write

        (tmp_path / "x.csv").mkdir()
        with atomic_write(tmp_path / "x.csv") as fh:
            fh.write("a")

    for main, text in ((numpy_oom, "480. GiB"), (torch_oom, "GPU ran out of memory"),
                       (folder, "x.csv is a folder")):  # fmt: skip
        caplog.clear()
        assert run(main, []) == 2
        assert text in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(RuntimeError):  # any other RuntimeError is a bug: traceback
        run(lambda argv: (_ for _ in ()).throw(RuntimeError("boom")), [])


def test_disk_preflight_refuses_a_fold_that_cannot_fit(tiny_data, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    code, out = _train(tiny_data, tmp_path / "runs", "tight", 0)
    assert code == 2 and "Traceback" not in out, out
    assert "MiB are free" in out and "train.out_dir" in out
    assert not (tmp_path / "runs" / "tight" / "fold0").exists()


# ==================================================================================================
# 6. tuned settings are never applied to something else
# ==================================================================================================
@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda r, d: _blend(d, r, 0.7, 0.3), ["the blend", "p × 0.5 + q × 0.5", "p × 0.7 + q × 0.3"]),
        (lambda r, d: _over(d, r, "exp=pq", "predict.experiments=[[p, 0.5]]"), ["the blend"]),
        (lambda r, d: _blend(d, r, 0.5, 0.5, "cache.size=96"), ["cache_size", "64", "96"]),
        (lambda r, d: _blend(d, r, 0.5, 0.5, "oof.size=64"), ["oof_size"]),
        (lambda r, d: _blend(d, r, 0.5, 0.5, "oof.hflip=false"), ["oof_hflip"]),
        (lambda r, d: _blend(d, r, 0.5, 0.5, "predict.tta=[hflip, vflip]"), ["predict_tta"]),
    ],
)  # fmt: skip
def test_stale_tuning_is_refused(change, expected, two_exps, tiny_data, tmp_path):
    runs = _copy_runs(two_exps, tmp_path / "runs")
    code, out = run_cli("predict", "--config", DEMO, "--submission",
                        *change(runs, tiny_data), f"predict.out_dir={tmp_path}")  # fmt: skip
    assert code == 2 and "Traceback" not in out, out
    assert "postprocess.yaml was tuned for other models or settings" in out
    assert "oof_tune.py" in out and "--force" in out
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    assert not (tmp_path / "pq.csv").exists()


def test_retrained_model_or_changed_folds_file_makes_the_tuning_stale(
    two_exps, tiny_data, tmp_path
):
    runs = _copy_runs(two_exps, tmp_path / "runs")
    args = ["--config", DEMO, "--submission", *_blend(tiny_data, runs, 0.5, 0.5),
            f"predict.out_dir={tmp_path}"]  # fmt: skip
    code, out = run_cli("predict", *args)  # as tuned: predicts
    assert code == 0, out
    code, out = _train(tiny_data, runs, "q", 1, "--force", "train.lr=0.01", "seed=7")
    assert code == 0, out
    code, out = run_cli("predict", *args, "--force")
    assert code == 2 and "q/fold1/model.pt was retrained" in out, out
    # re-tuning makes it current again
    assert (
        run_cli("oof_tune", "--config", DEMO, *_blend(tiny_data, runs, 0.5, 0.5), "--force")[0] == 0
    )
    assert run_cli("predict", *args, "--force")[0] == 0


def test_a_model_of_another_experiment_or_architecture_is_named(two_exps, tiny_data, tmp_path):
    runs = _copy_runs(two_exps, tmp_path / "runs")
    args = ["--config", DEMO, "--submission", *_over(tiny_data, runs, "exp=p"),
            f"predict.out_dir={tmp_path}"]  # fmt: skip
    shutil.copy2(runs / "q" / "fold0" / "model.pt", runs / "p" / "fold0" / "model.pt")
    code, out = run_cli("predict", *args)
    assert code == 2 and "Traceback" not in out, out
    assert "p/fold0/model.pt was trained as experiment 'q'" in out
    # same experiment name, another network than the run folder's config.yaml says
    other = tmp_path / "other"
    assert _train(tiny_data, other, "p", 0, "model.decoder_channels=[16, 16, 16, 16, 16]")[0] == 0
    shutil.copy2(other / "p" / "fold0" / "model.pt", runs / "p" / "fold0" / "model.pt")
    code, out = run_cli("predict", *args)
    assert code == 2 and "Traceback" not in out, out
    assert "p/fold0/model.pt is another model" in out and "model.decoder_channels" in out


def test_unit_stale_source_without_record_only_warns(tmp_path, caplog):
    from pneumoseg.tuning.provenance import check_source

    cfg = {"cache": {"size": 64}, "oof": {"size": 32, "hflip": True}, "predict": {"tta": []},
           "folds": {"file": str(tmp_path / "none.csv")}}  # fmt: skip
    check_source({"method": "threshold"}, tmp_path / "pp.yaml", cfg, [("a", 1.0)], [])
    assert "records no source" in caplog.text
    with pytest.raises(StaleTuningError, match="cache_size: tuned at 128, now 64"):
        check_source({"source": {"experiments": [["a", 1.0]], "cache_size": 128}},
                     tmp_path / "pp.yaml", cfg, [("a", 1.0)], [])  # fmt: skip
    assert isinstance(StaleTuningError("x"), ValueError) and issubclass(ModelFileError, ValueError)


# ==================================================================================================
# 7. (predict.py) ids from file names are made safe; the submission CSV neutralises formulas
# ==================================================================================================
def test_predict_image_rows_never_carry_a_hostile_file_name(two_exps, tiny_data, tmp_path):
    from pneumoseg.safe_text import hashed_id

    src = sorted((tiny_data / "data" / "png_images").glob("*.png"))[0]
    evil = tmp_path / '=HYPERLINK("x"),1.png'
    plain = tmp_path / "ID_0011fe81e.png"
    shutil.copy2(src, evil)
    shutil.copy2(src, plain)
    code, out = run_cli("predict", "--config", DEMO, "--image", str(evil), "--image", str(plain),
                        "--overlay", str(tmp_path / "ov"), *_over(tiny_data, two_exps, "exp=p"))  # fmt: skip
    assert code == 0, out
    rows = [ln for ln in out.splitlines() if ln.startswith(("sha256-", "ID_"))]
    safe = hashed_id('=HYPERLINK("x"),1')
    assert [r.split(",")[0] for r in rows] == [safe, "ID_0011fe81e"], out
    assert sorted(p.name for p in (tmp_path / "ov").glob("*.png")) == sorted(
        [f"{safe}.png", "ID_0011fe81e.png"]
    )


def test_submission_rows_neutralise_formulas(tmp_path):
    import csv

    from pneumoseg.inference.submission import write_submission

    path = write_submission([("=1+1", "-1"), ("a,b\nc", "3 4"), ("ID_1", "-1")], tmp_path / "s.csv")
    rows = list(csv.reader(path.open(newline="")))
    assert rows == [
        ["ImageId", "EncodedPixels"],
        ["'=1+1", "-1"],
        ["a,b\nc", "3 4"],
        ["ID_1", "-1"],
    ]


def test_lock_names_its_holder_and_is_removed_by_it(tmp_path):
    from pneumoseg.errors import RunLockedError
    from pneumoseg.locks import exclusive

    lock = tmp_path / ".x.lock"
    held = _hold_lock(lock)
    try:
        with (
            pytest.raises(RunLockedError, match=rf"process {held.pid} on .*: -c"),
            exclusive(lock, "the outputs x"),
        ):
            pass
    finally:
        held.send_signal(signal.SIGKILL)  # killed: its file stays, the kernel's lock does not
        held.wait()
    assert lock.exists()
    with exclusive(lock, "the outputs x"):
        assert str(os.getpid()) in lock.read_text()
    assert not lock.exists()  # a holder that finishes removes it


def test_a_second_cache_build_waits_for_the_first_then_reuses_it(tiny_data, tmp_path, caplog):
    """Two builders of one cache (preprocess.py and predict.py, two terminals): the second waits
    for the lock, then finds the cache built; neither writes the arrays while the other does."""
    import logging
    import threading

    from pneumoseg.config import load_config
    from pneumoseg.data.cache import build_cache, cache_dir
    from pneumoseg.locks import exclusive, lock_file_for

    over = [*tiny_overrides(tiny_data), f"cache.dir={tmp_path / 'cache'}"]
    cfg = load_config(REPO / "configs" / "demo.yaml", over)
    path = cache_dir(cfg, "test")
    result = {}
    caplog.set_level(logging.INFO, logger="pneumoseg.locks")
    with exclusive(lock_file_for(path), "a test"):  # another builder holds it
        worker = threading.Thread(target=lambda: result.update(c=build_cache(cfg, "test")))
        worker.start()
        worker.join(timeout=2.0)
        assert worker.is_alive() and not path.exists()  # waiting, nothing written
        assert "waiting for process" in caplog.text
    worker.join(timeout=120)
    assert result["c"].last_build["processed"] == 6
    assert build_cache(cfg, "test").last_build["skipped"] == 6  # the next one reuses it
    assert not lock_file_for(path).exists()


def _rewrite(path: Path, data: bytes) -> None:
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an old file
    path.write_bytes(data)  # in place: same inode


@pytest.mark.parametrize(
    "change, rehashed",
    [
        (lambda p: None, False),  # untouched: remembered
        (lambda p: _rewrite(p, b"B" * 4096), True),  # same size, same inode, in place
        (lambda p: (_rewrite(p, b"B" * 4096), os.utime(p, ns=(1_000_000_000,) * 2)), True),  # forged mtime: ctime moved
        (lambda p: _rewrite(p, b"A" * 4095), True),  # another size
        (lambda p: (p.with_name("new").write_bytes(b"B" * 4096), p.with_name("new").replace(p)), True),  # renamed over
        (lambda p: os.utime(p, ns=(5_000_000_000, 5_000_000_000)), True),  # touched: hashed again
    ],
)  # fmt: skip
def test_file_digest_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch,
                                                                   change, rehashed):  # fmt: skip
    """Predictor starts check the same model files again: a digest is remembered by the file's
    stat, so a file changed in any way (rewritten in place with its old size and mtime included)
    is hashed again and a stale model is still seen."""
    from pneumoseg.tuning import provenance

    monkeypatch.setattr(provenance, "_DIGESTS", {})
    monkeypatch.setattr(provenance, "_SETTLED_NS", 0)  # files here are seconds old at most
    path = tmp_path / "model.pt"
    path.write_bytes(b"A" * 4096)
    assert provenance.file_digest(path) == hashlib.sha256(b"A" * 4096).hexdigest()[:16]
    time.sleep(0.02)  # past the kernel clock's tick, as any real rewrite is
    change(path)
    opened = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or _OPEN(*a, **k))
    assert provenance.file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert bool(opened) == rehashed


_OPEN = open


def test_a_freshly_written_file_is_not_remembered(tmp_path, monkeypatch):
    """Racy files (written within the last 2 s, the window the kernel's coarse clock could hide an
    in-place rewrite in) are hashed every time, as git re-checks racily clean files."""
    from pneumoseg.tuning import provenance

    monkeypatch.setattr(provenance, "_DIGESTS", {})
    path = tmp_path / "model.pt"
    path.write_bytes(b"A" * 64)
    first = provenance.file_digest(path)
    path.write_bytes(b"B" * 64)  # possibly within the same clock tick: same size, same stat
    assert provenance.file_digest(path) != first
    assert provenance._DIGESTS == {}
