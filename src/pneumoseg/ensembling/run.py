"""The selection phase as one call: :func:`select_ensemble` (what ``src/select_ensemble.py`` runs).

Reads the OOF maps of every ``select.candidates`` experiment (same folds, OOF geometry and TTA
required), chooses the blend by greedy forward selection with replacement on the mean OOF Dice
of its tuned post-processing, scores it and each candidate alone by nested CV too
(``select.nested``), tunes the chosen blend (``postprocess.yaml`` and its report, as
``oof_tune.py`` writes them, under the selection config's own ``exp``) and then writes
``<train.out_dir>/<exp>/ensemble.yaml``: the members and weights that ``predict.py``, the web
app and ``oof_tune.py`` of this config use from then on (``pneumoseg.config.blend_members``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.ensembling.select import Nested, Selection, greedy_select, nested_cv, oof_scorer
from pneumoseg.errors import ConfigError, DataError, OutputExistsError

log = logging.getLogger("select_ensemble")


@dataclass(frozen=True)
class SelectResult:
    """What the selection chose and wrote."""

    path: Path  # ensemble.yaml
    selection: Selection  # the blend (counts, weights, steps) and its plain CV Dice
    singles: dict[str, float]  # each candidate alone: plain CV Dice (tuned on all folds)
    nested: Nested | None  # the blend's nested CV (select + tune on K-1 folds)
    nested_singles: dict[str, float] = field(default_factory=dict)  # each alone: nested CV
    tuned: Any = None  # the TuneResult of the chosen blend (postprocess.yaml)

    @property
    def members(self) -> list[list]:
        return self.selection.members


def select_ensemble(cfg: dict, force: bool = False, jobs: int | None = None) -> SelectResult:
    """Choose the blend of ``select.candidates`` on their OOF maps and write ``ensemble.yaml``
    and the blend's tuning under ``<train.out_dir>/<exp>/``. An existing ``ensemble.yaml`` is
    kept (:class:`OutputExistsError`) unless ``force``; refused before any work."""
    from pneumoseg.config import ensemble_path
    from pneumoseg.locks import exclusive, lock_file_for

    path = ensemble_path(cfg)
    with exclusive(lock_file_for(path), f"the selection of {path.parent}"):
        names = _check_request(cfg, path, force)
        folds, cands, scale = _load_candidates(cfg, names)
        tune_cfg, steps = cfg["tune"], int(cfg["select"]["max_steps"])
        score = oof_scorer(cands, range(len(folds)), tune_cfg, scale, jobs)
        singles = {n: score({n: 1}) for n in names}
        selection = greedy_select(names, score, max_steps=steps)
        nested, nested_singles = None, {}
        if cfg["select"]["nested"] and len(folds) >= 2:
            nested = nested_cv(cands, len(folds), tune_cfg, scale, True, steps, jobs)
            nested_singles = {n: nested_cv({n: cands[n]}, len(folds), tune_cfg, scale, False,
                                           steps, jobs).dice for n in names}  # fmt: skip
        tuned = _tune_blend(cfg, selection, force, nested)
        result = SelectResult(path, selection, singles, nested, nested_singles, tuned)
        _write(path, result, folds)
    return result


def _check_request(cfg: Mapping, path: Path, force: bool) -> list[str]:
    names = [str(n) for n in cfg["select"]["candidates"]]
    if not names:
        raise ConfigError("select.candidates is empty: list the trained experiments to choose "
                          "from, e.g. select.candidates=[demo,maskrcnn_demo]")  # fmt: skip
    if cfg["predict"]["experiments"]:
        raise ConfigError("predict.experiments is set: the selection decides the blend; leave it "
                          "empty in the selection config (predict.experiments=[])")  # fmt: skip
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder: move it away (nothing was written)")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to choose again and replace it")
    return names


def _load_candidates(cfg: Mapping, names: list[str]):
    """(folds, {name: [Oof per fold]}, area scale): every candidate's maps of every fold, checked
    to hold the same images at the same geometry and TTA."""
    from pneumoseg.postprocessing.postprocess import area_scale_for
    from pneumoseg.training.oof import load_oof
    from pneumoseg.tuning.sources import find_folds

    out_root = Path(str(cfg["train"]["out_dir"]))
    n_folds = int(cfg["folds"]["n_folds"])
    folds = []
    for name in names:
        folds = find_folds(out_root / name, cfg["tune"]["folds"], n_folds)
    cands = {n: [load_oof(out_root / n / f"fold{k}") for k in folds] for n in names}
    check_compatible(out_root, cands, folds)
    size = int(cands[names[0]][0].probs.shape[1])
    log.info("candidates %s: folds %s, %d OOF images at %d²", ", ".join(names), folds,
             sum(len(o.ids) for o in cands[names[0]]), size)  # fmt: skip
    return folds, cands, area_scale_for(size)


def _trained_settings(out_root: Path, name: str, k: int) -> dict:
    """What a fold's OOF maps were made with, from its saved config (``{}`` when absent)."""
    from pneumoseg.defaults import read_yaml
    from pneumoseg.tuning.provenance import file_digest

    path = out_root / name / f"fold{k}" / "config.yaml"
    if not path.is_file():
        return {}
    c = read_yaml(path)
    folds_file = Path(str(c["folds"]["file"]))
    return {
        "folds file": file_digest(folds_file) if folds_file.is_file() else str(folds_file),
        "oof.hflip (the OOF maps' TTA)": bool(c["oof"]["hflip"]),
        "cache.size": int(c["cache"]["size"]),
    }


def check_compatible(out_root: Path, cands: Mapping[str, list], folds: list[int]) -> None:
    """Refuse candidates whose OOF maps cannot be blended: other images in a fold, another OOF
    size, another folds file, OOF TTA or cache size. The error lists every difference."""
    names = list(cands)
    first = names[0]
    diffs = []
    for i, k in enumerate(folds):
        ref = cands[first][i]
        ref_set = _trained_settings(out_root, first, k)
        for name in names[1:]:
            o = cands[name][i]
            if list(o.ids) != list(ref.ids):
                diffs.append(f"fold {k}: {name} holds other images than {first} ({len(o.ids)} "
                             f"vs {len(ref.ids)} ids, or another order)")  # fmt: skip
            if o.probs.shape[1:] != ref.probs.shape[1:]:
                diffs.append(f"fold {k}: oof.size {o.probs.shape[1]} ({name}) vs "
                             f"{ref.probs.shape[1]} ({first})")  # fmt: skip
            mine = _trained_settings(out_root, name, k)
            for key in sorted(set(ref_set) & set(mine)):
                if ref_set[key] != mine[key]:
                    diffs.append(f"fold {k}: {key} of {name} differs from {first}'s "
                                 f"({mine[key]!r} vs {ref_set[key]!r})")  # fmt: skip
    if diffs:
        raise DataError("the candidates cannot be blended on their OOF maps:\n  - "
                        + "\n  - ".join(diffs[:20]) + "\nTrain them on the same folds file with "
                        "the same oof.size, oof.hflip and cache.size")  # fmt: skip


def _tune_blend(cfg: Mapping, selection: Selection, force: bool, nested: Nested | None):
    """The chosen blend's post-processing (``postprocess.yaml`` + report, with its source). The
    report lists the selection's own CV and nested CV too: the tuning's nested CV keeps the blend
    fixed, the selection's also chooses the blend without the fold it scores (the honest one)."""
    from pneumoseg.tuning.run import tune

    blend_cfg = copy.deepcopy(dict(cfg))
    blend_cfg["predict"]["experiments"] = selection.members
    more = {"CV Dice of the selection (chosen and tuned on all folds)": selection.score}
    if nested is not None:
        more["nested CV Dice of the selection (chosen and tuned without the fold scored)"] = (
            nested.dice
        )
    return tune(blend_cfg, force=force, report_cv=more)


def _write(path: Path, result: SelectResult, folds: list[int]) -> None:
    """``ensemble.yaml``: the members first (what prediction reads), then how they were chosen."""
    import yaml

    from pneumoseg.io import atomic_write

    sel, nested = result.selection, result.nested

    def r6(x: float | None) -> float | None:
        return None if x is None else round(float(x), 6)

    candidates = {n: {"cv_dice": r6(d), "cv_dice_nested": r6(result.nested_singles.get(n))}
                  for n, d in result.singles.items()}  # fmt: skip
    held_out = [] if nested is None else [
        {"fold": int(folds[r["fold"]]), "n_images": r["n_images"], "dice": r6(r["dice"]),
         "members": r["members"]} for r in nested.folds
    ]  # fmt: skip
    doc = {
        "members": sel.members,
        "cv_dice": r6(sel.score),
        "cv_dice_nested": None if nested is None else r6(nested.dice),
        "folds": [int(k) for k in folds],
        "counts": dict(sel.counts),
        "steps": [{"added": s["added"], "cv_dice": r6(s["score"])} for s in sel.steps],
        "candidates": candidates,
        "nested_folds": held_out,
        "postprocess": "postprocess.yaml",
    }
    with atomic_write(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False, default_flow_style=None)
    log.info("wrote %s: %s (CV Dice %.4f%s)", path, sel.members, sel.score,
             "" if nested is None else f", nested {nested.dice:.4f}")  # fmt: skip
