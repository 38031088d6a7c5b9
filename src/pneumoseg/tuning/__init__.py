"""Tuning: the post-processing searched on the out-of-fold maps (between training and inference).

:func:`tune` is the phase ``src/oof_tune.py`` runs: it reads the OOF maps the training wrote,
searches the ``tune`` grids and writes the chosen setting (``postprocess.yaml``, applied by
:mod:`pneumoseg.inference`) with its report; :mod:`pneumoseg.tuning.provenance` records what a
tuning was made from and checks it before it is applied.

    result = pneumoseg.tuning.tune(cfg)    # -> TuneResult: params, cv_dice, table, files
"""

from pneumoseg.tuning.outputs import TUNING_FILES
from pneumoseg.tuning.run import TuneResult, tune

__all__ = ["TUNING_FILES", "TuneResult", "tune"]
