"""Train one fold: ``python src/train.py --config configs/demo.yaml --fold 0 [key=value ...]``.

``--fold -1`` trains on every image (no validation, no OOF). Outputs go to
``runs/<exp>/fold<k>/`` (``full/`` for -1): ``config.yaml``, ``train.log``, ``log.csv``,
``curves.png``, ``checkpoints/epochNNN.pt`` (top-k by validation Dice), ``last.pt`` (resume point),
``model.pt`` (mean of the top-k weights), ``oof_*`` (out-of-fold probabilities).
The training loop itself is :func:`pneumoseg.training.fit.fit`.

``--resume`` continues from ``last.pt`` and refuses settings that differ from the run's (except
the keys in ``pneumoseg.training.fit.RESUME_SAFE_KEYS``). ``--force`` starts over and moves the old
run to a backup folder. Exit status: 0 ok, 2 a user error (message says what to do).

Multi-GPU: ``torchrun --nproc_per_node=N src/train.py --config ... --fold 0``.
"""

from __future__ import annotations

import argparse
import sys

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations loads)
from pneumoseg.cli import add_debug, config_from_args, run, setup_logging


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="experiment YAML merged over configs/base.yaml")
    ap.add_argument("--fold", type=int, default=0, help="validation fold; -1 trains on all data")
    ap.add_argument("--resume", action="store_true", help="continue from last.pt")
    ap.add_argument("--force", action="store_true", help="retrain into an existing run folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    add_debug(ap)
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    from pneumoseg.training.fit import fit

    fit(cfg, args.fold, resume=args.resume, force=args.force, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
