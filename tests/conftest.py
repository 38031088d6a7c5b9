import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("PNEUMOSEG_REAL_DATA", REPO.parent / "shared" / "data" / "siim-real"))


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The real SIIM files (../shared/data/siim-real); tests using it skip when it is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real SIIM test files not found at {REAL}")
    return REAL


def real_xrays(real_dir: Path, n: int, size: int = 64):
    """The first ``n`` real SIIM training DICOMs decoded and resized: uint8 (n, size, size)."""
    import numpy as np

    from pneumoseg.data.intake import read_image
    from pneumoseg.data.resize import resize_image

    files = sorted((real_dir / "train_extract").glob("*.dcm"))[:n]
    assert len(files) == n, f"{real_dir}: {len(files)} training DICOMs, {n} needed"
    return np.stack([resize_image(read_image(f), size) for f in files])


# configs/demo.yaml made tiny (64 px, 2 folds of one step): the demo's logic, not its numbers.
# Merged section by section over the demo config (tests/test_no_data_loss.py, test_python_api.py).
TINY_DEMO = {
    "data": {"original_size": 64},
    "cache": {"size": 64, "n_jobs": 1},
    "folds": {"n_folds": 2},
    "model": {"decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 4, "val_batch_size": 8,
              "top_k": 1},
    "oof": {"size": 32},
}  # fmt: skip


def run_script(script: str, *args: str, cwd: Path = REPO, timeout: int = 600, module=False):
    """Run ``python src/<script>.py args`` like a user does; fail with its output on error."""
    import subprocess
    import sys

    cmd = [sys.executable, *(["-m", script] if module else [str(REPO / "src" / f"{script}.py")])]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[1:])} {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def tiny_overrides(root: Path) -> list[str]:
    """Overrides that point configs/demo.yaml at a tiny dataset under ``root`` (64 px, 2 folds,
    a couple of optimiser steps per epoch) and keep every output inside ``root``."""
    return [
        f"data.root={root / 'data'}",
        "data.original_size=64",
        f"cache.dir={root / 'cache'}",
        "cache.size=64",
        "cache.n_jobs=1",
        f"folds.file={root / 'folds.csv'}",
        "folds.n_folds=2",
        f"train.out_dir={root / 'runs'}",
        "train.batch_size=4",
        "train.val_batch_size=8",
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
        "train.top_k=2",
        "model.encoder=resnet18",
        "model.decoder_channels=[32, 16, 16, 8, 8]",
        "oof.size=32",
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 32-image synthetic SIIM dataset at 64 px, cached and split into 2 folds, via the CLIs."""
    root = tmp_path_factory.mktemp("tiny")
    run_script(
        "make_synthetic",
        "--out",
        str(root / "data"),
        "--n-train",
        "32",
        "--n-test",
        "6",
        "--size",
        "64",
        "--seed",
        "3",
        "--positive-rate",
        "0.4",
    )
    over = tiny_overrides(root)
    run_script("preprocess", "--config", "configs/demo.yaml", "--split", "all", *over)
    run_script("make_folds", "--config", "configs/demo.yaml", *over)
    return root


_SCRIPTS: dict = {}


def load_script(name: str):
    """The module of ``src/<name>.py`` (imported once), as its ``__main__`` would see it."""
    import importlib.util
    import sys

    if name not in _SCRIPTS:
        if str(REPO / "src") not in sys.path:
            sys.path.insert(0, str(REPO / "src"))
        spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "src" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


def run_cli(script: str, *args: str) -> tuple[int, str]:
    """Run a script's ``main`` in-process through the shared entry wrapper, like its
    ``__main__`` does; returns (exit code, everything it logged or printed). A bug (an exception
    that is not a user error) propagates and fails the test."""
    import contextlib
    import io
    import logging

    from pneumoseg.cli import run

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = run(load_script(script).main, list(args))
    finally:
        root.removeHandler(handler)
        for h in [h for h in root.handlers if getattr(h, "_pneumoseg_logfile", False)]:
            root.removeHandler(h)  # a train.log handler would outlive the test's tmp folder
            h.close()
    return code, buf.getvalue()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(*argv: str, python: str | None = None):
    """``src/serve.py *argv`` on a free 127.0.0.1 port: ``(process, url)`` once ``/health``
    reports a loaded model; fails the test with the server's output otherwise. Stop it with
    :func:`stop_serve`."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [python or sys.executable, str(REPO / "src" / "serve.py"), *argv, "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["model_loaded"]:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"the server did not start: {proc.communicate()[0]}")


def stop_serve(proc) -> str:
    """Ctrl-C the server of :func:`start_serve`; its whole output."""
    import signal

    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)[0]


@pytest.fixture(autouse=True, scope="module")
def _no_serve_redaction_leaks():
    """The web app redacts foreign loggers at every handler of its process (serve.app
    ``redact_foreign_logs``); in one test process that would withhold later modules' script
    logs: take its filters off again after each test module (not after each test: a module's
    app, built once, keeps redacting for all of that module's tests)."""
    yield
    import logging
    import sys

    serve_app = sys.modules.get("pneumoseg.serve.app")
    if serve_app is None:  # the app was never built in this process
        return

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for f in list(getattr(logger, "filters", [])):
            if isinstance(f, serve_app.RedactPydicom):
                logger.removeFilter(f)
        for handler in getattr(logger, "handlers", []):
            for f in list(handler.filters):
                if isinstance(f, serve_app.RedactForeign):
                    handler.removeFilter(f)
