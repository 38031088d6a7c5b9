"""The whole pipeline on the built-in synthetic dataset in one call: :func:`run_demo`.

Runs each stage's real command line, exactly as a user would on the Kaggle data:
make_synthetic -> preprocess -> make_folds -> train (every fold) -> oof_tune -> predict
-> validate_submission, then scores the submission against the synthetic test truth and returns
a :class:`DemoResult` (CV Dice per fold, the tuned post-processing, submission Dice, wall time
per stage); :meth:`DemoResult.summary` is the text ``make demo`` prints.

Re-running continues where it stopped: the dataset, cache and folds are reused, finished folds are
skipped and an interrupted fold resumes from its ``last.pt``. ``fresh`` removes the demo's outputs
first, ``clean`` removes them and stops. Before anything runs or is removed, every output is
checked to be the demo's (:mod:`pneumoseg.demo.outputs`): a data folder without the synthetic
generator's marker, a run trained on other data, a submission of other ids... are refused
(:class:`~pneumoseg.errors.OutputExistsError`, exit 2 in the script), and nothing is deleted.
Subprocesses run only this repository's own scripts (``src/<stage>.py`` of the checkout this
package is installed from, in editable mode), with ``sys.executable`` and a fixed argv (hence the
``nosec`` marks); relative paths of the config are relative to the repository, like the stages'
working directory.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess  # nosec B404
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.errors import UserError

log = logging.getLogger(
    "pneumoseg.demo"
)  # the package's name: the demo's lines read "pneumoseg.demo"

REPO = Path(__file__).resolve().parents[3]  # src/pneumoseg/demo/run.py -> the repository


@dataclass
class DemoResult:
    """What one :func:`run_demo` call did and, when the pipeline ran (:attr:`ran`), its numbers."""

    mode: str  # "run", "fresh" (outputs removed first) or "clean" (removed, nothing run)
    removed: list[str] = field(default_factory=list)  # the outputs removed first (fresh, clean)
    data: Path | None = None  # the synthetic set (data.root)
    runs: Path | None = None  # runs/<exp>: the folds' runs, OOF report and tuning
    submission: Path | None = None  # the submission CSV
    # mean OOF Dice: a row per reported post-processing setting ("name (params)"), a column per fold
    oof: Any = None  # pandas.DataFrame
    tuned: dict[str, Any] | None = None  # the tuned post-processing (postprocess.yaml), cv_dice too
    scores: dict[str, Any] | None = None  # the submission vs the test truth (score_submission)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage, and "total"
    machine: str = ""  # what decides the float results on a CPU
    report: str = ""  # the OOF report's headline (runs/<exp>/report/metrics.json), when written

    @property
    def ran(self) -> bool:
        """The pipeline ran (not ``clean``): the numbers are there."""
        return self.scores is not None

    @property
    def tuning(self) -> Path | None:
        """The tuned post-processing file (runs/<exp>/postprocess.yaml)."""
        return None if self.runs is None else self.runs / "postprocess.yaml"

    @property
    def empty_baseline(self) -> float:
        """The mean Dice of predicting nothing: 1 on each truly empty image, 0 on the others."""
        if self.scores is None:
            raise ValueError(f"the demo ran no pipeline ({self.mode}): there are no scores")
        return (self.scores["n"] - self.scores["n_pos"]) / max(1, self.scores["n"])

    def tuned_setting(self) -> str:
        """The tuned setting as ``key=value, ...`` (its unset keys left out)."""
        from pneumoseg.postprocessing.postprocess import PARAM_KEYS

        params = self.tuned or {}
        keys = (*PARAM_KEYS, "cv_dice")
        return ", ".join(f"{k}={params[k]}" for k in keys if params.get(k) is not None)

    def summary(self) -> str:
        """The summary ``make demo`` prints (its first line is empty)."""
        if not self.ran:
            raise ValueError(f"the demo ran no pipeline ({self.mode}): there is no summary")
        scores = self.scores
        lines = ["", "=" * 72, "pneumoseg demo: summary", "=" * 72]
        lines.append("Out-of-fold mean Dice per fold (all-empty = predict nothing anywhere):")
        lines.append(self.oof.to_string(float_format=lambda v: f"{v:.4f}"))
        lines.append(f"Tuned post-processing ({shown(self.tuning)}): {self.tuned_setting()}")
        if self.report and self.runs is not None:
            lines.append(
                f"OOF report ({shown(self.runs / 'report' / 'report.html')}): {self.report}"
            )
        lines.append(
            f"Submission {shown(self.submission)} vs the synthetic test truth ({scores['n']} images): "
            f"mean Dice {scores['dice']:.4f} (all-empty baseline {self.empty_baseline:.4f}), "
            f"Dice on positives {scores['pos_dice']:.4f}"
        )
        lines.append(
            "Wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
        )
        lines.append(
            f"Machine: {self.machine} (numbers reproduce bit for bit on the same machine only)"
        )
        return "\n".join(lines)


def run_demo(
    cfg: Mapping[str, Any] | str | Path,
    n_train: int = 300,
    n_test: int = 60,
    fresh: bool = False,
    clean: bool = False,
) -> DemoResult:
    """Run the whole pipeline on a synthetic set of ``n_train`` + ``n_test`` images.

    ``cfg`` is a demo experiment file (relative to the repository, e.g. ``configs/demo.yaml``;
    the stages get it as their ``--config``) or a loaded config (:func:`pneumoseg.config.
    load_config`, overrides included; the stages get it written to a temporary file). A blend
    config (``predict.experiments``) tunes and predicts its members, trained by their own demos.
    ``fresh`` removes the demo's outputs first; ``clean`` removes them and runs nothing.

    Raises :class:`~pneumoseg.errors.UserError` (an output that is not the demo's, a failed
    stage: finished stages are kept and skipped by the next call).
    """
    from pneumoseg.config import blend_members
    from pneumoseg.demo.outputs import check, demo_outputs, remove

    if not (REPO / "src" / "demo.py").is_file():
        raise UserError(
            f"the demo runs the pipeline's scripts (src/*.py) of the repository, not found in {REPO}"
            ": install pneumoseg from its checkout (pip install -e .)"
        )
    with _stage_config(cfg) as (cfg, config):
        members = blend_members(cfg)
        planned = planned_set(n_train, n_test)
        outs = demo_outputs(cfg, REPO, [exp for exp, _ in members], planned)
        # Every output is checked to be the demo's before anything runs or goes (a config may
        # point data.root at a real Kaggle folder, or train.out_dir at another experiment's
        # results).
        mode = "clean" if clean else "fresh" if fresh else "run"
        check(outs, mode)
        removed: list[str] = []
        if mode != "run":
            removed = remove(outs)
            log.info(
                "removed %d output(s) of the demo (a user's files among them were kept)",
                len(removed),
            )
            if mode == "clean":
                return DemoResult(mode, removed)
        runs, sub, timings = _run_pipeline(config, cfg, members, outs.root, n_train, n_test)
        return _result(mode, removed, cfg, outs.root, runs, sub, timings)


@contextlib.contextmanager
def _stage_config(cfg: Mapping[str, Any] | str | Path) -> Iterator[tuple[Mapping[str, Any], str]]:
    """``(config, the --config the stages get)``: a file as given (loaded relative to the
    repository), a loaded config written to a temporary file for as long as the demo runs."""
    from pneumoseg.config import load_config, save_config

    if isinstance(cfg, str | Path):
        yield load_config(REPO / cfg), str(cfg)
        return
    with tempfile.TemporaryDirectory(prefix="pneumoseg-demo-") as tmp:
        yield cfg, str(save_config(cfg, Path(tmp) / f"{cfg['exp']}.yaml"))


def run_stage(stage: str, script: str, *args: str, timings: dict) -> None:
    """Run ``python src/<script>.py args`` in the repository; its wall time adds to ``timings``."""
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


def planned_set(n_train: int, n_test: int) -> dict:
    """The synthetic set's plan the demo generates: its sizes, the generator's other defaults."""
    import inspect

    from pneumoseg.data.synthetic import PLAN_KEYS, write_dataset

    defaults = {k: p.default for k, p in inspect.signature(write_dataset).parameters.items()}
    plan = {**defaults, "n_train": n_train, "n_test": n_test}
    return {k: plan[k] for k in PLAN_KEYS}


def _run_pipeline(
    config: str, cfg: Mapping, members, root: Path, n_train: int, n_test: int
) -> tuple[Path, Path, dict[str, float]]:
    """Every stage, in order, skipping what is done -> ``(runs/<exp>, submission, timings)``."""
    from pneumoseg.data.synthetic import INFO

    blend = members != [(cfg["exp"], 1.0)]
    runs = REPO / cfg["train"]["out_dir"] / cfg["exp"]
    sub = REPO / cfg["predict"]["out_dir"] / f"{cfg['exp']}.csv"
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    if not (root / INFO).is_file():
        # --force only rebuilds the generator's own folder (checked above), around a user's files
        again = ["--force"] if root.is_dir() and any(root.iterdir()) else []
        run_stage("synthetic data", "make_synthetic", "--out", str(root),
                  "--n-train", str(n_train), "--n-test", str(n_test),
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
    return runs, sub, timings


def check_members(cfg: Mapping, members) -> None:
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


def _result(
    mode: str,
    removed: list[str],
    cfg: Mapping,
    root: Path,
    runs: Path,
    sub: Path,
    timings: dict[str, float],
) -> DemoResult:
    """Score the submission against the synthetic test truth and read the OOF report and the
    tuned setting the stages wrote."""
    import pandas as pd
    import yaml

    from pneumoseg.inference.submission import score_submission

    size = int(cfg["data"]["original_size"])
    truth_csv = root / cfg["data"]["test_rle_csv"]
    scores = score_submission(sub, truth_csv, (size, size))
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
    return DemoResult(mode, removed, root, runs, sub, oof=table, tuned=params, scores=scores,
                      timings=timings, machine=machine(), report=_report_line(runs))  # fmt: skip


def _report_line(runs: Path) -> str:
    """The headline of the tuning's report (``report/metrics.json``), '' when there is none."""
    import json

    from pneumoseg.evaluation.cv_report import headline

    path = runs / "report" / "metrics.json"
    if not path.is_file():
        return ""
    try:
        return headline(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        log.warning("%s is damaged: re-run the tuning (oof_tune.py --force)", path)
        return ""


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
