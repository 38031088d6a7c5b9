"""CPU runtimes of exported models against torch: seconds per image, agreement, and the targets of
issue 18.

    python benchmarks/bench_runtime.py [--folds 1 5] [--n-images 4] [--threads 2]
                                       [--images ../shared/data/siim-real/stage2_test] [--no-demo]
                                       [--r34-int8 onnxruntime openvino] [--rounds 5]
                                       [--trained-r34 EPOCHS]

Setups:

* ``r34 x<k>``: ``k`` untrained ResNet34 U-Nets at 512 px (configs/r34_unet_512.yaml; the
  weights do not change the timing) exported with ``pneumoseg.inference.export.export_experiments``
  and checked, calibrated and timed on ``--n-images`` real SIIM DICOMs (1024², decoded and
  resized to 512 outside the timing);
* ``demo``: the demo experiment (``make demo`` first: 3 trained ResNet18 U-Nets at 128 px),
  copied to a temporary folder and exported there (``runs/demo`` is not touched), checked on its
  own cached training images (8 compared and timed, 16 others calibrating int8). Its masks are
  those of a trained model: the reduced-precision Dice target is judged here;
* ``r34 trained`` (``--trained-r34 EPOCHS``, after ``make demo``): a ResNet34 U-Net with
  r34_unet_512's layers trained from scratch for EPOCHS short epochs on fold 0 of the demo's
  synthetic set at 256 px (about 45 s an epoch here), exported, checked and calibrated on its own
  cached images at 256, and timed at 512 on the real DICOMs: the int8 speed of a trained
  ResNet34, whose NNCF model is not the untrained one's (see below).

OpenVINO's int8 models are NNCF's, with accuracy control: the operations whose int8 costs the most
agreement go back to fp32 until the calibration images' masks agree with fp32 (Dice >= 0.995);
how many per fold is printed after the table. For the untrained r34 models, whose probabilities
sit around 0.5, that agreement (at 0.5) is a demanding, weight-dependent target, so their int8
speed is that of the model NNCF made for those weights. ``--r34-int8 onnxruntime`` (the r34
setups' ``export.int8``) leaves NNCF out there: 8 minutes per untrained 512-px model here.

Every setup runs the export's own runtime check (``pneumoseg.inference.export_checks``): the fold
ensemble with hflip TTA (each image and its mirror), ``--threads`` threads, through torch fp32
NCHW (the reference), torch fp32 channels_last, torch bf16 autocast channels_last (today's default
where the CPU has native bf16: ``predict.amp=auto``), ONNX Runtime fp32 / int8 and OpenVINO fp32 /
bf16 / int8 (its floating-point remainder in bf16 on such CPUs). The export times one row after
another; the table's timings are taken again here, interleaved: ``--rounds`` rounds after a
warm-up, each running every row once in turn, a row's s/image the median over rounds and its
speed-ups the medians of the ratios within a round (this shared machine has slow spells of
seconds that a row timed alone may or may not meet). Printed per row: s/image, speed-up
against today's default and against torch fp32 channels_last, max |Δp| against torch fp32, the
share of pixels on the same side of the threshold (the tuned one for the demo, 0.5 otherwise),
the Dice between the masks, and whether the row passed the export's check (fp32: max |Δp| <=
1e-4; bf16/int8: Dice >= 0.99). Run it on an otherwise idle machine: other load distorts these
ratios several-fold.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess  # nosec B404  (our own scripts, fixed argv)
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pneumoseg.config import load_config  # noqa: E402
from pneumoseg.inference import cpu  # noqa: E402
from pneumoseg.inference.export import cached_images, export_experiments  # noqa: E402
from pneumoseg.inference.export_checks import N_AGREE  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_serve import real_images, untrained_experiment  # noqa: E402

HEAD = (f"{'setup':11} {'runtime':11} {'precision':9} {'layout':13} {'s/image':>8} {'x default':>9} "
        f"{'x fp32 CL':>9} {'max|dp|':>8} {'same side':>9} {'Dice':>7}  check")  # fmt: skip


def rows_table(setup: str, rows: list[dict]) -> list[dict]:
    default = next(r for r in rows if r.get("amp_default") and r["runtime"] == "torch")
    fp32_cl = next(r for r in rows if r["runtime"] == "torch" and r.get("layout") == "channels_last"
                   and r["precision"] == "fp32")  # fmt: skip
    out = []
    for r in rows:
        if "s_per_image" not in r:
            print(f"{setup:11} {r['runtime']:11} {r['precision']:9} {'':13} {'-':>8}  {r['why']}")
            continue
        x_def, x_cl = ratio(default, r), ratio(fp32_cl, r)
        tag = " (today's default)" if r is default else ""
        print(f"{setup:11} {r['runtime']:11} {r['precision']:9} {r.get('layout', ''):13} "
              f"{r['s_per_image']:>8.4f} {x_def:>8.2f}x {x_cl:>8.2f}x {r['max_abs_dp']:>8.1e} "
              f"{100 * r['same_side']:>8.3f}% {r['dice']:>7.4f}  "
              f"{'ok' if r['passed'] else 'failed'}{tag}"
              f"{'; ' + r['note'] if r.get('note') else ''}", flush=True)  # fmt: skip
        out.append({**r, "x_default": x_def, "x_fp32_cl": x_cl})
    return out


def ratio(base: dict, row: dict) -> float:
    """How many times faster ``row`` ran than ``base``: the median of the per-round ratios, or
    (a row the export alone timed) the ratio of the export's timings."""
    if row.get("rounds") is None:
        return base["export_s"] / row["s_per_image"]
    return float(np.median(np.divide(base["rounds"], row["rounds"])))


def r34_setup(tmp: Path, folds: int, images: np.ndarray, threads: int, int8: list[str],
              rounds: int) -> tuple[list, str]:  # fmt: skip
    argv = untrained_experiment(tmp / f"r34x{folds}", folds)
    over = [*argv[2:], f"predict.threads={threads}", "predict.amp=auto",
            f"export.int8=[{','.join(int8)}]"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "r34_unet_512.yaml", over)
    (result,) = export_experiments(cfg, force=True, images=images)
    return measured(f"r34 x{folds}", cfg, result, images[:N_AGREE], rounds)


def demo_setup(tmp: Path, threads: int, rounds: int) -> tuple[list, str] | None:
    src = REPO / "runs" / "demo"
    if not list(src.glob("fold*/model.pt")):
        print("demo: no runs/demo models (run `make demo` first): skipped")
        return None
    runs = tmp / "demo_runs"
    shutil.copytree(src, runs / "demo", ignore=shutil.ignore_patterns("export", "*.lock"))
    over = [f"train.out_dir={runs}", f"predict.threads={threads}", "predict.amp=auto"]
    cfg = load_config(REPO / "configs" / "demo.yaml", over)
    (result,) = export_experiments(cfg, force=True)
    return measured("demo", cfg, result, cached_images(cfg, N_AGREE), rounds)


def trained_r34_setup(tmp: Path, images: np.ndarray, threads: int, rounds: int,
                      epochs: int) -> tuple[list, str] | None:  # fmt: skip
    """``r34 trained``: a ResNet34 U-Net (r34_unet_512's: smp's default decoder, no ImageNet
    weights here) trained ``epochs`` short epochs on fold 0 of the demo's synthetic set at 256,
    exported, checked and calibrated on its own cached images (its agreement is that of a trained
    model on its own kind of image), then timed at 512 on the real DICOMs."""
    if not (REPO / "folds" / "demo_folds.csv").is_file():
        print("r34 trained: no demo data set (run `make demo` first): skipped")
        return None
    over = [f"cache.dir={tmp / 'cache'}", "cache.size=256", "oof.size=256", "exp=r34t",
            "model.encoder=resnet34", "model.decoder_channels=null",
            f"train.out_dir={tmp / 'runs'}", f"train.epochs={epochs}", "train.top_k=1"]  # fmt: skip
    log = tmp / "r34t.log"
    for script, extra in [("preprocess.py", []), ("train.py", ["--fold", "0"])]:
        argv = [sys.executable, str(REPO / "src" / script), "--config", "configs/demo.yaml"]
        with log.open("a") as out:
            done = subprocess.run([*argv, *extra, *over], cwd=REPO, stdout=out, stderr=out)  # nosec B603
        if done.returncode:
            sys.exit(f"r34 trained: {script} failed (exit {done.returncode}); see {log}")
    cfg = load_config(REPO / "configs" / "demo.yaml", [*over, "predict.folds=[0]",
                      f"predict.threads={threads}", "predict.amp=auto"])  # fmt: skip
    (result,) = export_experiments(cfg, force=True)
    return measured("r34 trained", cfg, result, images[:N_AGREE], rounds, export_timing=False)


def measured(setup: str, cfg, result, images: np.ndarray, rounds: int,
             export_timing: bool = True) -> tuple[list[dict], str]:  # fmt: skip
    """The export's rows timed again interleaved (:func:`interleaved`), and what NNCF's accuracy
    control put back in fp32. ``export_timing``: a row the export alone timed (its model not
    kept) keeps that timing (False: the export timed other images than ``images``)."""
    manifest = result.manifest
    ov = manifest["int8"].get("openvino", {})
    reverted = ", ".join(r.get("reverted", "?") for r in ov.get("folds", [])) or ov.get("why")
    note = f"  {setup}: OpenVINO int8 operations back in fp32 per fold: {reverted}"
    return interleaved(cfg, result, images, rounds, export_timing), note


def interleaved(cfg, result, images: np.ndarray, rounds: int, export_timing: bool) -> list[dict]:
    """Every row the export measured that can run again (its model kept) timed again in
    ``rounds`` rounds, each running every row once in turn: a row's s/image is its median over
    the rounds, and its ratios (``x_default``, ``x_fp32_cl``) the medians of the ratios within
    each round. The export's check times one row after another, so a slow spell of this shared
    machine (it slowed every row 1.5x for a few seconds here) lands on some rows alone; within a
    round it slows all rows alike. Agreement figures are the export's (the same models, inputs
    and arithmetic)."""
    tta = list(cfg["predict"].get("tta") or [])
    runs = row_runners(cfg, result, images, tta)
    times: dict[int, list[float]] = {i: [] for i in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in tqdm(range(rounds), desc=f"{result.exp}: interleaved rounds", leave=False):
        for i, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) / len(images))
    rows = []
    for i, r in enumerate(result.manifest["runtimes"]["measured"]):
        if i in times:
            r = {**r, "s_per_image": float(np.median(times[i])), "rounds": times[i],
                 "export_s": r["s_per_image"]}  # fmt: skip
        elif "s_per_image" in r and export_timing:  # a model not kept: the export's one timing
            r = {**r, "rounds": None, "note": "export's timing (model not kept)"}
        elif "s_per_image" in r:
            r = {k: v for k, v in r.items() if k != "s_per_image"}
            r["why"] = r.get("why") or f"its model was not kept (check Dice {r['dice']:.4f})"
        rows.append(r)
    return rows


def row_runners(cfg, result, images: np.ndarray, tta: list) -> dict[int, Callable[[], object]]:
    """For each measured row that can run again, a call that predicts ``images`` that way."""
    from pneumoseg.inference.ensemble import load_models, predict_probs
    from pneumoseg.inference.runtime import ExportedMember, open_session, predict_probs_np
    from pneumoseg.training.engine import inference_dtype

    one = {**cfg, "predict": {**cfg["predict"], "experiments": [[result.exp, 1.0]]}}
    nchw, cl = load_models(one, "cpu", channels_last=False), load_models(one, "cpu")
    dev = torch.device("cpu")
    dtype = inference_dtype(dev, cfg["predict"]["amp"])
    man = result.manifest
    files = {"fp32": [result.folder / f["file"] for f in man["folds"]]}
    runs: dict[int, Callable[[], object]] = {}
    for i, r in enumerate(man["runtimes"]["measured"]):
        if r["runtime"] == "torch":
            ms, dt = (
                (nchw, None)
                if r.get("layout") == "NCHW"
                else (cl, dtype if r["precision"] != "fp32" else None)
            )
            runs[i] = functools.partial(predict_probs, ms, images, tta, dev, dt,
                                        channels_last=ms is cl)  # fmt: skip
            continue
        paths = (
            files["fp32"]
            if r["precision"] != "int8"
            else [result.folder / f["file"] for f in man["int8"][r["runtime"]].get("folds", [])]
        )
        if "s_per_image" not in r or not paths or not all(p.exists() for p in paths):
            continue
        members = [ExportedMember(open_session(p, r["runtime"], r["precision"],
                                               cfg["predict"].get("threads")),
                                  m.weight, man["input"]["channels"], p.name)
                   for p, m in zip(paths, nchw, strict=True)]  # fmt: skip
        runs[i] = functools.partial(predict_probs_np, members, images, tta)
    return runs


def summary(tables: dict[str, list[dict]], notes: list[str]) -> None:
    print("\nint8 (NNCF accuracy control, calibration masks vs fp32 at Dice >= 0.995):")
    print("\n".join(notes))
    print("\ntargets:")
    for setup, rows in tables.items():
        if setup == "demo":
            continue
        fp32 = [r for r in rows if r["runtime"] != "torch" and r["precision"] == "fp32"]
        best_fp32 = max(fp32, key=lambda r: r["x_fp32_cl"])
        print(f"  {setup}: fastest fp32 export {best_fp32['runtime']} {best_fp32['x_fp32_cl']:.2f}x "
              f"torch fp32 channels_last at max |dp| {best_fp32['max_abs_dp']:.1e} "
              f"(target >= 1.3x at <= 1e-4)")  # fmt: skip
        trusted = {(r["runtime"], r["precision"]) for r in tables.get("demo", []) if r["passed"]}
        ok = [r for r in rows if (r["runtime"], r["precision"]) in trusted or
              (r["precision"] == "fp32" and r["passed"])]  # fmt: skip
        best = max(ok, key=lambda r: r["x_default"])
        print(
            f"  {setup}: fastest that passed on the trained demo: {best['runtime']} "
            f"{best['precision']} {best['x_default']:.2f}x today's default (target >= 2x)"
        )
    for r in tables.get("demo", []):
        if r["precision"] in ("bf16", "int8"):
            print(
                f"  demo: {r['runtime']} {r['precision']} masks vs fp32 Dice {r['dice']:.4f} "
                f"(target >= 0.99): {'ok' if r['dice'] >= 0.99 else 'missed'}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, nargs="*", default=[1, 5])
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=Path,
                    default=REPO.parent / "shared" / "data" / "siim-real" / "stage2_test")  # fmt: skip
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 1)")
    ap.add_argument("--trained-r34", type=int, default=0, metavar="EPOCHS",
                    help="also train a ResNet34 U-Net this many short epochs (0: not)")  # fmt: skip
    ap.add_argument("--r34-int8", nargs="*", choices=["onnxruntime", "openvino"],
                    default=["onnxruntime", "openvino"], help="the r34 setups' export.int8")  # fmt: skip
    args = ap.parse_args()
    if min(args.rounds, args.threads, args.n_images) < 1 or args.trained_r34 < 0:
        ap.error("--rounds, --threads and --n-images must be at least 1, --trained-r34 at least 0")
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    print(f"CPU: {cpu.describe()}; {os.cpu_count()} CPUs, {args.threads} threads; torch "
          f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino "
          f"{openvino.__version__}")  # fmt: skip
    images = real_images(args.images, args.n_images, 512)
    print(HEAD)
    tables, notes = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        demo = functools.partial(demo_setup, Path(tmp), args.threads, args.rounds)
        setups = [] if args.no_demo else [("demo", demo)]
        setups += [(f"r34 x{k}", functools.partial(r34_setup, Path(tmp), k, images, args.threads,
                                                   args.r34_int8, args.rounds))
                   for k in args.folds]  # fmt: skip
        if args.trained_r34:
            trained = functools.partial(trained_r34_setup, Path(tmp), images, args.threads,
                                        args.rounds, args.trained_r34)  # fmt: skip
            setups.append(("r34 trained", trained))
        for setup, measure in setups:  # one setup at a time; its rows interleaved
            result = measure()
            if result is not None:
                tables[setup] = rows_table(setup, result[0])
                notes.append(result[1])
    summary(tables, notes)


if __name__ == "__main__":
    main()
