"""Serve an experiment over HTTP: an API and a page (FastAPI + uvicorn).

    python src/serve.py --config configs/demo.yaml [--host 127.0.0.1] [--port 8000] [serve.key=value ...]

Loads the experiment's fold ensemble, TTA views and tuned post-processing once, through the same
code as ``predict.py``, then answers ``POST /api/predict`` (DICOM/PNG/JPEG files -> JSON per
image), ``GET /health`` and FastAPI's docs at ``/docs``. Without a trained experiment it still
starts; ``/health`` and every prediction say what to run. Limits (body size, pixels, files,
concurrency, CORS) are the ``serve`` section of the config. Binds 127.0.0.1 unless told otherwise.

Exit status: 0 after a clean shutdown (Ctrl-C); 2 a user error (config, port in use).
"""

from __future__ import annotations

import logging
import sys

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations loads)
from pneumoseg.cli import config_from_args, make_parser, run, setup_logging

log = logging.getLogger("pneumoseg.serve")


def parse_args(argv=None):
    ap = make_parser(__doc__.split("\n\n")[0], "serve.max_files=4")
    ap.add_argument("--host", help="bind address (default serve.host: 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default serve.port: 8000)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.serve.app import create_app, serve_forever

    extra = [f"serve.host={args.host}"] if args.host else []
    extra += [f"serve.port={args.port}"] if args.port is not None else []
    args.overrides = [*args.overrides, *extra]
    cfg = config_from_args(args)
    serve_forever(create_app(cfg), cfg["serve"])
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
