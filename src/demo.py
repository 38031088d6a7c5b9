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
repository's own scripts, with ``sys.executable`` and a fixed argv.

The work is one library call, :func:`pneumoseg.demo.run_demo` (from a notebook too); this script
parses the arguments and prints the summary of the :class:`~pneumoseg.demo.DemoResult` it returns.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE)
from pneumoseg.cli import add_debug, run

CONFIG = "configs/demo.yaml"


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
    from pneumoseg.demo import run_demo

    # the config file as given (relative to the repository): the stages get it as their --config
    result = run_demo(args.config, n_train=args.n_train, n_test=args.n_test, fresh=args.fresh,
                      clean=args.clean)  # fmt: skip
    if result.ran:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
