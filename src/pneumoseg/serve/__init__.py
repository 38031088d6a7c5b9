"""The web app (``src/serve.py``): an API and a page over the experiment's
:class:`~pneumoseg.inference.predictor.Predictor`. :func:`create_app` builds it from a resolved config."""

from pneumoseg.serve.app import create_app

__all__ = ["create_app"]
