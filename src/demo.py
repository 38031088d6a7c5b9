"""The whole pipeline on the built-in synthetic dataset: ``make demo`` (or ``python src/demo.py``).

Runs each stage's real command line, exactly as a user would on the Kaggle data:
make_synthetic -> preprocess -> make_folds -> train (every fold) -> oof_tune -> predict
-> validate_submission, then scores the submission against the synthetic test truth and prints a
summary (CV Dice per fold, the tuned post-processing, submission Dice, wall time per stage).

Re-running continues where it stopped: the dataset, cache and folds are reused, finished folds are
skipped and an interrupted fold resumes from its ``last.pt``. ``--fresh`` removes the demo's
outputs first (the outputs of ``make demo`` only; nothing else). Subprocesses run only this
repository's own scripts, with ``sys.executable`` and a fixed argv (hence the ``nosec`` marks).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess  # nosec B404
import sys
import time
from pathlib import Path

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE)
from pneumoseg.cli import add_debug, run
from pneumoseg.errors import UserError

log = logging.getLogger("pneumoseg.demo")

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"


def run_stage(stage: str, script: str, *args: str, timings: dict) -> None:
    cmd = [sys.executable, str(REPO / "src" / f"{script}.py"), *args]
    log.info("==> %s: %s", stage, " ".join(["python", f"src/{script}.py", *args]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False)  # nosec B603
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(
            f"demo: stage '{stage}' failed (exit {proc.returncode}); fix it and "
            "re-run `make demo`: finished stages are skipped"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config",
        default=CONFIG,
        help=f"demo config (default {CONFIG}); a blend "
        "config (predict.experiments) tunes and predicts its trained members",
    )
    ap.add_argument("--fresh", action="store_true", help="remove the demo's outputs first")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=60)
    add_debug(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from pneumoseg.config import load_config
    from pneumoseg.inference import experiment_list

    config = args.config
    cfg = load_config(REPO / config)
    members = experiment_list(cfg)
    blend = members != [(cfg["exp"], 1.0)]
    root = REPO / cfg["data"]["root"]
    runs = REPO / cfg["train"]["out_dir"] / cfg["exp"]
    sub = REPO / cfg["predict"]["out_dir"] / f"{cfg['exp']}.csv"
    if args.fresh:
        for p in (
            root,
            runs,
            REPO / cfg["folds"]["file"],
            sub,
            *(REPO / "cache").glob("synthetic*"),
        ):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    if not (root / "synthetic_info.json").is_file():
        run_stage(
            "synthetic data",
            "make_synthetic",
            "--out",
            str(root),
            "--n-train",
            str(args.n_train),
            "--n-test",
            str(args.n_test),
            "--size",
            str(cfg["data"]["original_size"]),
            *(["--force"] if root.exists() else []),
            timings=timings,
        )
    run_stage("preprocess", "preprocess", "--config", config, "--split", "all", timings=timings)
    run_stage("folds", "make_folds", "--config", config, timings=timings)
    if blend:
        check_members(cfg, members)
    for k in range(0 if blend else int(cfg["folds"]["n_folds"])):
        fold = runs / f"fold{k}"
        if (fold / "model.pt").is_file() and (fold / "oof_ids.csv").is_file():
            log.info("fold %d already trained: %s", k, fold)
            continue
        resume = ["--resume"] if fold.exists() else []
        run_stage("train", "train", "--config", config, "--fold", str(k), *resume, timings=timings)
    # The demo owns runs/demo and submissions/demo.csv: it may replace its own earlier results.
    run_stage("tune", "oof_tune", "--config", config, "--force", timings=timings)
    run_stage("predict", "predict", "--config", config, "--submission", "--force", timings=timings)
    sample = root / cfg["data"]["sample_submission"]
    run_stage(
        "validate",
        "validate_submission",
        str(sub),
        "--sample",
        str(sample),
        "--shape",
        str(cfg["data"]["original_size"]),
        timings=timings,
    )
    timings["total"] = time.perf_counter() - t_all
    summary(cfg, root, runs, sub, timings)
    return 0


def check_members(cfg: dict, members) -> None:
    """A blend demo tunes and predicts experiments that their own demos trained."""
    out = REPO / cfg["train"]["out_dir"]
    for exp, _ in members:
        missing = [k for k in range(int(cfg["folds"]["n_folds"]))
                   if not (out / exp / f"fold{k}" / "model.pt").is_file()]  # fmt: skip
        if missing:
            raise UserError(
                f"blend member {exp!r} has no model for fold(s) {missing}: run its demo first "
                f"(python src/demo.py --config configs/{exp}.yaml)"
            )


def machine() -> str:
    """What decides the float results on a CPU: its kernels' instruction set and the threads."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, torch {torch.__version__} "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"
    )


def summary(cfg: dict, root: Path, runs: Path, sub: Path, timings: dict) -> None:
    import pandas as pd
    import yaml

    from pneumoseg.postprocess import PARAM_KEYS
    from pneumoseg.submission import score_submission

    size = int(cfg["data"]["original_size"])
    truth_csv = root / cfg["data"]["test_rle_csv"]
    scores = score_submission(sub, truth_csv, (size, size))
    # predicting nothing scores 1 on each truly empty image and 0 on the others
    empty_baseline = (scores["n"] - scores["n_pos"]) / max(1, scores["n"])
    report = pd.read_csv(runs / "oof_report.csv")
    params = yaml.safe_load((runs / "postprocess.yaml").read_text())

    # Mean competition Dice per fold of each reported setting (the chosen one is marked).
    table = report[report["fold"] != "all"].pivot_table(
        index="setting", columns="fold", values="dice", sort=False
    )
    table.index = [
        f"{name} ({report.loc[report['setting'] == name, 'params'].iloc[0]})"
        for name in table.index
    ]
    lines = ["", "=" * 72, "pneumoseg demo: summary", "=" * 72]
    lines.append("Out-of-fold mean Dice per fold (all-empty = predict nothing anywhere):")
    lines.append(table.to_string(float_format=lambda v: f"{v:.4f}"))
    keys = (*PARAM_KEYS, "cv_dice")
    setting = ", ".join(f"{k}={params[k]}" for k in keys if params.get(k) is not None)
    lines.append(f"Tuned post-processing ({runs.relative_to(REPO)}/postprocess.yaml): {setting}")
    lines.append(
        f"Submission {sub.relative_to(REPO)} vs the synthetic test truth ({scores['n']} images): "
        f"mean Dice {scores['dice']:.4f} (all-empty baseline {empty_baseline:.4f}), "
        f"Dice on positives {scores['pos_dice']:.4f}"
    )
    lines.append("Wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    lines.append(f"Machine: {machine()} (numbers reproduce bit for bit on the same machine only)")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run(main))
