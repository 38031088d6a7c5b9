"""The FastAPI app: ``POST /api/predict``, ``GET /health`` and FastAPI's docs, over the same
:class:`pneumoseg.inference.predictor.Predictor` as ``predict.py`` (so a response and a submission row agree
pixel for pixel on the same image).

Limits (the ``serve`` config section), in the order a request meets them:

* capacity: at most ``concurrency`` requests running and ``queue`` more inside (receiving their
  body, waiting for a slot); a request counts from its first byte, and one beyond gets 503 at
  once with ``Retry-After``;
* the body: ``max_body_mb`` (413, by the declared length and again while it streams in, chunked
  or not) within ``body_timeout_s`` (408, connection closed: a body that never completes cannot
  hold a place for ever);
* ``max_files`` files, each checked by content (415) and by every size its headers declare
  against ``max_pixels`` (413) before any pixel is decoded (see :mod:`.uploads`);
* ``max_request_pixels``: the header pixels of a request's files together (413);
* decoding starts only once the request holds a run slot and its pixels fit in
  ``max_inflight_pixels``, the server-wide budget of pixels being decoded and predicted.

Error bodies carry fixed texts only. Logs carry counts, types, sizes, statuses and timings, never
file names, DICOM tags or exception text: every record of a logger the app does not own (pydicom's
children, PIL, warnings...) loses its text and traceback at the handlers (:class:`RedactForeign`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import (  # module level: FastAPI resolves the handlers' annotations here
    FastAPI,
    Query,
    Request,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pneumoseg.errors import UserError
from pneumoseg.postprocessing.postprocess import pixel_threshold
from pneumoseg.safe_text import safe_id
from pneumoseg.serve.api_models import (
    FAILURE_EXAMPLE,
    HealthAnswer,
    PredictAnswer,
    error_responses,
    keep_nulls_in_examples,
    ok_examples,
    upload_body,
)
from pneumoseg.serve.uploads import Decoded, Header, UploadError, decode, inspect_upload
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
PREDICT_PATH = "/api/predict"

# PNGs a client may ask for (base64 in the JSON): the final mask, the server-drawn overlay, the
# probability map (p x 255: the page re-thresholds it without a new forward pass) and the decoded
# grey image (browsers cannot show DICOM); and for a DICOM upload its DICOM SEG (BINARY, the
# final mask) for a viewer or PACS.
OUTPUTS = ("mask", "overlay", "prob", "image", "seg")

# The fixed texts of the app's own refusals (also the examples in /openapi.json).
BUSY = "the server is busy: retry shortly"
NO_MODEL = "no model is loaded: see GET /health for what to run"
NO_FILE = "no file in the multipart field 'files'"
UNKNOWN_OUTPUTS = f"unknown outputs; valid: {', '.join(OUTPUTS)}"
OUTPUTS_TEXT = (
    f"comma-separated outputs to add to each result, in base64: {', '.join(OUTPUTS)} (PNGs; "
    "`seg`: the DICOM SEG of a DICOM upload)"
)
SEG_FAILED = (
    "no DICOM SEG: this DICOM lacks what a SEG must reference (e.g. a SOPInstanceUID) or "
    "cannot be segmented as one image"
)


def too_large_text(limit: int) -> str:
    return f"request body over the server's limit of {limit:,} bytes"


def too_slow_text(timeout_s: float) -> str:
    return (f"the request body did not arrive within {timeout_s:g} s: the connection "
            "is closed; send it again, faster or in smaller requests")  # fmt: skip


def not_multipart_text(max_files: int) -> str:
    return f"expected multipart/form-data with up to {max_files} files in the field 'files'"


def too_many_pixels_text(total: int, cap: int) -> str:
    return (f"the files hold {total:,} pixels together, more than the server accepts per "
            f"request ({cap:,}): send fewer or smaller images per request")  # fmt: skip


class BodyRefused(Exception):
    """The request body broke a limit; ``status`` and ``detail`` are the answer."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class RequestGuard:
    """ASGI middleware, outermost: the capacity gate for ``POST /api/predict`` (entered before
    its body is read, left when its answer is sent), the body cap (413) and the body deadline
    (408). A broken limit is answered with its own status wherever it is noticed: even when the
    app caught the exception (a form parser does) and tried to answer something else."""

    def __init__(self, app, limit: int, timeout_s: float, gate: Gate):
        self.app, self.limit, self.timeout_s, self.gate = app, int(limit), float(timeout_s), gate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gated = scope["method"] == "POST" and scope["path"] == PREDICT_PATH
        if gated and not self.gate.enter():
            log.warning("over capacity: 503")
            return await _answer(send, 503, BUSY)
        inside = [gated]

        def leave() -> None:  # once: at the answer's last byte, or when the request ends
            if inside[0]:
                inside[0] = False
                self.gate.leave()

        async def send_then_leave(message):
            # the place is given back before the last byte goes out: a client that sends its next
            # request the moment it has its answer must find it free (else "at capacity" 503s
            # reach clients that never exceed the cap)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                leave()
            await send(message)

        try:
            await self._guarded(scope, receive, send_then_leave if gated else send)
        finally:
            leave()

    async def _guarded(self, scope, receive, send):
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _answer(send, 413, self._too_large)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        seen, complete, started, refused = 0, False, False, None

        async def guarded_receive():
            nonlocal seen, complete, refused
            if complete:  # the body is in: later reads wait for a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                refused = BodyRefused(408, self._too_slow)
                raise refused from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    refused = BodyRefused(413, self._too_large)
                    raise refused
            return message

        async def guarded_send(message):
            nonlocal started
            if refused is not None:  # the app's own answer to a broken body is replaced
                if not started:
                    started = True
                    await _answer(send, refused.status, refused.detail)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except BodyRefused as e:
            if not started:
                await _answer(send, e.status, e.detail)
        else:
            if refused is not None and not started:  # the app caught it and answered nothing
                await _answer(send, refused.status, refused.detail)

    @property
    def _too_large(self) -> str:
        return too_large_text(self.limit)

    @property
    def _too_slow(self) -> str:
        return too_slow_text(self.timeout_s)


async def _answer(send, status: int, detail: str) -> None:
    """A JSON error that closes the connection (the rest of the body is never read)."""
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"x-content-type-options", b"nosniff")]  # fmt: skip
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


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


class PixelBudget:
    """Pixels being decoded or predicted, server-wide: :meth:`hold` waits until ``n`` more fit
    under ``limit`` (a request never asks for more than the whole budget: the config checks
    ``max_request_pixels <= max_inflight_pixels``)."""

    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0
        self.cond = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(int(n), self.limit)
        with self.cond:
            self.cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


class RequestTooLarge(Exception):
    """A request whose files hold more header pixels together than ``max_request_pixels``."""


class Service:
    """The loaded experiment (or why there is none), the limits, and the prediction of uploads."""

    def __init__(self, cfg: Mapping[str, Any], predictor=None):
        from pneumoseg import __version__

        self.cfg, self.version = cfg, __version__
        self.predictor, self.problem = predictor, None
        self.seg_algorithm = None  # what a DICOM SEG records of the experiment, on first use
        if predictor is None:
            try:
                from pneumoseg.inference.predictor import Predictor

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
        conc = int(sc["concurrency"] or auto_concurrency(self.predictor, cfg["predict"]["threads"]))
        queue = int(sc["queue"] if sc["queue"] is not None else 2 * conc)
        self.gate = Gate(conc, queue)
        self.concurrency, self.queue = conc, queue
        self.max_pixels = int(sc["max_pixels"])
        self.max_request_pixels = int(sc["max_request_pixels"])
        self.pixels = PixelBudget(int(sc["max_inflight_pixels"]))

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
            "backend": getattr(p, "backend", None),
            "precision": getattr(p, "precision", None),
            "threads": self.cfg["predict"]["threads"],
            "runtime_reason": getattr(getattr(p, "engine", None), "reason", None),
            "input_size": int(self.cfg["cache"]["size"]),
            "postprocess": None if p is None else dict(p.params),  # validated: plain values
            "concurrency": self.concurrency,
            "queue": self.queue,
            "max_pixels": self.max_pixels,
            "max_request_pixels": self.max_request_pixels,
            "version": self.version,
            "problem": self.problem,
        }

    def run_request(self, files: list[tuple[str | None, Any]], outputs: set[str]) -> list[dict]:
        """Uploads (file name, file object) -> one result per file, in order (runs in a worker
        thread). Headers first, for every file; then, holding a run slot and the pixels of the
        request, decoding and prediction, one batch at a time."""
        items, headers = [], []
        for i, (name, fh) in enumerate(files):
            data = fh.read()
            item = {"index": i, "id": id_of_name(name, i), "bytes": len(data)}
            try:
                h = inspect_upload(data, self.max_pixels)
                item["id"] = safe_id(h.image_id, fallback=item["id"])  # a DICOM's own id first
                item["kind"] = h.kind
                headers.append((item, h))
            except UploadError as e:
                item["error"] = {"status": e.status, "detail": e.message}
            items.append(item)
            del data  # a PNG/JPEG header keeps its bytes; a DICOM's keeps its parsed dataset
        total = sum(h.pixels for _, h in headers)
        if total > self.max_request_pixels:
            raise RequestTooLarge(total)
        if headers:
            with self.gate.run, self.pixels.hold(total):
                self._predict(headers, outputs)
        return items

    def _predict(self, headers: list[tuple[dict, Header]], outputs: set[str]) -> None:
        """Decode and predict one ``predict.batch_size`` batch at a time, so that at most one
        batch of decoded images is in memory; results go into the items."""
        p = self.predictor
        for start in range(0, len(headers), p.batch_size):
            batch: list[tuple[dict, Decoded]] = []
            for item, h in headers[start : start + p.batch_size]:
                try:
                    batch.append((item, decode(h)))
                except UploadError as e:
                    item["error"] = {"status": e.status, "detail": e.message}
            if not batch:
                continue
            probs, cls = p.probs_of([d.image for _, d in batch])
            for j, (item, d) in enumerate(batch):
                c = None if cls is None else float(cls[j])
                item.update(self._result(d, probs[j], c, outputs))

    def _result(self, d: Decoded, prob: np.ndarray, cls: float | None, outputs: set[str]) -> dict:
        mask, rle = self.predictor.finish(prob, cls)
        if d.info is not None:  # public facts about the pixels: no name, id or tag text
            log.debug("upload intake: %s", d.info.as_dict())
        image_prob = float(prob.max()) if cls is None else cls
        res = {
            "kind": d.kind,
            "threshold": pixel_threshold(self.predictor.params),
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
            "intake": d.info.as_dict() if d.info is not None else None,
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
        if "seg" in outputs:
            res.update(self._seg(d, mask))
        return res

    def _seg(self, d: Decoded, mask: np.ndarray) -> dict:
        """``seg_dcm`` (base64 DICOM SEG, BINARY) for a DICOM upload, else ``seg_note``; written
        in a private temp folder that goes with the request (uploads never reach disk by name),
        read back and checked by the writer first. Notes are fixed texts."""
        from pneumoseg.inference.dicom_seg import write_seg
        from pneumoseg.inference.seg_outputs import NOT_DICOM, algorithm_of

        if d.kind != "dicom" or d.dataset is None:
            return {"seg_note": NOT_DICOM.format(kind=d.kind.upper())}
        with tempfile.TemporaryDirectory(prefix="pneumoseg-seg-") as tmp:
            try:
                if self.seg_algorithm is None:
                    self.seg_algorithm = algorithm_of(self.cfg, self.predictor.params)
                path = write_seg(d.dataset, mask, Path(tmp) / "seg.dcm", self.seg_algorithm)
            except UserError:
                return {"seg_note": SEG_FAILED}
            return {"seg_dcm": base64.b64encode(path.read_bytes()).decode("ascii")}


def auto_concurrency(predictor, threads: int | None) -> int:
    """Forward passes at once when ``serve.concurrency`` is null: on a CPU, as many as the cores
    hold at ``predict.threads`` each (1 when each pass takes every core); 2 on a GPU."""
    device = getattr(predictor, "device", None)
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return 2
    if not threads:
        return 1
    return max(1, (os.cpu_count() or 1) // int(threads))


def _png_b64(arr: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def id_of_name(name: str | None, index: int) -> str:
    """The id of an upload from its file name: the stem of its last path part through
    :func:`~pneumoseg.safe_text.safe_id` (``image-<index>`` without a name). A DICOM's
    SOPInstanceUID replaces it. The name is never used as a path and never logged."""
    stem = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return safe_id(stem, fallback=f"image-{index}")


# ----------------------------------------------------------------------------------------- logs
OWN_LOGGERS = ("pneumoseg",)  # records kept as they are
SERVER_LOGGERS = ("uvicorn",)  # kept, less any traceback (its text may quote a request)


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


class RedactForeign(logging.Filter):
    """On a *handler*, so that it sees every record that reaches it, from any logger and its
    children (a filter on the ``pydicom`` logger misses ``pydicom.pixels.*``): records of the
    app's own loggers pass; uvicorn's keep their line but lose any traceback; every other
    logger's (pydicom, PIL, python-multipart, warnings...) keeps its level and logger name and
    loses its text, arguments and traceback, which may quote DICOM values or file names."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _under(record.name, OWN_LOGGERS):
            return True
        if _under(record.name, SERVER_LOGGERS):
            if record.exc_info or record.exc_text or record.stack_info:
                exc = record.exc_info[1] if record.exc_info else None
                kind = f": {type(exc).__name__}" if exc is not None else ""
                record.msg, record.args = f"{record.getMessage()} (traceback withheld{kind})", ()
                record.exc_info, record.exc_text, record.stack_info = None, None, None
            return True
        record.msg = f"{record.name}: message withheld (third-party text may quote DICOM values)"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


class RedactPydicom(logging.Filter):
    """On the ``pydicom`` logger itself: its own records lose their text under any handler,
    including ones attached after the app started (a test's capture). Its children's records
    are :class:`RedactForeign`'s."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "pydicom message withheld (it may quote DICOM values)", ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def redact_foreign_logs() -> None:
    """Attach :class:`RedactForeign` to every handler in the process (the root's and those of
    configured loggers such as uvicorn's); again after a logging configuration adds handlers."""
    pydicom_logger = logging.getLogger("pydicom")
    if not any(isinstance(f, RedactPydicom) for f in pydicom_logger.filters):
        pydicom_logger.addFilter(RedactPydicom())
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, RedactForeign) for f in handler.filters):
                handler.addFilter(RedactForeign())


# ------------------------------------------------------------------------------------------ app
def create_app(cfg: Mapping[str, Any], predictor=None):
    """The app for a resolved config (its ``serve`` section); ``predictor`` for tests."""
    sc = cfg["serve"]
    redact_foreign_logs()
    service = Service(cfg, predictor)
    app = _fastapi(
        title="pneumoseg",
        version=service.version,
        description="Pneumothorax segmentation of chest X-rays. Research use only, not for "
        "diagnosis. Each result's `id` is the DICOM's SOPInstanceUID, else the file's stem, when "
        "it is a valid DICOM UID or a plain name (a letter or digit, then up to 127 of "
        "`A-Za-z0-9._-`); any other value becomes `sha256-` + the first 12 hex digits of its "
        "SHA-256 (UTF-8); no value at all: `image-<n>`.",
    )
    app.state.service = service
    max_files = int(sc["max_files"])
    limit, timeout_s = int(float(sc["max_body_mb"]) * 1024 * 1024), float(sc["body_timeout_s"])
    _add_middleware(app, sc, service, limit, timeout_s)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_page_and_health(app, service)
    _add_predict(app, service, max_files, _error_examples(service, max_files, limit, timeout_s))
    keep_nulls_in_examples(app)
    return app


def _error(status: int, detail: str, **extra) -> JSONResponse:
    """An error answer: its fixed ``detail`` text (and ``extra`` fields); ``Retry-After`` on
    429 and 503."""
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def _add_middleware(
    app: FastAPI, sc: Mapping[str, Any], service: Service, limit: int, timeout_s: float
) -> None:
    """CORS (when ``serve.cors_origins``), the security headers, then the request guard."""
    if sc["cors_origins"]:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(sc["cors_origins"]),
                           allow_methods=["GET", "POST"], allow_headers=["*"])  # fmt: skip

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith(("/docs", "/redoc")):  # their pages run inline JS
            response.headers.update(SECURITY_HEADERS)
        return response

    # added last: the outermost layer, so that capacity is decided before anything else runs
    app.add_middleware(RequestGuard, limit=limit, timeout_s=timeout_s, gate=service.gate)


def _add_page_and_health(app: FastAPI, service: Service) -> None:
    """``GET /`` (the page, not in the schema) and ``GET /health``."""

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # JSONResponse named: answers through the models are rendered by json.dumps as before, not
    # by pydantic's JSON writer (which prints some floats differently, 1e-7 for 1e-07)
    @app.get("/health", response_model=HealthAnswer, response_class=JSONResponse)
    def health() -> dict:
        """The loaded experiment (or what to run without one) and the server's limits."""
        return service.health()


def _add_predict(app: FastAPI, service: Service, max_files: int, examples: dict) -> None:
    """``POST /api/predict``, documented with ``examples`` of its error answers."""

    @app.post(PREDICT_PATH, response_model=PredictAnswer, response_model_exclude_unset=True,
              response_class=JSONResponse, responses={200: {"content": {"application/json": {
                  "examples": ok_examples()}}}, **error_responses(examples)},
              openapi_extra={"requestBody": upload_body(max_files)})  # fmt: skip
    async def predict(
        request: Request,
        outputs: Annotated[str, Query(description=OUTPUTS_TEXT)] = "",
    ):
        """One or more files (multipart field ``files``) -> one result per file, in order; a
        file that fails gets its own ``error`` and the others are still predicted (200), unless
        every file fails (the first file's status). The server reads the body itself, within
        the limits that ``GET /health`` lists; the request body below documents it.
        """
        t0 = time.perf_counter()
        want = {o for o in outputs.split(",") if o}
        if want - set(OUTPUTS):
            return _error(422, UNKNOWN_OUTPUTS)
        if service.predictor is None:
            return _error(503, NO_MODEL)
        try:
            form = await request.form(max_files=max_files, max_fields=max_files + 8)
        except BodyRefused:
            raise  # RequestGuard answers 413 / 408
        except Exception:  # malformed multipart, too many parts: nothing of it is echoed
            return _error(400, not_multipart_text(max_files))
        try:
            uploads = [(f.filename, f.file) for f in form.getlist("files") if hasattr(f, "read")]
            if not uploads:
                return _error(422, NO_FILE)
            items = await run_in_threadpool(service.run_request, uploads, want)
        except RequestTooLarge as e:
            log.warning("request over the pixel cap: 413 (%d files)", len(uploads))
            return _error(413, too_many_pixels_text(e.args[0], service.max_request_pixels))
        finally:
            await form.close()
        return _answer_items(items, t0, _error)


def _fastapi(**kwargs) -> FastAPI:
    """The app object: ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from this server
    (fastapi-offline's copies) when fastapi-offline is installed, else from their CDN."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:  # pragma: no cover - installed with pneumoseg
        return FastAPI(**kwargs)
    return FastAPIOffline(**kwargs)


def _error_examples(service: Service, max_files: int, limit: int, timeout_s: float) -> dict:
    """Named example bodies of each error status of ``POST /api/predict``, with this server's
    limits in their texts."""

    def failed(status: int, detail: str, name: str, size: int) -> dict:
        entry = {"index": 0, "id": name, "bytes": size, "error": {"status": status,
                 "detail": detail}}  # fmt: skip
        return {"detail": detail, "results": [entry]}

    side, over = int(service.max_pixels**0.5) + 1, 4 * service.max_request_pixels
    unsupported = FAILURE_EXAMPLE["error"]["detail"]
    per_file = (f"the image has {side}x{side} pixels, more than the server accepts "
                f"({service.max_pixels:,})")  # fmt: skip
    return {
        400: {"not_multipart": {"detail": not_multipart_text(max_files)}},
        408: {"body_too_slow": {"detail": too_slow_text(timeout_s)}},
        413: {
            "body_too_large": {"detail": too_large_text(limit)},
            "request_pixels": {"detail": too_many_pixels_text(over, service.max_request_pixels)},
            "every_file_too_large": failed(413, per_file, "huge", 90_210),
        },
        415: {"every_file_unsupported": failed(415, unsupported, "notes", 300)},
        422: {
            "unknown_outputs": {"detail": UNKNOWN_OUTPUTS},
            "no_file": {"detail": NO_FILE},
            "every_file_unreadable": failed(422, "the file is empty", "blank", 0),
        },
        503: {"busy": {"detail": BUSY}, "no_model": {"detail": NO_MODEL}},
    }


def _answer_items(items: list[dict], t0: float, error) -> dict | JSONResponse:
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
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    redact_foreign_logs()  # uvicorn's logging configuration has just made its handlers
    logging.captureWarnings(True)  # a warning (pydicom's quote values) becomes a redacted record
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn handles SIGINT itself
        uvicorn.Server(config).run()
