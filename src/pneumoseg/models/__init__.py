"""Models: the registry of model families, the families themselves, losses."""
