"""Tune the post-processing on out-of-fold predictions -> ``runs/<exp>/postprocess.yaml``.

    python src/oof_tune.py --config configs/demo.yaml [section.key=value ...] [--force]

Reads the OOF maps of ``tune.folds``, or of every fold ``0..folds.n_folds-1`` (all must have
complete OOF files: tuning on a subset silently is an error), searches the ``tune`` grids (threshold × min_area; triplet top_threshold × top_area ×
bottom_threshold; each also with the aux-head gate when ``tune.cls_thresholds`` is set and the folds
have ``oof_cls.npy``) for the best mean competition Dice over all OOF images, and writes:

* ``postprocess.yaml``: the best setting (what predict.py applies); an existing file with other
  content is kept unless ``--force``;
* ``oof_report.csv``: per fold (and mean / std over folds, and pooled over all images) for the
  all-empty baseline, the raw 0.5 threshold and the best setting of each method: mean Dice,
  positive-only Dice, empty/non-empty accuracy, MMSeg-style mIoU / mDice;
* ``oof_grid.csv``: the mean Dice of every setting searched;
* ``oof_grid.png``: Dice heatmaps over threshold × min_area and top_threshold × top_area (at the
  best bottom threshold), best cells marked.

Areas in the grids and in postprocess.yaml are pixels at 1024²; they are scaled to the OOF size.
The Dice of the chosen setting is recomputed from scratch with ``apply_postprocess`` on every OOF
image and must match the search.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pneumoseg.cli import config_from_args, make_parser, run, setup_logging
from pneumoseg.inference.predictor import TUNING_FILES

log = logging.getLogger("oof_tune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "tune.folds=[0,1]")
    ap.add_argument("--force", action="store_true", help="overwrite a different postprocess.yaml")
    ap.add_argument("--jobs", type=int, default=None, help="search threads (default: all cores)")
    return ap.parse_args(argv)


def find_folds(exp_dir: Path, wanted, n_folds: int, sub: str = "") -> list[int]:
    """``wanted`` folds, or every fold ``0..n_folds-1``; each must have complete OOF files
    (in the fold's ``sub`` folder: the maps of one setting of the model's inference options)."""
    from pneumoseg.errors import MissingFileError
    from pneumoseg.training.oof import has_oof

    folds = list(range(n_folds)) if wanted is None else [int(k) for k in wanted]
    missing = [k for k in folds if not has_oof(exp_dir / f"fold{k}" / sub)]
    if missing:
        how = f"tune.folds={folds}" if wanted is not None else f"folds.n_folds={n_folds} folds"
        what = f" ({sub}: retrain with the same tune.options)" if sub else ""
        raise MissingFileError(
            f"{exp_dir}: no complete OOF predictions{what} for fold(s) {missing} of the {how}. "
            "Train them (src/train.py --fold k), or name the folds to tune on with "
            "tune.folds=[...]"
        )
    return folds


def option_variants(cfg: dict) -> list[tuple[dict, str]]:
    """(model options, OOF sub-folder) of every setting of ``tune.options`` to search; the first
    is the maps as trained (no option changed). Blends search no options."""
    from pneumoseg.training.oof import option_folder, option_settings

    settings = option_settings(cfg["tune"]["options"])
    return [({}, ""), *((opts, option_folder(opts)) for opts in settings)]


def fold_sources(out_root: Path, members, folds: list[int], sub: str):
    """One OOF per fold: the blend (weighted mean) of the experiments' maps."""
    from pneumoseg.training.oof import blend_oofs, load_oof

    names = [exp for exp, _ in members]
    weights = [w for _, w in members]
    return [
        blend_oofs([load_oof(out_root / exp / f"fold{k}" / sub) for exp in names], weights, names)
        for k in folds
    ]


def describe(params: dict) -> str:
    gate = f", cls>={params['cls_threshold']:g}" if params.get("cls_threshold") is not None else ""
    if params["method"] == "threshold":
        return f"p>{params['threshold']:g}, min_area {params['min_area']:g}{gate}"
    extra = f", min_area {params['min_area']:g}" if params.get("min_area") else ""
    return (
        f"top {params['top_threshold']:g}×{params['top_area']:g}px, "
        f"bottom {params['bottom_threshold']:g}{extra}{gate}"
    )


def report_table(oofs, names, settings: dict, scale: float):
    """Per-fold metrics of each named setting + mean/std over folds + pooled over all images."""
    import pandas as pd

    from pneumoseg.postprocessing.postprocess import evaluate_params, pooled_miou

    metrics = ["dice", "pos_dice", "empty_acc", "mIoU", "mDice"]
    rows = []
    for label, params in settings.items():
        ev = evaluate_params(oofs, params, scale, names=names)
        ev.insert(0, "setting", label)
        ev.insert(1, "params", describe(params))
        ev = ev.rename(columns={"source": "fold"})
        rows.append(ev)
        summary = {"setting": label, "params": describe(params)}
        rows.append(pd.DataFrame([{**summary, "fold": "mean", **ev[metrics].mean().to_dict()}]))
        rows.append(pd.DataFrame([{**summary, "fold": "std", **ev[metrics].std(ddof=0).to_dict()}]))
        n = int(ev["n_images"].sum())
        pooled = pooled_miou(ev)  # MMSeg: intersection and union summed over all pixels first
        all_row = {**summary, "fold": "all", "n_images": n, "dice": float(ev["dice_sum"].sum()) / n,
                   "dice_sum": float(ev["dice_sum"].sum()), "mIoU": pooled["mIoU"],
                   "mDice": pooled["mDice"], "ptx_IoU": pooled["IoU"][1],
                   "ptx_Dice": pooled["Dice"][1], "bg_IoU": pooled["IoU"][0],
                   "bg_Dice": pooled["Dice"][0]}  # fmt: skip
        rows.append(pd.DataFrame([all_row]))
    table = pd.concat(rows, ignore_index=True)
    cols = ["setting", "params", "fold", "n_images", *metrics, "ptx_IoU", "ptx_Dice", "bg_IoU",
            "bg_Dice", "dice_sum"]  # fmt: skip
    table = table[cols]
    table["n_images"] = table["n_images"].astype("Int64")
    return table


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


def write_outputs(exp_dir: Path, params: dict, table, results, best, force: bool,
                  title: str) -> Path:  # fmt: skip
    """Write the tuning's files as one set (:func:`pneumoseg.io.replace_together`): a kill at
    any moment leaves the old set or the new one. A different postprocess.yaml is replaced only
    with ``force``."""
    from pneumoseg.errors import OutputExistsError
    from pneumoseg.io import replace_together
    from pneumoseg.postprocessing.postprocess import ParamsError, load_params, params_yaml

    out = exp_dir / "postprocess.yaml"
    if out.is_file():
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
    text = params_yaml(params)
    writers = {
        "oof_report.csv": lambda p: table.to_csv(p, index=False, float_format="%.6f"),
        "oof_grid.csv": lambda p: results.to_csv(p, index=False, float_format="%.6f"),
        "oof_grid.png": lambda p: plot_grid(results, best, p, title),
        "postprocess.yaml": lambda p: p.write_text(text, encoding="utf-8"),
    }
    replace_together(exp_dir, "tuning", writers)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.locks import exclusive, lock_file_for

    cfg = config_from_args(args)
    exp_dir = Path(cfg["train"]["out_dir"]) / cfg["exp"]
    with exclusive(lock_file_for(exp_dir / "postprocess.yaml"), f"the tuning of {exp_dir}"):
        return run_tuning(cfg, args)


def run_tuning(cfg: dict, args: argparse.Namespace) -> int:
    from pneumoseg.errors import DataError
    from pneumoseg.inference.ensemble import experiment_list
    from pneumoseg.inference.provenance import tuning_source
    from pneumoseg.io import recover_together, require_file_targets
    from pneumoseg.postprocessing.postprocess import (
        area_scale_for,
        best_rows,
        pick_best,
        row_params,
        search,
        validate_params,
    )

    tune = cfg["tune"]
    out_root = Path(cfg["train"]["out_dir"])
    exp_dir = out_root / cfg["exp"]
    # a tuning killed half way is finished (committed) or dropped (not committed) first
    recover_together(exp_dir, "tuning", TUNING_FILES)
    require_file_targets(exp_dir, TUNING_FILES)
    members = experiment_list(cfg)
    blend = [(e, w) for e, w in members] != [(cfg["exp"], 1.0)]
    variants = option_variants(cfg) if not blend else [({}, "")]
    if blend and tune["options"]:
        log.warning(
            "tune.options are not searched for a blend: its members' maps are used as trained"
        )
    for exp, _ in members:
        for _, sub in variants:
            folds = find_folds(out_root / exp, tune["folds"], int(cfg["folds"]["n_folds"]), sub)
    names = [f"fold{k}" for k in folds]
    if blend:
        log.info("tuning the blend %s", ", ".join(f"{e} × {w:g}" for e, w in members))
    oofs = fold_sources(out_root, members, folds, "")
    sizes = {o.probs.shape[1:] for o in oofs}
    if len(sizes) != 1:
        raise DataError(
            f"{exp_dir}: folds have OOF maps of different sizes {sorted(sizes)}: retrain the "
            "odd ones with the same oof.size"
        )
    size = oofs[0].probs.shape[1]
    scale = area_scale_for(size)
    n_images = sum(len(o.ids) for o in oofs)
    log.info(
        "%s: folds %s, %d OOF images at %d² (areas × %.4g from 1024²)",
        exp_dir, folds, n_images, size, scale,
    )  # fmt: skip

    t0 = time.perf_counter()
    results = search(oofs, tune, area_scale=scale, names=names, n_jobs=args.jobs)
    choice, options = pick_best(results), {}
    for opts, sub in variants[1:]:  # the model's inference options (e.g. a detector's min_score)
        cand_oofs = fold_sources(out_root, members, folds, sub)
        cand = search(cand_oofs, tune, area_scale=scale, names=names, n_jobs=args.jobs)
        c = pick_best(cand)
        log.info("model options %s: best OOF Dice %.4f", opts, float(c["dice"]))
        if float(c["dice"]) > float(choice["dice"]):
            oofs, results, choice, options = cand_oofs, cand, c, opts
    log.info("searched %d settings in %.1f s", len(results) * len(variants),
             time.perf_counter() - t0)  # fmt: skip
    best = best_rows(results)
    chosen = row_params(choice.to_dict())

    settings = {
        "all-empty": {"method": "threshold", "threshold": 1.0, "min_area": 0},
        "raw 0.5": {"method": "threshold", "threshold": 0.5, "min_area": 0},
    }
    for fam, row in best.iterrows():
        settings[f"best {fam}"] = row_params(row.to_dict())
    table = report_table(oofs, names, settings, scale)

    # The chosen setting, recomputed from scratch with apply_postprocess, must match the search.
    label = f"best {choice['family']}"
    pooled = table[(table["setting"] == label) & (table["fold"] == "all")].iloc[0]
    log.info(
        "chosen setting (%s: %s): search Dice %.6f, recomputed with apply_postprocess %.6f",
        choice["family"], describe(chosen), float(choice["dice"]), float(pooled["dice"]),
    )  # fmt: skip
    if abs(float(pooled["dice"]) - float(choice["dice"])) > 1e-9:
        raise RuntimeError(
            f"search Dice {float(choice['dice']):.9f} and recomputed Dice "
            f"{float(pooled['dice']):.9f} of {describe(chosen)} differ: a bug in the fast search"
        )

    per_fold = [float(choice[f"dice_{n}"]) for n in names]
    params = validate_params(
        {
            **chosen,
            "oof_size": int(size),
            "cv_dice": round(float(choice["dice"]), 6),
            "cv_dice_std": round(float(choice["dice_std"]), 6),
            "cv_dice_folds": [round(d, 6) for d in per_fold],
            "folds": folds,
            "n_images": n_images,
            "exp": cfg["exp"],
            **({"experiments": [[e, w] for e, w in members]} if blend else {}),
            **({"model_options": options} if options else {}),
            "source": tuning_source(cfg, members, folds),
        }
    )
    out = write_outputs(
        exp_dir,
        params,
        table,
        results,
        best,
        force=args.force,
        title=f"{cfg['exp']}: OOF mean Dice, {n_images} images in folds {folds}",
    )
    summary = table[table["fold"].isin(["mean", "std"])].pivot_table(
        index=["setting", "params"], columns="fold", values=["dice", "pos_dice", "empty_acc",
                                                             "mIoU", "mDice"], sort=False
    )  # fmt: skip
    lines = []
    for (setting, desc), r in summary.iterrows():
        cells = "  ".join(
            f"{m} {r[(m, 'mean')]:.4f}±{r[(m, 'std')]:.4f}"
            for m in ("dice", "pos_dice", "empty_acc", "mIoU", "mDice")
        )
        lines.append(f"  {setting:20s} {desc:40s} {cells}")
    log.info("mean ± std over folds %s:\n%s", folds, "\n".join(lines))
    pooled = table[table["fold"] == "all"]
    log.info(
        "MMSeg-style, intersection and union pooled over all %d OOF images' pixels "
        "(IoU/Dice per class, then the mean over background and pneumothorax):\n%s",
        n_images,
        "\n".join(
            f"  {r.setting:20s} competition Dice {r.dice:.4f}  mIoU {100 * r.mIoU:.2f} "
            f"mDice {100 * r.mDice:.2f}  (background IoU {100 * r.bg_IoU:.2f} Dice "
            f"{100 * r.bg_Dice:.2f}, pneumothorax IoU {100 * r.ptx_IoU:.2f} Dice "
            f"{100 * r.ptx_Dice:.2f})"
            for r in pooled.itertuples()
        ),
    )
    log.info(
        "chose %s (%s): CV Dice %.4f ± %.4f -> %s",
        choice["family"], describe(params), params["cv_dice"], params["cv_dice_std"], out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
