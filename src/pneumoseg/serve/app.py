"""The FastAPI app: ``POST /api/predict``, ``GET /health`` and FastAPI's docs, over the same
:class:`pneumoseg.predictor.Predictor` as ``predict.py`` (so a response and a submission row agree
pixel for pixel on the same image).

Limits (the ``serve`` config section): a request-body cap (413, checked on the declared length
and again while the body streams in), at most ``max_files`` files, a pixel cap read from each
image's header before decoding (413), the type by content (415), bounded inference: at most
``concurrency`` forward passes at once and ``queue`` requests waiting, anything beyond gets 503
at once with ``Retry-After``. Error bodies carry fixed texts only; logs carry counts, types,
sizes, statuses and timings, never file names, DICOM tags or exception text.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import (  # module level: FastAPI resolves the handlers' annotations here
    FastAPI,
    Request,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pneumoseg.errors import UserError
from pneumoseg.serve.uploads import Decoded, UploadError, decode_upload
from pneumoseg.visualize import components, overlay

log = logging.getLogger("pneumoseg.serve")

STATIC = Path(__file__).resolve().parent / "static"  # the page: plain HTML/CSS/JS, no build step
SECURITY_HEADERS = {
    # the page loads only its own files; images are data:/blob: URLs made in the browser
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# PNGs a client may ask for (base64 in the JSON): the final mask, the server-drawn overlay, the
# probability map (p x 255: the page re-thresholds it without a new forward pass) and the decoded
# grey image (browsers cannot show DICOM).
OUTPUTS = ("mask", "overlay", "prob", "image")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, by the declared
    ``Content-Length`` before reading anything, and by counting while a body streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, self.limit)


async def _too_large(send, limit: int) -> None:
    import json

    body = json.dumps({"detail": f"request body over the server's limit of {limit:,} bytes"})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


class Gate:
    """At most ``concurrency`` jobs running and ``queue`` waiting; :meth:`enter` says at once
    whether there is room (False: the caller answers 503)."""

    def __init__(self, concurrency: int, queue: int):
        self.run = threading.BoundedSemaphore(concurrency)
        self.capacity = concurrency + queue
        self.inside = 0
        self.lock = threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.inside >= self.capacity:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


class Service:
    """The loaded experiment (or why there is none) and the prediction of decoded uploads."""

    def __init__(self, cfg: Mapping[str, Any], predictor=None):
        from pneumoseg import __version__

        self.cfg, self.version = cfg, __version__
        self.predictor, self.problem = predictor, None
        if predictor is None:
            try:
                from pneumoseg.predictor import Predictor

                self.predictor = Predictor(dict(cfg), relative=cfg["predict"]["rle"] == "relative")
            except UserError as e:
                # the details (paths of this server's files) go to its log; /health says what
                # to do in a fixed text
                self.problem = (
                    f"no trained model for experiment {cfg['exp']!r}: train it (python "
                    "src/train.py --config <config> --fold k for every fold, or make demo for the "
                    "demo experiment) and restart the server; its log says what is missing"
                )
                log.error("no model loaded: %s", e)
        sc = cfg["serve"]
        device = getattr(self.predictor, "device", None)
        auto = 1 if device is None or getattr(device, "type", "cpu") == "cpu" else 2
        conc = int(sc["concurrency"] or auto)
        queue = int(sc["queue"] if sc["queue"] is not None else 2 * conc)
        self.gate = Gate(conc, queue)
        self.concurrency, self.queue = conc, queue

    def health(self) -> dict:
        p = self.predictor
        return {
            "status": "ok" if p is not None else "no_model",
            "model_loaded": p is not None,
            "experiment": str(self.cfg["exp"]),
            "models": 0 if p is None else len(p.members),
            "folds": self.cfg["predict"]["folds"],  # null: every fold model of the experiment
            "tta": list(self.cfg["predict"]["tta"] or []),
            "device": None if p is None else str(p.device),
            "input_size": int(self.cfg["cache"]["size"]),
            "postprocess": None if p is None else dict(p.params),  # validated: plain values
            "concurrency": self.concurrency,
            "queue": self.queue,
            "version": self.version,
            "problem": self.problem,
        }

    def predict(self, decoded: list[Decoded], outputs: set[str]) -> list[dict]:
        """Forward pass of decoded images (one batch per ``predict.batch_size``) -> results."""
        p = self.predictor
        out: list[dict] = []
        with self.gate.run:  # one of the run slots (the request already entered the gate)
            for start in range(0, len(decoded), p.batch_size):
                chunk = decoded[start : start + p.batch_size]
                probs, cls = p.probs_of([d.image for d in chunk])
                for j, d in enumerate(chunk):
                    c = None if cls is None else float(cls[j])
                    out.append(self._result(d, probs[j], c, outputs))
        return out

    def _result(self, d: Decoded, prob: np.ndarray, cls: float | None, outputs: set[str]) -> dict:
        mask, rle = self.predictor.finish(prob, cls)
        image_prob = float(prob.max()) if cls is None else cls
        res = {
            "kind": d.kind,
            "threshold": _threshold_of(self.predictor.params),
            "height": int(d.image.shape[0]),
            "width": int(d.image.shape[1]),
            "probability": round(image_prob, 6),
            "decision": "pneumothorax" if mask.any() else "no pneumothorax",
            "area": int(mask.sum()),
            "rle": rle,
            "components": [
                {
                    **c,
                    "score": round(c["score"], 6),
                    "max_probability": round(c["max_probability"], 6),
                }
                for c in components(mask, prob)
            ],
        }
        if "mask" in outputs:
            res["mask_png"] = _png_b64((mask > 0).astype(np.uint8) * 255)
        if "prob" in outputs:
            res["prob_png"] = _png_b64(np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8))
        if "image" in outputs:
            res["image_png"] = _png_b64(d.image)
        if "overlay" in outputs:
            pic = overlay(d.image, prob, mask, image_prob=image_prob)
            res["overlay_png"] = _png_b64(pic[..., ::-1])  # RGB -> BGR for OpenCV
        return res


def _threshold_of(params: Mapping[str, Any]) -> float:
    """The pixel threshold of the tuned post-processing (the triplet's bottom threshold): where
    the page's threshold slider starts."""
    t = params.get("threshold") if params.get("method") == "threshold" else None
    t = params.get("bottom_threshold") if t is None else t
    return float(0.5 if t is None else t)


def _png_b64(arr: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def safe_id(name: str | None, index: int) -> str:
    """An id for the response (the CSV row): the file's stem when it is a plain name of letters,
    digits, ``._-`` (no path, at most 128 characters), else ``image-<index>``. It is never used as
    a path and never logged."""
    import re

    stem = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    if stem and len(stem) <= 128 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem):
        return stem
    return f"image-{index}"


class RedactPydicom(logging.Filter):
    """pydicom logs values it finds odd ("Invalid value for VR UI: '<the UID>'"): in the server
    such records keep their level but lose their text, so no tag value reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "pydicom message withheld (it may quote DICOM values)", ()
        return True


def _redact_pydicom() -> None:
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, RedactPydicom) for f in logger.filters):
        logger.addFilter(RedactPydicom())


def create_app(cfg: Mapping[str, Any], predictor=None):
    """The app for a resolved config (its ``serve`` section); ``predictor`` for tests."""
    sc = cfg["serve"]
    _redact_pydicom()
    service = Service(cfg, predictor)
    app = FastAPI(
        title="pneumoseg",
        version=service.version,
        description="Pneumothorax segmentation of chest X-rays. Research use only, not for "
        "diagnosis.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=int(float(sc["max_body_mb"]) * 1024 * 1024))
    max_files, max_pixels = int(sc["max_files"]), int(sc["max_pixels"])
    if sc["cors_origins"]:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(sc["cors_origins"]),
                           allow_methods=["GET", "POST"], allow_headers=["*"])  # fmt: skip

    def error(status: int, detail: str, **extra) -> JSONResponse:
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith(("/docs", "/redoc")):  # Swagger UI loads a CDN
            response.headers.update(SECURITY_HEADERS)
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health() -> dict:
        return service.health()

    @app.post("/api/predict")
    async def predict(request: Request, outputs: str = ""):
        """One or more files (multipart field ``files``) -> one result per file, in order.
        ``outputs``: comma-separated PNGs to include (``mask``, ``overlay``, ``prob``)."""
        t0 = time.perf_counter()
        want = {o for o in outputs.split(",") if o}
        if want - set(OUTPUTS):
            return error(422, f"unknown outputs; valid: {', '.join(OUTPUTS)}")
        if service.predictor is None:
            return error(503, "no model is loaded: see GET /health for what to run")
        try:
            form = await request.form(max_files=max_files, max_fields=max_files + 8)
        except Exception:  # malformed multipart, too many parts: nothing of it is echoed
            return error(400, f"expected multipart/form-data with up to {max_files} files "
                              "in the field 'files'")  # fmt: skip
        uploads = [f for f in form.getlist("files") if hasattr(f, "read")]
        if not uploads:
            await form.close()
            return error(422, "no file in the multipart field 'files'")
        if not service.gate.enter():
            await form.close()
            log.warning("over capacity: 503 (%d files)", len(uploads))
            return error(503, "the server is busy: retry shortly")
        try:
            items, good = [], []
            for i, up in enumerate(uploads):
                data = await up.read()
                item = {"index": i, "id": safe_id(up.filename, i), "bytes": len(data)}
                try:
                    d = decode_upload(data, max_pixels)
                    if d.image_id:
                        item["id"] = d.image_id
                    good.append((item, d))
                except UploadError as e:
                    item["error"] = {"status": e.status, "detail": e.message}
                items.append(item)
            await form.close()
            results = await run_in_threadpool(
                service.predict, [d for _, d in good], want
            ) if good else []  # fmt: skip
            for (item, _), res in zip(good, results, strict=True):
                item.update(res)
        finally:
            service.gate.leave()
        failed = [it for it in items if "error" in it]
        log.info(
            "predict: %d file(s) (%s), %d failed, %.2f s",
            len(items),
            ",".join(sorted({it.get("kind", "?") for it in items})),
            len(failed),
            time.perf_counter() - t0,
        )
        if len(failed) == len(items):
            first = failed[0]["error"]
            return error(first["status"], first["detail"], results=items)
        return {"results": items}

    return app


def serve_forever(app, sc: Mapping[str, Any]) -> None:
    """Run ``app`` with uvicorn on ``serve.host:serve.port`` until Ctrl-C; a port in use is a
    :class:`~pneumoseg.errors.UserError`, checked before uvicorn starts."""
    import socket

    import uvicorn

    from pneumoseg.errors import ConfigError

    host, port = str(sc["host"]), int(sc["port"])
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port, or stop "
            "what uses it"
        ) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from the network, with no authentication", host)
    log.info("serving on http://%s:%d/ (API docs at /docs)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
