"""The trained experiment as one object: fold ensemble × TTA × tuned post-processing.

``predict.py`` (submissions and ``--image``) and the web app (``pneumoseg.serve``) both predict
through :class:`Predictor`, so a page and a submission agree pixel for pixel on the same image:
images are resized to ``cache.size`` exactly as the cache does, every model of
``predict.experiments`` × ``predict.folds`` runs with the ``predict.tta`` views, probabilities go
back to each image's original size, and ``<train.out_dir>/<exp>/postprocess.yaml`` (tuned by
``oof_tune.py``) turns them into masks and RLE rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.schema import parse_tta
from pneumoseg.tuning import TUNING_FILES

log = logging.getLogger("pneumoseg.predict")

DEFAULT_PARAMS = {"method": "threshold", "threshold": 0.5, "min_area": 0}


def postprocess_path(cfg: Mapping[str, Any]) -> Path:
    return Path(str(cfg["train"]["out_dir"])) / str(cfg["exp"]) / "postprocess.yaml"


def postprocess_params(
    cfg: Mapping[str, Any],
    members: Sequence | None = None,
    digests: Mapping[str, str] | None = None,
) -> dict:
    """The post-processing ``oof_tune.py`` tuned for this config (for a blend: on the blend's OOF
    maps, under the blend config's own ``exp``), or threshold 0.5 with a warning. A tuning made
    for other models or settings than ``members`` (their ``model.pt``; or ``digests``, the
    ``model.pt`` digests an export was made from) and ``cfg`` is refused
    (:func:`pneumoseg.tuning.provenance.check_source`)."""
    from pneumoseg.config import blend_members
    from pneumoseg.errors import RunLockedError
    from pneumoseg.io import recover_together
    from pneumoseg.locks import exclusive, lock_file_for
    from pneumoseg.postprocessing.postprocess import load_params
    from pneumoseg.tuning.provenance import check_source

    path = postprocess_path(cfg)
    if path.parent.is_dir():
        # a tuning killed while replacing its files is finished first (or dropped if it never
        # committed), unless one is running now (it holds the lock and finishes its own set) or
        # the folder is read-only (e.g. models mounted as a Kaggle input): nothing to finish then
        with contextlib.suppress(RunLockedError, OSError), exclusive(lock_file_for(path), "tuning"):
            recover_together(path.parent, "tuning", TUNING_FILES)
    if path.is_file():
        params = load_params(path)
        paths = [getattr(m, "path", m) for m in members or ()]
        paths = [p for p in paths if isinstance(p, Path)]
        check_source(params, path, cfg, blend_members(cfg), paths, digests)
        log.info("post-processing from %s: %s", path, {k: v for k, v in params.items()
                                                         if k != "source"})  # fmt: skip
        return params
    log.warning(
        "%s not found (run src/oof_tune.py to tune it): using a plain threshold of 0.5 without "
        "component filtering",
        path,
    )
    return dict(DEFAULT_PARAMS)


def apply_model_options(members, options: Mapping[str, float]) -> None:
    """Set the tuned inference options (``model_options`` of postprocess.yaml) on the models whose
    family has them (e.g. a detector's ``min_score``)."""
    from pneumoseg.models.families import family_for

    for m in members:
        family = family_for(m.cfg)
        for name, value in options.items():
            if name in family.tunable:
                family.set_option(m.model, name, value)
                log.info("%s model: %s = %g (tuned)", family.name, name, value)


class Predictor:
    """The ensemble plus everything needed to turn images into probabilities, masks and RLEs.

    The models run in an engine (:mod:`.backends`: torch, or an export in ONNX Runtime or
    OpenVINO, as ``predict.backend`` / ``predict.precision`` resolve on this machine); the rest
    (resizing, TTA plan, post-processing, RLE) is the same whichever runs."""

    def __init__(self, cfg: dict, relative: bool = True):
        from pneumoseg.inference.backends import make_engine

        self.cfg = cfg
        self.size = int(cfg["cache"]["size"])
        self.tta = list(cfg["predict"]["tta"] or [])
        parse_tta(self.tta)  # fail on a bad view before loading anything
        self.engine = make_engine(cfg)
        self.params = postprocess_params(cfg, self.engine.model_paths(), self.engine.digests)
        options = self.params.get("model_options") or {}
        if self.engine.backend == "torch":
            apply_model_options(self.engine.members, options)
        else:
            self.engine.apply_options(options)
        self.relative = relative
        self.batch_size = max(1, int(cfg["predict"]["batch_size"]))
        log.info(
            "%d model(s), TTA %s, batch %d, %s %s on %s",
            len(self.members),
            self.tta or "none",
            self.batch_size,
            self.backend,
            self.precision,
            self.device,
        )

    # what the engine runs, for logs, /health and callers that inspect the ensemble
    @property
    def members(self) -> list:
        return self.engine.members

    @property
    def device(self):
        return self.engine.device

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def threads(self) -> int | None:
        return self.engine.threads

    def probs(self, images, sizes):
        """uint8 (N, S, S) -> (list of float32 probabilities at ``sizes``, cls (N,) or None)."""
        return self.engine.probs(images, sizes, self.tta)

    def probs_of(self, originals: Sequence[np.ndarray]):
        """Images at their own sizes (uint8 2-D) -> probabilities at those sizes, cls or None:
        resized to ``cache.size`` exactly as the cache resizes them."""
        from pneumoseg.data.resize import resize_image

        small = np.stack([resize_image(im, self.size) for im in originals])
        return self.probs(small, [im.shape for im in originals])

    def finish(self, prob, cls_prob, params: Mapping | None = None):
        """Probabilities at original size -> (mask, rle), with the tuned post-processing (or
        ``params``, e.g. another threshold)."""
        from pneumoseg.data.rle import rle_encode
        from pneumoseg.postprocessing.postprocess import apply_postprocess, area_scale_for

        h, w = prob.shape
        mask = apply_postprocess(
            prob, params or self.params, area_scale_for((h * w) ** 0.5), cls_prob
        )
        return mask, rle_encode(mask, relative=self.relative)
