"""The OOF maps a tuning reads: which folds, which settings of the model's options, the blend."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("oof_tune")


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


def option_variants(cfg: Mapping) -> list[tuple[dict, str]]:
    """(model options, OOF sub-folder) of every setting of ``tune.options`` to search; the first
    is the maps as trained (no option changed). Blends search no options."""
    from pneumoseg.training.oof import option_folder, option_settings

    settings = option_settings(cfg["tune"]["options"])
    return [({}, ""), *((opts, option_folder(opts)) for opts in settings)]


def tuning_plan(cfg: Mapping) -> tuple[list[tuple[str, float]], bool, list[tuple[dict, str]]]:
    """The blend's members (experiment, weight), whether it is a blend of other experiments than
    ``exp``, and the option variants to search (only the maps as trained for a blend)."""
    from pneumoseg.config import blend_members

    members = blend_members(cfg)
    blend = [(e, w) for e, w in members] != [(cfg["exp"], 1.0)]
    variants = option_variants(cfg) if not blend else [({}, "")]
    if blend and cfg["tune"]["options"]:
        log.warning(
            "tune.options are not searched for a blend: its members' maps are used as trained"
        )
    return members, blend, variants


def tuned_folds(cfg: Mapping, members: Sequence[tuple[str, float]],
                variants: Sequence[tuple[dict, str]]) -> list[int]:  # fmt: skip
    """The folds to tune on; every member must have their OOF maps for every variant."""
    out_root = Path(cfg["train"]["out_dir"])
    folds: list[int] = []
    for exp, _ in members:
        for _, sub in variants:
            folds = find_folds(
                out_root / exp, cfg["tune"]["folds"], int(cfg["folds"]["n_folds"]), sub
            )
    return folds


def fold_sources(out_root: Path, members, folds: list[int], sub: str):
    """One OOF per fold: the blend (weighted mean) of the experiments' maps."""
    from pneumoseg.training.oof import blend_oofs, load_oof

    names = [exp for exp, _ in members]
    weights = [w for _, w in members]
    return [
        blend_oofs([load_oof(out_root / exp / f"fold{k}" / sub) for exp in names], weights, names)
        for k in folds
    ]


def map_size(oofs, exp_dir: Path) -> int:
    """The side of the folds' OOF maps; all folds must share it."""
    from pneumoseg.errors import DataError

    sizes = {o.probs.shape[1:] for o in oofs}
    if len(sizes) != 1:
        raise DataError(
            f"{exp_dir}: folds have OOF maps of different sizes {sorted(sizes)}: retrain the "
            "odd ones with the same oof.size"
        )
    return int(oofs[0].probs.shape[1])
