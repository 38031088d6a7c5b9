"""The whole pipeline on the built-in synthetic dataset: ``make demo`` (or ``python src/demo.py``).

Runs each stage's real command line, exactly as a user would on the Kaggle data:
make_synthetic -> preprocess -> make_folds -> train (every fold) -> oof_tune -> predict
-> validate_submission, then scores the submission against the synthetic test truth and prints a
summary (CV Dice per fold, the tuned post-processing, submission Dice, wall time per stage).

Re-running continues where it stopped: the dataset, cache and folds are reused, finished folds are
skipped and an interrupted fold resumes from its ``last.pt``. ``--fresh`` removes the demo's
outputs first, ``--clean`` (``make clean-demo``) removes them and stops. Before anything runs or
is removed, every output is checked to be the demo's (``pneumoseg.demo.outputs``): a data folder
without the synthetic generator's marker, a run trained on other data, a submission of other
ids... are refused (exit 2), and nothing is deleted. Subprocesses run only this
repository's own scripts, with ``sys.executable`` and a fixed argv (hence the ``nosec`` marks).
"""

from __future__ import annotations

import argparse
import logging
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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config",
        default=CONFIG,
        help=f"demo config (default {CONFIG}); a blend "
        "config (predict.experiments) tunes and predicts its trained members",
    )
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--fresh", action="store_true", help="remove the demo's outputs first")
    what.add_argument(
        "--clean", action="store_true", help="remove the demo's outputs and stop (make clean-demo)"
    )
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=60)
    add_debug(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from pneumoseg.config import load_config
    from pneumoseg.demo.outputs import check, demo_outputs, remove
    from pneumoseg.inference.ensemble import experiment_list

    cfg = load_config(REPO / args.config)
    members = experiment_list(cfg)
    outs = demo_outputs(cfg, REPO, [exp for exp, _ in members], planned_set(args))
    # Every output is checked to be the demo's before anything runs or goes (a config may point
    # data.root at a real Kaggle folder, or train.out_dir at another experiment's results).
    mode = "clean" if args.clean else "fresh" if args.fresh else "run"
    check(outs, mode)
    if mode != "run":
        gone = remove(outs)
        log.info(
            "removed %d output(s) of the demo (a user's files among them were kept)", len(gone)
        )
        if mode == "clean":
            return 0
    run_pipeline(args, cfg, members, outs.root)
    return 0


def planned_set(args: argparse.Namespace) -> dict:
    """The synthetic set's plan the demo generates: its sizes, the generator's other defaults."""
    import inspect

    from pneumoseg.data.synthetic import PLAN_KEYS, write_dataset

    defaults = {k: p.default for k, p in inspect.signature(write_dataset).parameters.items()}
    plan = {**defaults, "n_train": args.n_train, "n_test": args.n_test}
    return {k: plan[k] for k in PLAN_KEYS}


def run_pipeline(args: argparse.Namespace, cfg: dict, members, root: Path) -> None:
    from pneumoseg.data.synthetic import INFO

    config = args.config
    blend = members != [(cfg["exp"], 1.0)]
    runs = REPO / cfg["train"]["out_dir"] / cfg["exp"]
    sub = REPO / cfg["predict"]["out_dir"] / f"{cfg['exp']}.csv"
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    if not (root / INFO).is_file():
        # --force only rebuilds the generator's own folder (checked above), around a user's files
        again = ["--force"] if root.is_dir() and any(root.iterdir()) else []
        run_stage("synthetic data", "make_synthetic", "--out", str(root),
                  "--n-train", str(args.n_train), "--n-test", str(args.n_test),
                  "--size", str(cfg["data"]["original_size"]), *again, timings=timings)  # fmt: skip
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
    # The checks above found runs/<exp> and the submission to be the demo's: it may replace them.
    run_stage("tune", "oof_tune", "--config", config, "--force", timings=timings)
    run_stage("predict", "predict", "--config", config, "--submission", "--force", timings=timings)
    sample = root / cfg["data"]["sample_submission"]
    run_stage("validate", "validate_submission", str(sub), "--sample", str(sample),
              "--shape", str(cfg["data"]["original_size"]), timings=timings)  # fmt: skip
    timings["total"] = time.perf_counter() - t_all
    summary(cfg, root, runs, sub, timings)


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


def shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it (the demo's own layout)."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def summary(cfg: dict, root: Path, runs: Path, sub: Path, timings: dict) -> None:
    import pandas as pd
    import yaml

    from pneumoseg.inference.submission import score_submission
    from pneumoseg.postprocessing.postprocess import PARAM_KEYS

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
    lines.append(f"Tuned post-processing ({shown(runs / 'postprocess.yaml')}): {setting}")
    lines.append(
        f"Submission {shown(sub)} vs the synthetic test truth ({scores['n']} images): "
        f"mean Dice {scores['dice']:.4f} (all-empty baseline {empty_baseline:.4f}), "
        f"Dice on positives {scores['pos_dice']:.4f}"
    )
    lines.append("Wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    lines.append(f"Machine: {machine()} (numbers reproduce bit for bit on the same machine only)")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run(main))
