"""Choose the ensemble on out-of-fold predictions -> ``runs/<exp>/ensemble.yaml`` (+ its tuning).

    python src/select_ensemble.py --config C [select.candidates=[demo,maskrcnn_demo]] [--force]

Greedy forward selection with replacement (Caruana et al., 2004) over the OOF maps of the
``select.candidates`` experiments: start from the best single one, repeatedly add the member
whose addition most improves the mean OOF Dice after the post-processing search, stop when
nothing improves. The candidates must share folds, OOF size and TTA. With ``select.nested`` the
selection and tuning are also repeated leaving each fold out, and the held-out score is printed
beside the plain (optimistic) one, for the blend and for each candidate alone. Writes the chosen
blend's ``postprocess.yaml`` (and report) and ``ensemble.yaml`` under the config's own ``exp``;
``predict.py --config C --submission`` then predicts that ensemble. Exit status: 0 ok; 2 a user
error, with a message saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pneumoseg.cli import add_jobs, config_from_args, make_parser, run, setup_logging

log = logging.getLogger("select_ensemble")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "select.candidates=[demo,maskrcnn_demo]")
    ap.add_argument("--force", action="store_true", help="replace ensemble.yaml (and its tuning)")
    add_jobs(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.ensembling.run import select_ensemble

    result = select_ensemble(config_from_args(args), force=args.force, jobs=args.jobs)
    rows = [f"{'':28s} {'CV Dice':>8s} {'nested':>8s}"]
    for name, dice in result.singles.items():
        nested = result.nested_singles.get(name)
        rows.append(f"{name + ' alone':28s} {dice:8.4f} {_f(nested)}")
    blend = " + ".join(f"{n} {w:.3g}" for n, w in result.members)
    nested = None if result.nested is None else result.nested.dice
    rows.append(f"{'selected blend':28s} {result.selection.score:8.4f} {_f(nested)}")
    log.info("candidates and the selection (mean OOF Dice after tuning):\n%s", "\n".join(rows))
    log.info("selected: %s -> %s (post-processing: %s)", blend, result.path,
             result.tuned.setting)  # fmt: skip
    return 0


def _f(x: float | None) -> str:
    return f"{x:8.4f}" if x is not None else f"{'-':>8s}"


if __name__ == "__main__":
    sys.exit(run(main))
