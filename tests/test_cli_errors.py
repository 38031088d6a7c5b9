"""Bad input to every script: one clean message naming the file/key/line, exit code 2, no traceback.

Each case builds its bad input in a fresh folder and runs the script's ``main`` in-process through
the shared wrapper (``pneumoseg.cli.run``), exactly what ``python src/<script>.py`` runs; a bug
(any exception that is not a user error) escapes ``run`` and fails the test. A few cases also run
as real subprocesses to check the entry points themselves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
EXP = "errs"


# --------------------------------------------------------------------------------------------------
# fixtures: a tiny trained experiment (2 folds, 1 step each) to break model files and OOF with
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A copy of the tiny data set's runs with experiment ``errs`` trained on folds 0 and 1."""
    for fold in ("0", "1"):
        code, out = run_cli("train", "--config", DEMO, "--fold", fold, "--quiet",
                            *tiny_overrides(tiny_data), f"exp={EXP}", "train.epochs=1",
                            "train.max_steps_per_epoch=1", "train.top_k=1")  # fmt: skip
        assert code == 0, out
    code, out = run_cli("oof_tune", "--config", DEMO, *tiny_overrides(tiny_data), f"exp={EXP}")
    assert code == 0, out
    return tiny_data


class Ctx:
    """What a case may use: ``tmp`` (its own folder), ``data`` (tiny data root), ``over`` (the
    overrides that point the demo config at the tiny set), ``runs`` (a private copy of the
    trained runs, free to break)."""

    def __init__(self, tmp: Path, data: Path):
        self.tmp, self.data = tmp, data
        self.runs = tmp / "runs"
        self.over = [*tiny_overrides(data), f"train.out_dir={self.runs}", f"exp={EXP}"]

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        return p

    def hold(self, lock_file: Path) -> None:
        """Hold ``lock_file`` as a running command would, for the rest of the case."""
        from pneumoseg.locks import exclusive

        self._held = exclusive(lock_file, "a test")
        self._held.__enter__()

    def release(self) -> None:
        if getattr(self, "_held", None) is not None:
            self._held.__exit__(None, None, None)
            self._held = None

    def copy_runs(self, trained: Path) -> Path:
        shutil.copytree(trained / "runs" / EXP, self.runs / EXP)
        return self.runs / EXP

    def folds(self, text: str) -> list[str]:
        return [*self.over, f"folds.file={self.file('folds.csv', text)}"]


def _model_file(ctx, trained, payload) -> list[str]:
    """Replace fold 0's model.pt with ``payload`` (bytes, or a callable writing the file)."""
    exp = ctx.copy_runs(trained)
    target = exp / "fold0" / "model.pt"
    payload(target) if callable(payload) else target.write_bytes(payload)
    return ["--config", DEMO, "--submission", *ctx.over]


def _pickled_code(path: Path) -> None:
    class Evil:  # any non-tensor object: weights_only=True must refuse it
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil(), "config": {}}, path)


def _other_arch(path: Path) -> None:
    """A model.pt whose config says resnet18/light decoder but whose weights are resnet34's."""
    from pneumoseg.models.registry import build_model

    good = torch.load(path, weights_only=True)
    cfg = dict(good["config"]["model"], encoder="resnet34", encoder_weights=None)
    torch.save({"state_dict": build_model(cfg).state_dict(), "config": good["config"]}, path)


def _other_exp(path: Path) -> None:
    """fold0's model.pt as if another experiment had trained it (copied in by hand)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = {**ckpt["config"], "exp": "someone_else"}
    torch.save(ckpt, path)


def _nan_weights(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    torch.save(ckpt, path)


def _folder_for(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


SEMICOLONS = "a;b\n1;2\n"
WRONG_COLUMNS = "a,b\n1,2\n"


def _folds_from_data(ctx, edit) -> list[str]:
    text = (ctx.data / "folds.csv").read_text().splitlines()
    return ctx.folds("\n".join(edit(text)) + "\n")


def _dup_id(lines):
    return [*lines, lines[1]]


def _bad_fold(lines):
    parts = lines[2].split(",")
    parts[1] = "x1"
    return [lines[0], lines[1], ",".join(parts), *lines[3:]]


def _fold_out_of_range(lines):
    parts = lines[1].split(",")
    parts[1] = "7"
    return [lines[0], ",".join(parts), *lines[2:]]


def _patient_split(lines):
    """Give the first image of fold 0 and the first of fold 1 the same patient."""
    rows = [line.split(",") for line in lines[1:]]
    a = next(r for r in rows if r[1] == "0")
    b = next(r for r in rows if r[1] == "1")
    b[4] = a[4]
    return [lines[0], *(",".join(r) for r in rows)]


def _rle_csv(ctx, edit, *extra) -> list[str]:
    """A copy of the tiny data set with its train-rle.csv edited; preprocess in strict mode."""
    root = ctx.tmp / "data"
    shutil.copytree(ctx.data / "data", root)
    csv = root / "train-rle.csv"
    csv.write_bytes(edit(csv.read_bytes()))
    return ["--config", DEMO, *tiny_overrides(ctx.tmp), f"data.root={root}", *extra]


def _break_first_positive(text: bytes) -> bytes:
    lines = text.decode().splitlines()
    i = next(k for k, line in enumerate(lines) if k and not line.endswith("-1"))
    lines[i] = lines[i].rsplit(",", 1)[0] + ", 5 x 7"
    return ("\n".join(lines) + "\n").encode()


def _first_positive_abs_violation(text: bytes) -> bytes:
    """A relative RLE whose second offset is smaller than the first run's end (as relative RLE
    usually is): read as absolute, it goes backwards."""
    lines = text.decode().splitlines()
    i = next(k for k, line in enumerate(lines) if k and not line.endswith("-1"))
    lines[i] = lines[i].rsplit(",", 1)[0] + ", 100 3 10 2"
    return ("\n".join(lines) + "\n").encode()


def _existing_run(ctx, trained, *extra) -> list[str]:
    ctx.copy_runs(trained)
    return ["--config", DEMO, "--fold", "0", *ctx.over, *extra]


def _stage2(real_dir, ctx, name, content=None) -> Path:
    src = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]
    dest = ctx.tmp / name
    if content is None:
        shutil.copy(src, dest)
    else:
        dest.write_bytes(content(src.read_bytes()))
    return dest


# --------------------------------------------------------------------------------------------------
# the table: id -> (script, args(ctx, trained), [substrings the message must contain])
# --------------------------------------------------------------------------------------------------
T = "train"
CASES = {
    # ---- config files
    "config missing": (T, lambda c, t: ["--config", str(c.tmp / "nope.yaml")], ["nope.yaml", "not found"]),
    "config empty": (T, lambda c, t: ["--config", str(c.file("e.yaml", ""))], ["e.yaml", "is empty"]),
    "config is a folder": (T, lambda c, t: ["--config", str(c.tmp)], ["is a folder"]),
    "config binary": (T, lambda c, t: ["--config", str(c.file("b.yaml", b"\xff\xfe\x00\x81"))], ["b.yaml", "UTF-8"]),
    "config bad yaml": (T, lambda c, t: ["--config", str(c.file("y.yaml", "train: [1,"))], ["y.yaml", "invalid YAML"]),
    "config a list": (T, lambda c, t: ["--config", str(c.file("l.yaml", "- 1\n- 2\n"))], ["l.yaml", "mapping"]),
    "config unknown key": (T, lambda c, t: ["--config", str(c.file("k.yaml", "train:\n  lrr: 1\n"))], ["k.yaml", "train.lrr", "Valid keys"]),
    "config unknown section": (T, lambda c, t: ["--config", str(c.file("s.yaml", "trian:\n  lr: 1\n"))], ["trian", "Valid keys"]),
    "config wrong type": (T, lambda c, t: ["--config", DEMO, "train.epochs=abc"], ["train.epochs", "must be int"]),
    "section given a value": (T, lambda c, t: ["--config", DEMO, "train=3"], ["'train' is a section"]),
    "override without =": (T, lambda c, t: ["--config", DEMO, "train.lr"], ["train.lr", "section.key=value"]),
    "epochs 0": (T, lambda c, t: ["--config", DEMO, *c.over, "train.epochs=0"], ["train.epochs", ">= 1"]),
    "top_k 0": (T, lambda c, t: ["--config", DEMO, *c.over, "train.top_k=0"], ["train.top_k", ">= 1"]),
    "batch_size 0": (T, lambda c, t: ["--config", DEMO, "train.batch_size=0"], ["train.batch_size"]),
    "accum_steps 0": (T, lambda c, t: ["--config", DEMO, "train.accum_steps=0"], ["train.accum_steps"]),
    "lr 0": (T, lambda c, t: ["--config", DEMO, "train.lr=0"], ["train.lr", "> 0"]),
    "lr negative": (T, lambda c, t: ["--config", DEMO, "train.lr=-1e-3"], ["train.lr"]),
    "lr nan": (T, lambda c, t: ["--config", DEMO, "train.lr=.nan"], ["train.lr", "finite"]),
    "in_channels 2": (T, lambda c, t: ["--config", DEMO, "model.in_channels=2"], ["model.in_channels"]),
    "pos_share empty": (T, lambda c, t: ["--config", DEMO, "sampler.pos_share=[]"], ["sampler.pos_share", "non-empty"]),
    "pos_share above 1": (T, lambda c, t: ["--config", DEMO, "sampler.pos_share=[0.5, 1.5]"], ["sampler.pos_share[1]"]),
    "pos_share zero": (T, lambda c, t: ["--config", DEMO, "sampler.pos_share=[0]"], ["sampler.pos_share[0]"]),
    "unknown arch": (T, lambda c, t: ["--config", DEMO, "model.arch=unetz"], ["model.arch", "unetz", "unetplusplus"]),
    "unknown encoder": (T, lambda c, t: ["--config", DEMO, "model.encoder=resnet35"], ["model.encoder", "resnet35", "resnet34"]),
    "unknown timm encoder": (T, lambda c, t: ["--config", DEMO, "model.encoder=tu-nonet"], ["tu-nonet"]),
    "unknown sampler": (T, lambda c, t: ["--config", DEMO, "sampler.kind=balanced"], ["sampler.kind", "positive_share"]),
    "unknown optimizer": (T, lambda c, t: ["--config", DEMO, "train.optimizer=sgdx"], ["train.optimizer", "adamw"]),
    "unknown scheduler": (T, lambda c, t: ["--config", DEMO, "train.scheduler=step"], ["train.scheduler", "cosine"]),
    "unknown amp": (T, lambda c, t: ["--config", DEMO, "train.amp=fp8"], ["train.amp", "bf16"]),
    "unknown select": (T, lambda c, t: ["--config", DEMO, "train.select=iou"], ["train.select", "dice_gated"]),
    "select val_loss for maskrcnn": (T, lambda c, t: ["--config", "configs/maskrcnn_demo.yaml", "train.select=val_loss"], ["train.select", "maskrcnn", "no validation loss"]),
    "cuda without a GPU": (T, lambda c, t: ["--config", DEMO, "train.device=cuda"], ["train.device", "no CUDA GPU"]),
    "unknown device": (T, lambda c, t: ["--config", DEMO, "train.device=tpu"], ["train.device", "tpu"]),
    "cache size not /32": (T, lambda c, t: ["--config", DEMO, "cache.size=100"], ["cache.size", "multiple of 32"]),
    "bad tta view": (T, lambda c, t: ["--config", DEMO, "predict.tta=[rotate]"], ["predict.tta", "rotate"]),
    "aux loss without head": (T, lambda c, t: ["--config", DEMO, "loss.aux=1"], ["loss.aux", "aux_head"]),
    "all loss weights 0": (T, lambda c, t: ["--config", DEMO, "loss.bce=0", "loss.dice=0", "loss.focal=0"], ["loss", "> 0"]),
    "augment prob 1.5": (T, lambda c, t: ["--config", DEMO, "augment.hflip=1.5"], ["augment.hflip"]),
    "augment_neg unknown key": (T, lambda c, t: ["--config", DEMO, "augment_neg={flip: 1}"], ["augment_neg.flip"]),
    "exp with a path": (T, lambda c, t: ["--config", DEMO, "exp=../x"], ["exp", "../x"]),
    "layout unknown": ("preprocess", lambda c, t: ["--config", DEMO, "data.layout=jpg"], ["data.layout", "siim"]),
    "rle_format unknown": ("preprocess", lambda c, t: ["--config", DEMO, "data.rle_format=rel"], ["data.rle_format"]),
    "n_folds 1": ("make_folds", lambda c, t: ["--config", DEMO, "folds.n_folds=1"], ["folds.n_folds"]),
    "tune threshold 1.5": ("oof_tune", lambda c, t: ["--config", DEMO, "tune.thresholds=[1.5]"], ["tune.thresholds[0]"]),
    "tune folds out of range": ("oof_tune", lambda c, t: ["--config", DEMO, "tune.folds=[5]"], ["tune.folds", "0..2"]),
    "predict folds out of range": ("predict", lambda c, t: ["--config", DEMO, "--submission", "predict.folds=[7]"], ["predict.folds", "7"]),
    "predict experiments malformed": ("predict", lambda c, t: ["--config", DEMO, "--submission", "predict.experiments=[[a, 1, 2]]"], ["predict.experiments[0]"]),
    "predict batch 0": ("predict", lambda c, t: ["--config", DEMO, "--submission", "predict.batch_size=0"], ["predict.batch_size"]),
    # ---- folds and --fold
    "fold 5 of 2": (T, lambda c, t: ["--config", DEMO, *c.over, "--fold", "5"], ["--fold 5", "0..1"]),
    "fold -2": (T, lambda c, t: ["--config", DEMO, *c.over, "--fold", "-2"], ["--fold -2"]),
    "folds file missing": (T, lambda c, t: [*c.over, "--config", DEMO, f"folds.file={c.tmp / 'f.csv'}"], ["f.csv", "make_folds"]),
    "folds file empty": (T, lambda c, t: ["--config", DEMO, *c.folds("")], ["folds.csv", "empty"]),
    "folds file binary": (T, lambda c, t: ["--config", DEMO, *c.over, f"folds.file={c.file('folds.csv', bytes(range(128, 256)))}"], ["folds.csv", "UTF-8"]),
    "folds file no fold column": (T, lambda c, t: ["--config", DEMO, *c.folds("id,split\na,0\n")], ["folds.csv", "id and fold"]),
    "folds non-integer fold": (T, lambda c, t: ["--config", DEMO, *_folds_from_data(c, _bad_fold)], ["folds.csv:3", "x1"]),
    "folds fold out of range": (T, lambda c, t: ["--config", DEMO, *_folds_from_data(c, _fold_out_of_range)], ["folds.csv:2", "outside 0..1"]),
    "folds duplicate id": (T, lambda c, t: ["--config", DEMO, *_folds_from_data(c, _dup_id)], ["folds.csv:", "already appears on line 2"]),
    "folds patient in two folds": (T, lambda c, t: ["--config", DEMO, *_folds_from_data(c, _patient_split)], ["folds.csv", "more than one fold", "allow_patient_split"]),
    "import folds missing": ("make_folds", lambda c, t: ["--config", DEMO, f"folds.import_from={c.tmp / 'x.csv'}", f"folds.file={c.tmp / 'o.csv'}"], ["x.csv", "not found"]),
    "import folds garbage": ("make_folds", lambda c, t: ["--config", DEMO, "folds.import_from=" + str(c.file("x.csv", SEMICOLONS)), f"folds.file={c.tmp / 'o.csv'}"], ["x.csv", "fold"]),
    # ---- run folders, resume, init_from, encoder weights
    "run exists": (T, lambda c, t: _existing_run(c, t), ["fold0", "already holds a run", "--resume"]),
    "resume with changed lr": (T, lambda c, t: _existing_run(c, t, "--resume", "train.lr=0.5"), ["train.lr", "0.003 -> 0.5", "--force"]),
    "resume and force": (T, lambda c, t: _existing_run(c, t, "--resume", "--force"), ["pick one"]),
    "init_from missing": (T, lambda c, t: ["--config", DEMO, *c.over, f"train.init_from={c.tmp / 'w.pt'}"], ["train.init_from", "w.pt"]),
    "init_from text": (T, lambda c, t: ["--config", DEMO, *c.over, f"train.init_from={c.file('w.pt', 'hello')}"], ["w.pt", "not a PyTorch file"]),
    "init_from other arch": (T, lambda c, t: ["--config", DEMO, *c.over, "model.decoder_channels=[16, 16, 16, 16, 16]", f"train.init_from={t / 'runs' / EXP / 'fold0' / 'model.pt'}"], ["model.pt", "do not fit", "another shape"]),
    "init_from bad placeholder": (T, lambda c, t: ["--config", DEMO, *c.over, "train.init_from=runs/{exp}/model.pt"], ["train.init_from", "{fold}"]),
    "encoder weights missing": (T, lambda c, t: ["--config", DEMO, *c.over, f"model.encoder_weights_path={c.tmp / 'enc.pt'}"], ["encoder_weights_path", "enc.pt"]),
    "encoder weights garbage": (T, lambda c, t: ["--config", DEMO, *c.over, f"model.encoder_weights_path={c.file('enc.pt', b'PK' + bytes(40))}"], ["enc.pt", "model.encoder_weights_path"]),
    "cache missing": (T, lambda c, t: ["--config", DEMO, *c.over, f"cache.dir={c.tmp / 'nocache'}"], ["nocache", "preprocess.py"]),
    # ---- model files for predict
    "model.pt empty": ("predict", lambda c, t: _model_file(c, t, b""), ["fold0/model.pt", "empty (0 bytes)"]),
    "model.pt text": ("predict", lambda c, t: _model_file(c, t, b"not a model\n"), ["fold0/model.pt", "not a PyTorch file"]),
    "model.pt truncated": ("predict", lambda c, t: _model_file(c, t, _truncated), ["fold0/model.pt", "truncated or corrupt"]),
    "model.pt with code": ("predict", lambda c, t: _model_file(c, t, _pickled_code), ["fold0/model.pt", "refused"]),
    "model.pt other arch": ("predict", lambda c, t: _model_file(c, t, _other_arch), ["fold0/model.pt", "do not fit"]),
    "model.pt plain dict": ("predict", lambda c, t: _model_file(c, t, lambda p: torch.save({"a": torch.ones(1)}, p)), ["fold0/model.pt", "not a pneumoseg model.pt"]),
    "predict fold missing": ("predict", lambda c, t: (shutil.rmtree(c.copy_runs(t) / "fold1"), ["--config", DEMO, "--submission", *c.over])[1], ["fold(s) [1]", "predict.folds"]),
    "predict asked fold missing": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, "--submission", *c.over, "folds.n_folds=3", "predict.folds=[0, 2]"])[1], ["fold2", "does not exist"]),
    "predict no experiment": ("predict", lambda c, t: ["--config", DEMO, "--submission", *c.over, "exp=nothing"], ["nothing", "fold(s) [0, 1]"]),
    "oof fold missing": ("oof_tune", lambda c, t: (shutil.rmtree(c.copy_runs(t) / "fold1"), ["--config", DEMO, *c.over])[1], ["fold(s) [1]", "tune.folds"]),
    "oof damaged": ("oof_tune", lambda c, t: ((c.copy_runs(t) / "fold0" / "oof_probs.npy").write_bytes(b"junk"), ["--config", DEMO, *c.over])[1], ["fold0", "damaged OOF"]),
    "postprocess.yaml differs": ("oof_tune", lambda c, t: ((c.copy_runs(t) / "postprocess.yaml").write_text("method: threshold\nthreshold: 0.9\nmin_area: 0\n"), ["--config", DEMO, *c.over])[1], ["postprocess.yaml", "--force"]),
    # ---- data, CSVs and RLE (preprocess)
    "data.root missing": ("preprocess", lambda c, t: ["--config", DEMO, *c.over, f"data.root={c.tmp / 'nodata'}"], ["nodata", "data.root"]),
    "rle csv missing": ("preprocess", lambda c, t: ["--config", DEMO, *c.over, "data.rle_csv=none.csv"], ["none.csv"]),
    "rle csv binary": ("preprocess", lambda c, t: _rle_csv(c, lambda b: b[:40] + b"\xff\xfe\x80" + b[40:]), ["train-rle.csv", "UTF-8"]),
    "rle csv NUL byte": ("preprocess", lambda c, t: _rle_csv(c, lambda b: b[:60] + b"\x00" + b[60:], "data.strict=true"), ["train-rle.csv"]),
    "rle row malformed": ("preprocess", lambda c, t: _rle_csv(c, _break_first_positive, "data.strict=true"), ["train-rle.csv:", "ImageId"]),
    "rle absolute on relative": ("preprocess", lambda c, t: _rle_csv(c, _first_positive_abs_violation, "data.rle_format=absolute", "data.strict=true"), ["train-rle.csv:", "data.rle_format=relative"]),
    "patient map missing": ("preprocess", lambda c, t: ["--config", DEMO, *c.over, "data.patient_map=nope.csv", "--force"], ["nope.csv", "patient map"]),
    "patient map wrong columns": ("preprocess", lambda c, t: ["--config", DEMO, *c.over, "data.patient_map=" + str(c.file("pm.csv", WRONG_COLUMNS)), "--force"], ["pm.csv", "Kaggle_ID,NIH_ID"]),
    "png index missing": ("preprocess", lambda c, t: ["--config", DEMO, *c.over, "data.layout=png", "data.train_images=png_images", "data.train_index=none.csv"], ["none.csv", "png index"]),
    # ---- predict inputs and outputs
    "image missing": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, *c.over, "--image", str(c.tmp / "x.png")])[1], ["x.png", "not found"]),
    "image is a folder": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, *c.over, "--image", str(c.tmp)])[1], ["is a folder"]),
    "image text as png": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, *c.over, "--image", str(c.file("x.png", "hello"))])[1], ["x.png", "not a DICOM, PNG or JPEG"]),
    "image text as dcm": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, *c.over, "--image", str(c.file("x.dcm", "hello"))])[1], ["x.dcm", "DICOM"]),
    "sample missing": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, "--submission", *c.over, "--sample", str(c.tmp / "s.csv")])[1], ["s.csv", "no such file"]),
    "sample header only": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, "--submission", *c.over, "--sample", str(c.file("s.csv", "ImageId,EncodedPixels\n")), f"predict.out_dir={c.tmp}"])[1], ["s.csv", "no ImageId"]),
    "submission exists": ("predict", lambda c, t: (c.copy_runs(t), c.file(f"{EXP}.csv", "x"), ["--config", DEMO, "--submission", *c.over, f"predict.out_dir={c.tmp}"])[2], [f"{EXP}.csv", "--force"]),
    "validate: submission missing": ("validate_submission", lambda c, t: [str(c.tmp / "sub.csv")], ["sub.csv", "not found"]),
    "validate: sample missing": ("validate_submission", lambda c, t: [str(c.file("sub.csv", "ImageId,EncodedPixels\n")), "--sample", str(c.tmp / "s.csv")], ["s.csv", "not found"]),
    "validate: submission is a folder": ("validate_submission", lambda c, t: [str(c.tmp)], ["is a folder"]),
    "synthetic: out not empty": ("make_synthetic", lambda c, t: (c.file("o/x", "1"), ["--out", str(c.tmp / "o"), "--size", "64"])[1], ["not empty", "--force"]),
    "synthetic: size 16": ("make_synthetic", lambda c, t: ["--out", str(c.tmp / "o"), "--size", "16"], ["size", "32"]),
    "synthetic: out is a file": ("make_synthetic", lambda c, t: ["--out", str(c.file("o", "x")), "--size", "64"], ["not a directory"]),
    # ---- user data is never deleted (demo --fresh, make_synthetic --force)
    "synthetic: --force on data it did not write": ("make_synthetic", lambda c, t: (c.file("kaggle/train-rle.csv", "ImageId, EncodedPixels\n"), c.file("kaggle/dicom-images-train/a.dcm", b"DICM"), ["--out", str(c.tmp / "kaggle"), "--force", "--size", "64"])[2], ["kaggle", "did not write", "refusing --force, nothing was deleted"]),
    "demo: data.root holds other data": ("demo", lambda c, t: (c.file("siim/train-rle.csv", "ImageId, EncodedPixels\n"), ["--config", str(c.file("d.yaml", f"data: {{root: {c.tmp / 'siim'}}}\n"))])[1], ["siim", "did not write", "synthetic set only"]),
    "demo --fresh: data.root holds other data": ("demo", lambda c, t: (c.file("siim/nih_id.csv", "Kaggle_ID,NIH_ID\n"), ["--config", str(c.file("d.yaml", f"data: {{root: {c.tmp / 'siim'}}}\n")), "--fresh"])[1], ["siim", "did not write", "nothing was deleted"]),
    "demo --fresh: a run trained on other data": ("demo", lambda c, t: (c.file("runs/d/fold0/config.yaml", "data: {root: /elsewhere/siim}\n"), ["--config", str(c.file("d.yaml", f"data: {{root: {c.tmp / 'syn'}}}\ntrain: {{out_dir: {c.tmp / 'runs'}}}\n")), "--fresh"])[1], ["fold0", "not trained on", "nothing was deleted"]),
    "demo: a submission of other ids": ("demo", lambda c, t: (c.file("subs/d.csv", "ImageId,EncodedPixels\nID_0123456789,-1\n"), ["--config", str(c.file("d.yaml", f"data: {{root: {c.tmp / 'syn'}}}\npredict: {{out_dir: {c.tmp / 'subs'}}}\n"))])[1], ["d.csv", "ids are not the synthetic set's"]),
    # ---- config values: typed, consistent across families, bounded sizes
    "freeze_bn maybe": (T, lambda c, t: ["--config", DEMO, "model.freeze_bn=maybe"], ["model.freeze_bn", "must be bool or null", "maybe"]),
    "depth not a number": (T, lambda c, t: ["--config", DEMO, "model.depth=abc"], ["model.depth", "must be int or null"]),
    "init_from a list": (T, lambda c, t: ["--config", DEMO, "train.init_from=[1]"], ["train.init_from", "must be str or null"]),
    "lr null": (T, lambda c, t: ["--config", DEMO, "train.lr=null"], ["train.lr", "not null"]),
    "decoder_channels with maskrcnn": (T, lambda c, t: ["--config", str(REPO / "configs" / "maskrcnn_demo.yaml"), "model.decoder_channels=[8, 8, 8, 8, 8]"], ["model.decoder_channels", "model.arch=maskrcnn", "used by smp"]),
    "encoder with doubleunet": (T, lambda c, t: ["--config", str(REPO / "configs" / "doubleunet_demo.yaml"), "model.encoder=resnet18"], ["model.encoder=resnet18", "model.arch=doubleunet", "set it to resnet34 or null"]),
    "min_score with unet": (T, lambda c, t: ["--config", DEMO, "model.min_score=0.3"], ["model.min_score", "model.arch=unet", "used by maskrcnn"]),
    "smp encoder_weights unknown": (T, lambda c, t: ["--config", DEMO, "model.encoder_weights=coco"], ["model.encoder_weights", "coco", "resnet18", "imagenet, ssl, swsl"]),
    "oof.size 100000": (T, lambda c, t: ["--config", DEMO, "oof.size=100000"], ["oof.size", "[8, 2048]"]),
    "oof.size above cache and originals": ("oof_tune", lambda c, t: ["--config", DEMO, "oof.size=512"], ["oof.size", "use <= 256"]),
    "batch_size 5000": (T, lambda c, t: ["--config", DEMO, "train.batch_size=5000"], ["train.batch_size", "1024"]),
    "n_folds 50": ("make_folds", lambda c, t: ["--config", DEMO, "folds.n_folds=50"], ["folds.n_folds", "20"]),
    "predict fp16 on cpu": ("predict", lambda c, t: ["--config", DEMO, "--submission", "train.device=cpu", "predict.amp=fp16"], ["predict.amp", "fp16 needs CUDA"]),
    # ---- runs: divergence, locks, stale tuning, environment faults
    "lr 1e30 diverges": (T, lambda c, t: ["--config", DEMO, *c.over, "train.lr=1e30", "train.epochs=1", "train.max_steps_per_epoch=2"], ["diverged", "non-finite", "train.lr", "--force"]),
    "max_bad_steps negative": (T, lambda c, t: ["--config", DEMO, "train.max_bad_steps=-1"], ["train.max_bad_steps", ">= 0"]),
    "train while another runs": (T, lambda c, t: (c.hold(c.runs / EXP / ".fold0.lock"), ["--config", DEMO, *c.over])[1], ["fold0", "being written by another", "lock file"]),
    "tune while another runs": ("oof_tune", lambda c, t: (c.copy_runs(t), c.hold(c.runs / EXP / ".postprocess.yaml.lock"), ["--config", DEMO, *c.over])[2], [f"{EXP}", "being written by another"]),
    "predict while another runs": ("predict", lambda c, t: (c.copy_runs(t), c.hold(c.tmp / f".{EXP}.csv.lock"), ["--config", DEMO, "--submission", *c.over, f"predict.out_dir={c.tmp}"])[2], [f"{EXP}.csv", "being written by another"]),
    "tuning for another cache size": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, "--submission", *c.over, "cache.size=96", f"predict.out_dir={c.tmp}"])[1], ["postprocess.yaml", "cache_size", "oof_tune.py"]),
    "tuning for another blend": ("predict", lambda c, t: (c.copy_runs(t), ["--config", DEMO, "--submission", *c.over, f"predict.experiments=[[{EXP}, 0.5]]", f"predict.out_dir={c.tmp}"])[1], ["postprocess.yaml", "the blend", "--force"]),
    "model.pt of another experiment": ("predict", lambda c, t: _model_file(c, t, _other_exp), ["fold0/model.pt", "trained as experiment 'someone_else'"]),
    "model.pt with NaN weights": ("predict", lambda c, t: _model_file(c, t, _nan_weights), ["fold0/model.pt", "non-finite"]),
    "tuning output is a folder": ("oof_tune", lambda c, t: (_folder_for(c.copy_runs(t) / "oof_grid.csv"), ["--config", DEMO, *c.over, "--force"])[1], ["oof_grid.csv is a folder"]),
    "init_from with NaN weights": (T, lambda c, t: (_model_file(c, t, _nan_weights), ["--config", DEMO, *c.over, f"train.init_from={c.runs / EXP / 'fold0' / 'model.pt'}", f"exp={EXP}2"])[1], ["train.init_from", "model.pt", "non-finite"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clean_message(name, trained, tmp_path, request):
    script, make_args, expected = CASES[name]
    if "real" in name:
        request.getfixturevalue("real_dir")
    ctx = Ctx(tmp_path, trained)  # kept: a case may hold a lock through it while the script runs
    args = make_args(ctx, trained)
    code, out = run_cli(script, *args)
    ctx.release()
    assert code == 2, f"exit {code}:\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "ERROR" in line or line.startswith("  ")]
    for text in expected:
        assert text in out, f"{text!r} not in the message:\n{out}"
    assert errors, out


def test_at_least_sixty_cases_over_every_script():
    scripts = {s for s, _, _ in CASES.values()}
    assert len(CASES) >= 60
    assert scripts == {"train", "preprocess", "make_folds", "oof_tune", "predict",
                       "validate_submission", "make_synthetic", "demo"}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# real DICOM bytes, broken
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("truncated.dcm", lambda b: b[: len(b) // 3], "truncated"),
        ("empty.dcm", lambda b: b"", "empty.dcm"),
        ("png_as.dcm", lambda b: b"\x89PNG\r\n\x1a\n" + bytes(64), "png_as.dcm"),
    ],
)
def test_broken_real_dicom_for_predict(name, content, expected, trained, real_dir, tmp_path):
    ctx = Ctx(tmp_path, trained)
    ctx.copy_runs(trained)
    bad = _stage2(real_dir, ctx, name, content)
    code, out = run_cli("predict", "--config", DEMO, *ctx.over, "--image", str(bad))
    assert code == 2 and "Traceback" not in out, out
    assert expected in out, out


def test_one_bad_image_keeps_the_good_ones(trained, real_dir, tmp_path):
    """--image a --image b --image bad: a and b are predicted and written, bad is listed, exit 1."""
    ctx = Ctx(tmp_path, trained)
    ctx.copy_runs(trained)
    good = [_stage2(real_dir, ctx, n) for n in ("a.dcm", "b.dcm")]
    bad = ctx.file("bad.dcm", "not a dicom")
    over = ctx.tmp / "overlays"
    code, out = run_cli("predict", "--config", DEMO, *ctx.over, "--image", str(good[0]),
                        "--image", str(good[1]), "--image", str(bad), "--overlay", str(over))  # fmt: skip
    assert code == 1 and "Traceback" not in out, out
    assert "a," in out and "b," in out and "1 of 3 image(s) could not be read" in out
    assert str(bad) in out
    assert sorted(p.name for p in over.glob("*.png")) == ["a.png", "b.png"]


# --------------------------------------------------------------------------------------------------
# the real entry points (subprocesses): same message and code, and --debug shows the traceback
# --------------------------------------------------------------------------------------------------
def _subprocess(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "src" / f"{script}.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "script,args,expected",
    [
        ("train", ["--config", DEMO, "train.top_k=0"], "train.top_k"),
        ("preprocess", ["--config", DEMO, "model.arch=nope"], "model.arch"),
        ("oof_tune", ["--config", DEMO, "train.out_dir=/nonexistent-runs"], "fold(s) [0, 1, 2]"),
        ("validate_submission", ["/nonexistent.csv"], "not found"),
    ],
)
def test_entry_points_exit_2_without_traceback(script, args, expected):
    proc = _subprocess(script, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert expected in proc.stderr


def test_debug_flag_shows_the_traceback():
    proc = _subprocess("train", "--config", DEMO, "train.top_k=0", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
