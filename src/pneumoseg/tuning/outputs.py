"""The tuning's files, written as one set: ``postprocess.yaml``, ``oof_report.csv``,
``oof_grid.csv`` and ``oof_grid.png``."""

from __future__ import annotations

import logging
from pathlib import Path

from pneumoseg.tuning.report import describe

log = logging.getLogger("oof_tune")

# the files a tuning replaces as one set (pneumoseg.io.replace_together)
TUNING_FILES = ("oof_report.csv", "oof_grid.csv", "oof_grid.png", "postprocess.yaml")


def plot_grid(results, best, path: Path, title: str) -> Path:
    """Heatmaps: Dice over threshold × min_area, and top_threshold × top_area at the best triplet's
    bottom threshold; the best cell of each marked."""
    from pneumoseg.visualize import plot_heatmaps

    panels = []
    gated = " (no gate)" if any(f.endswith("+gate") for f in best.index) else ""
    if "threshold" in best.index:
        sub = results[results["family"] == "threshold"]
        grid = sub.pivot_table(index="threshold", columns="min_area", values="dice", sort=True)
        b = best.loc["threshold"]
        panels.append((grid, (b["threshold"], b["min_area"]), "threshold", "min_area (px @1024²)",
                       f"threshold{gated}: best {describe(_params(b))}"))  # fmt: skip
    if "triplet" in best.index:
        b = best.loc["triplet"]
        sub = results[(results["family"] == "triplet")]
        sub = sub[sub["bottom_threshold"] == b["bottom_threshold"]]
        grid = sub.pivot_table(index="top_threshold", columns="top_area", values="dice", sort=True)
        panels.append((grid, (b["top_threshold"], b["top_area"]), "top_threshold",
                       "top_area (px @1024²)", f"triplet{gated} at the best bottom threshold: best {describe(_params(b))}"))  # fmt: skip
    return plot_heatmaps(panels, path, title, value_label="mean Dice (OOF)")


def _params(row) -> dict:
    from pneumoseg.postprocessing.postprocess import row_params

    return row_params(row.to_dict())


def check_existing(out: Path, params: dict, force: bool) -> None:
    """An existing ``postprocess.yaml`` that differs from ``params`` is replaced only with
    ``force``."""
    from pneumoseg.errors import OutputExistsError
    from pneumoseg.postprocessing.postprocess import ParamsError, load_params

    if not out.is_file():
        return
    try:
        same = load_params(out) == params
    except ParamsError:
        same = False
    if same:
        log.info("%s is already up to date", out)
    elif not force:
        raise OutputExistsError(
            f"{out} exists and differs from this tuning ({describe(params)}): pass --force "
            "to overwrite it"
        )
    else:
        log.warning("overwriting %s (--force)", out)


def write_outputs(exp_dir: Path, params: dict, table, results, best, force: bool,
                  title: str) -> dict[str, Path]:  # fmt: skip
    """Write the tuning's files as one set (:func:`pneumoseg.io.replace_together`): a kill at
    any moment leaves the old set or the new one. A different postprocess.yaml is replaced only
    with ``force``. Returns each file's path by name (:data:`TUNING_FILES`)."""
    from pneumoseg.io import replace_together
    from pneumoseg.postprocessing.postprocess import params_yaml

    check_existing(exp_dir / "postprocess.yaml", params, force)
    text = params_yaml(params)
    writers = {
        "oof_report.csv": lambda p: table.to_csv(p, index=False, float_format="%.6f"),
        "oof_grid.csv": lambda p: results.to_csv(p, index=False, float_format="%.6f"),
        "oof_grid.png": lambda p: plot_grid(results, best, p, title),
        "postprocess.yaml": lambda p: p.write_text(text, encoding="utf-8"),
    }
    replace_together(exp_dir, "tuning", writers)
    return {name: exp_dir / name for name in TUNING_FILES}
