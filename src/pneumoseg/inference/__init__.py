"""Inference: ensembles of fold models with TTA, the Predictor, submissions, overlays."""
