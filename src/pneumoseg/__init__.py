"""pneumoseg: pneumothorax segmentation for the SIIM-ACR chest X-ray data.

Each phase of the pipeline is one call (the scripts in ``src/`` are these calls behind argument
parsing)::

    import pneumoseg

    cfg = pneumoseg.load_config("configs/demo.yaml")
    pneumoseg.build_cache(cfg, "train")        # preprocess.py
    pneumoseg.make_folds(cfg)                  # make_folds.py
    pneumoseg.fit(cfg, 0)                      # train.py --fold 0
    pneumoseg.tune(cfg)                        # oof_tune.py
    pneumoseg.predict_submission(cfg)          # predict.py --submission

The names are resolved on first use, so ``import pneumoseg`` stays light (no torch).
"""

import importlib
import os

# albumentations checks PyPI for updates at import; these machines (and many clusters) are
# offline, where the check only costs a timeout. Set before anything imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

# public name -> (module, attribute): the one list of what the package exports
_API = {
    "load_config": ("pneumoseg.config", "load_config"),
    "make_synthetic": ("pneumoseg.data.synthetic", "write_dataset"),
    "build_cache": ("pneumoseg.data.cache", "build_cache"),
    "make_folds": ("pneumoseg.data.folds_file", "make_folds"),
    "fit": ("pneumoseg.training.fit", "fit"),
    "tune": ("pneumoseg.tuning", "tune"),
    "select_ensemble": ("pneumoseg.ensembling.run", "select_ensemble"),
    "Predictor": ("pneumoseg.inference.predictor", "Predictor"),
    "predict_submission": ("pneumoseg.inference.submit", "predict_submission"),
    "predict_images": ("pneumoseg.inference.submit", "predict_images"),
    "validate_submission": ("pneumoseg.inference.submission", "validate_submission"),
    "score_submission": ("pneumoseg.inference.submission", "score_submission"),
    "run_demo": ("pneumoseg.demo", "run_demo"),
    "export_experiments": ("pneumoseg.inference.export", "export_experiments"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """The exported phases, imported when first used (PEP 562)."""
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'pneumoseg' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
