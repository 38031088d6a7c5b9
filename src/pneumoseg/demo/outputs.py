"""What the demo made, told apart from everything else before anything is deleted.

``demo.py`` runs the whole pipeline on the synthetic set and may replace or remove its own
outputs (``--fresh``, ``--clean``, and a re-run that re-tunes and re-predicts with ``--force``).
A config can point those paths anywhere, though, including at a real Kaggle folder or at another
experiment's results. So each output is first checked to be the demo's, and only when every one
passes is anything removed (one message lists every refusal; nothing was deleted then):

- the data folder carries the synthetic generator's marker (:func:`synthetic.owned_params`);
- every fold folder of the experiment holds the ``config.yaml`` of a run trained on that data;
- tuning files (``postprocess.yaml`` and its set) sit beside such fold folders (a blend: beside
  its members' ones);
- the submission and the folds file list exactly the synthetic set's test / train ids;
- a cache folder is the cache module's (:func:`cache.cache_owner`) and built from that data.

Removal goes through each module's own remover (the generator's and the cache's delete only the
files they wrote) and holds each run folder's, tuning's and submission's lock while it deletes,
so a command still writing there is not pulled from under.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumoseg.data import synthetic
from pneumoseg.data.cache import cache_owner, remove_cache
from pneumoseg.data.dataset import dataset_name
from pneumoseg.errors import OutputExistsError
from pneumoseg.io import recover_together
from pneumoseg.locks import exclusive, lock_file_for
from pneumoseg.tuning import TUNING_FILES

log = logging.getLogger(__name__)

NOTHING = "nothing was deleted"
# run folders train.py makes: fold<k>, and fold<k>.bak-<time> where --force moved an old run
_FOLD = re.compile(r"fold\d+(\.bak-[0-9-]+)?")


@dataclass
class DemoOutputs:
    """The paths one demo config writes (absolute), and the synthetic set's plan parameters."""

    base: Path  # relative paths of configs (those in fold folders too) resolve against it
    root: Path
    exp_dir: Path
    member_dirs: list[Path]
    folds_file: Path
    submission: Path
    cache_dir: Path
    cache_prefix: str
    params: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def demo_outputs(cfg: Mapping, base: Path, members: list[str], planned: Mapping) -> DemoOutputs:
    """The outputs of demo config ``cfg`` (relative paths resolved against ``base``) whose blend
    members (or the experiment itself) are ``members``. ``planned`` is the plan the demo would
    generate, used when the data folder holds no set yet."""
    out_dir = base / str(cfg["train"]["out_dir"])
    root = (base / str(cfg["data"]["root"])).resolve()
    return DemoOutputs(
        base=base,
        root=root,
        exp_dir=out_dir / cfg["exp"],
        member_dirs=[out_dir / m for m in members],
        folds_file=base / str(cfg["folds"]["file"]),
        submission=base / str(cfg["predict"]["out_dir"]) / f"{cfg['exp']}.csv",
        cache_dir=base / str(cfg["cache"]["dir"]),
        cache_prefix=dataset_name({**cfg["data"], "root": str(root)}) + "_",
        params=dict(planned),
    )


def check(outs: DemoOutputs, mode: str) -> None:
    """Raise :class:`OutputExistsError` listing every output that is not the demo's.

    ``mode``: ``run`` (the demo overwrites its tuning and submission), ``fresh`` or ``clean``
    (it removes all of its outputs: the folds file and the caches are checked too)."""
    _check_data(outs, mode)
    if outs.exp_dir not in outs.member_dirs:  # a blend: its own folder holds no folds
        _own_folds(outs, outs.exp_dir)
    members = [f for d in outs.member_dirs for f in _own_folds(outs, d)]
    tuning = [outs.exp_dir / n for n in TUNING_FILES if (outs.exp_dir / n).exists()]
    if tuning and not members:
        outs.problems.append(
            f"{tuning[-1]}: tuning with none of the demo's fold folders beside it (not the demo's)"
        )
    train_ids, test_ids = synthetic.synthetic_ids(outs.params)
    _check_ids(outs, outs.submission, "ImageId", test_ids, "test")
    if mode != "run":
        _check_ids(outs, outs.folds_file, "id", train_ids, "train")
        _own_caches(outs)
    if outs.problems:
        raise OutputExistsError(
            "the demo refuses to touch outputs it did not make: "
            + "; ".join(outs.problems)
            + f". {NOTHING}; move them away, or give the demo a config whose paths are its own"
        )


def _check_data(outs: DemoOutputs, mode: str) -> None:
    """The data folder: absent, empty, or the generator's (its plan then gives the ids)."""
    root = outs.root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        what = {"run": "the demo runs on its synthetic set only", "fresh": "refusing --fresh",
                "clean": "refusing --clean"}  # fmt: skip
        outs.params = synthetic.owned_params(root, f"{what[mode]}; {NOTHING}")


def _own_folds(outs: DemoOutputs, exp_dir: Path) -> list[Path]:
    """The run folders of ``exp_dir``; one not trained on the demo's data is a problem."""
    if not exp_dir.is_dir():
        return []
    found = []
    for fold in sorted(p for p in exp_dir.iterdir() if _FOLD.fullmatch(p.name)):
        why = _not_a_demo_run(fold, outs.base, outs.root)
        if why:
            outs.problems.append(f"{fold}: {why}")
        else:
            found.append(fold)
    return found


def _not_a_demo_run(fold: Path, base: Path, root: Path) -> str | None:
    if fold.is_symlink() or not fold.is_dir():
        return "not a run folder (a link or a file)"
    try:
        cfg = yaml.safe_load((fold / "config.yaml").read_text(encoding="utf-8"))
        data_root = Path(str(cfg["data"]["root"]))
    except FileNotFoundError:
        return "holds no config.yaml, so no run of the demo made it"
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return "its config.yaml is unreadable, so it cannot be told to be the demo's"
    if (base / data_root).resolve() != root:
        return f"not trained on the demo's data (its data.root is {data_root})"
    return None


def _check_ids(outs: DemoOutputs, path: Path, column: str, ids: list[str], split: str) -> None:
    """A CSV of the demo lists exactly the synthetic set's ``split`` ids in ``column``."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            found = {row[column].strip() for row in csv.DictReader(fh, skipinitialspace=True)}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, AttributeError):
        outs.problems.append(f"{path}: unreadable as the demo's CSV (no {column} column)")
        return
    if path.is_symlink() or found != set(ids):
        outs.problems.append(f"{path}: its ids are not the synthetic set's {split} ids")


def _own_caches(outs: DemoOutputs) -> list[Path]:
    """Caches built from the demo's data; a folder of the config's cache names that is not
    one is a problem."""
    if not outs.cache_dir.is_dir():
        return []
    found = []
    for path in sorted(p for p in outs.cache_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        owner = cache_owner(path)
        ours = owner is not None and _same(owner.get("root"), outs.root)
        if ours:
            found.append(path)
        elif path.name.startswith(outs.cache_prefix) and any(path.iterdir()):
            why = "not a cache this pipeline built" if owner is None else "a cache of other data"
            outs.problems.append(f"{path}: {why}")
    return found


def _same(path: Any, root: Path) -> bool:
    try:
        return Path(str(path)).resolve() == root
    except (OSError, ValueError, RuntimeError):
        return False


def remove(outs: DemoOutputs) -> list[str]:
    """Remove the demo's outputs (after :func:`check` passed); returns what went."""
    gone: list[str] = []
    with contextlib.ExitStack() as stack:
        folds = _own_folds(outs, outs.exp_dir)
        for path in (*folds, outs.exp_dir / "postprocess.yaml", outs.submission):
            if path.exists():
                stack.enter_context(exclusive(lock_file_for(path), f"demo output {path}"))
        for fold in folds:
            shutil.rmtree(fold)
            gone.append(str(fold))
        if outs.exp_dir.is_dir():
            recover_together(outs.exp_dir, "tuning", TUNING_FILES)  # a killed tuning's temps
        for path in (*(outs.exp_dir / n for n in TUNING_FILES), outs.submission, outs.folds_file):
            if path.is_file():
                path.unlink()
                gone.append(str(path))
    for path in _own_caches(outs):
        with exclusive(lock_file_for(path), f"the cache {path}"):  # not while it is being built
            remove_cache(path)
        gone.append(str(path))
    if outs.root.is_dir() and synthetic.read_marker(outs.root) is not None:
        synthetic.remove_dataset(outs.root)
        gone.append(str(outs.root))
    elif outs.root.is_dir() and not any(outs.root.iterdir()):
        outs.root.rmdir()
    with contextlib.suppress(OSError):  # only once empty: a user's files keep it
        outs.exp_dir.rmdir()
    for path in gone:
        log.info("removed %s", path)
    return gone
