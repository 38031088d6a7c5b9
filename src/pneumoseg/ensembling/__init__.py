"""Ensembling: choosing the blend of experiments on out-of-fold predictions."""
