"""What the web API publishes about itself in ``/openapi.json`` (and so in ``/docs``): the
multipart upload of ``POST /api/predict``, the pydantic models of its answers and of
``GET /health``'s, and examples of each.

The endpoint reads its body itself, behind :class:`~pneumoseg.serve.app.RequestGuard`'s body cap
and deadline, so FastAPI never parses or buffers the upload: :func:`upload_body` only *documents*
it (the route's ``openapi_extra``). Each file item says ``format: binary`` (what Swagger UI needs
to draw a file picker for an array of files) next to OpenAPI 3.1's ``contentMediaType``.

The answers go out through these models (``response_model``, unset fields left out): the JSON
is the one the app built, key for key and byte for byte; a key the models do not name is a
server error, not a silent extra.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ID_TEXT = (
    "the DICOM's SOPInstanceUID, else the file name's stem, when it is a valid DICOM UID or a "
    "plain name; otherwise `sha256-` + 12 hex digits of it; no name at all: `image-<index>`"
)
RESULT_EXAMPLE = {
    "index": 0,
    "id": "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819",
    "bytes": 142_346,
    "kind": "dicom",
    "threshold": 0.3,
    "height": 1024,
    "width": 1024,
    "probability": 0.912345,
    "decision": "pneumothorax",
    "area": 1830,
    "rle": "623371 12 1010 15 1007 18",
    "components": [
        {"box": [608, 380, 22, 96], "area": 1830, "score": 0.781202, "max_probability": 0.912345}
    ],
    "intake": {
        "kind": "dicom",
        "bits": 12,
        "photometric": "MONOCHROME1",
        "window": "window",
        "range": [0.0, 4095.0],
        "inverted": True,
        "padding_pixels": 0,
        "rescaled": False,
    },
}
FAILURE_EXAMPLE = {
    "index": 1,
    "id": "notes",
    "bytes": 300,
    "error": {
        "status": 415,
        "detail": "not a DICOM, PNG or JPEG file (checked by content, not by name)",
    },
}
HEALTH_EXAMPLE = {
    "status": "ok",
    "model_loaded": True,
    "experiment": "demo",
    "models": 2,
    "folds": None,
    "tta": ["hflip"],
    "device": "cpu",
    "backend": "openvino",
    "precision": "int8",
    "threads": 2,
    "runtime_reason": "fastest that passed at export on this CPU (0.0042 s/image)",
    "input_size": 128,
    "postprocess": {
        "method": "triplet",
        "min_area": 0,
        "top_threshold": 0.8,
        "top_area": 400,
        "bottom_threshold": 0.3,
    },
    "concurrency": 1,
    "queue": 2,
    "max_pixels": 40_000_000,
    "max_request_pixels": 64_000_000,
    "version": "0.1.0",
    "problem": None,
}


class _Exact(BaseModel):
    """A model that names every key of its JSON."""

    model_config = ConfigDict(extra="forbid")


class Component(_Exact):
    """One 8-connected region of the final mask."""

    box: list[int] = Field(
        min_length=4, max_length=4, description="`[x, y, width, height]` in image pixels"
    )
    area: int = Field(ge=1, description="pixels")
    score: float = Field(ge=0, le=1, description="mean pixel probability over the region")
    max_probability: float = Field(ge=0, le=1, description="highest pixel probability in it")


class Intake(_Exact):
    """What was done to the pixels on their way to the 8-bit grey image the model reads."""

    kind: Literal["dicom", "png", "jpeg"] = Field(description="read from the content")
    bits: int = Field(ge=1, le=32, description="bits stored (DICOM) or significant bits (PNG)")
    photometric: str = Field(description="the DICOM's PhotometricInterpretation, else GREY/RGB")
    window: Literal["as-stored", "bits", "voi-lut", "window", "percentile"] = Field(
        description="`as-stored`: 8-bit data used as it is; `bits`: scaled by its bit depth's "
        "range; `voi-lut`/`window`: the file's VOI LUT or window; `percentile`: no VOI in the "
        "file, the robust 0.5-99.5 percentile window of the non-padding pixels"
    )
    range: list[float] | None = Field(
        None, description="the [low, high] values mapped to black and white"
    )
    inverted: bool = Field(description="MONOCHROME1 inverted so that bright = dense")
    padding_pixels: int = Field(ge=0, description="pixels equal to PixelPaddingValue (set black)")
    rescaled: bool = Field(description="a modality LUT or RescaleSlope/Intercept was applied")


def _png(what: str, name: str) -> Any:
    return Field(None, description=f"base64 PNG of {what}; only with `outputs={name}`")


class FileResult(_Exact):
    """A predicted file."""

    model_config = ConfigDict(json_schema_extra={"examples": [RESULT_EXAMPLE]})

    index: int = Field(ge=0, description="the file's position in the request")
    id: str = Field(description=ID_TEXT)
    bytes: int = Field(ge=0, description="size of the upload")
    kind: Literal["dicom", "png", "jpeg"] = Field(description="read from the content, not the name")
    threshold: float = Field(
        ge=0, le=1, description="the tuned pixel threshold (where the page's slider starts)"
    )
    height: int = Field(ge=1, description="pixels, as uploaded")
    width: int = Field(ge=1, description="pixels, as uploaded")
    probability: float = Field(
        ge=0, le=1, description="image probability: the classifier's, else the highest pixel's"
    )
    decision: Literal["pneumothorax", "no pneumothorax"] = Field(
        description="whether the final mask has any pixel"
    )
    area: int = Field(ge=0, description="pixels of the final mask")
    rle: str = Field(
        description="the final mask as a submission's EncodedPixels (the experiment's "
        "`predict.rle` format, `-1` when empty): the row `predict.py` writes for this image"
    )
    components: list[Component] = Field(description="the mask's regions")
    intake: Intake = Field(description="how the file's pixels became the model's grey image")
    mask_png: str | None = _png("the final mask (0/255)", "mask")
    prob_png: str | None = _png("the probability map (p x 255)", "prob")
    image_png: str | None = _png("the decoded grey image", "image")
    overlay_png: str | None = _png("the server-drawn overlay", "overlay")
    seg_dcm: str | None = Field(
        None,
        description="base64 DICOM Segmentation (BINARY, the final mask, at the upload's "
        "geometry, referencing it); only with `outputs=seg`, for a DICOM upload",
    )
    seg_note: str | None = Field(
        None, description="with `outputs=seg`: why there is no `seg_dcm` (a PNG/JPEG upload...)"
    )


class FileError(_Exact):
    """Why a file was not predicted: an HTTP status and a fixed text."""

    status: int = Field(description="413 too many pixels, 415 not a supported type, 422 unreadable")
    detail: str = Field(description="a fixed text: no exception text, path or DICOM value")


class FileFailure(_Exact):
    """A file that was not predicted; the others of the request are."""

    model_config = ConfigDict(json_schema_extra={"examples": [FAILURE_EXAMPLE]})

    index: int = Field(ge=0, description="the file's position in the request")
    id: str = Field(description=ID_TEXT)
    bytes: int = Field(ge=0, description="size of the upload")
    kind: Literal["dicom", "png", "jpeg"] | None = Field(
        None, description="present when its headers were read and its pixels failed to decode"
    )
    error: FileError


class PredictAnswer(_Exact):
    """One entry per uploaded file, in upload order: a result, or that file's error."""

    results: list[FileResult | FileFailure]


class ErrorAnswer(_Exact):
    """A refused request: a fixed text (and, when every file failed, each file's error)."""

    detail: str = Field(description="a fixed text: no exception text, path or DICOM value")
    results: list[FileResult | FileFailure] | None = Field(
        None, description="only when every file failed: the first file's error is `detail`"
    )


class HealthAnswer(_Exact):
    """The loaded experiment and the server's limits."""

    model_config = ConfigDict(json_schema_extra={"examples": [HEALTH_EXAMPLE]})

    status: Literal["ok", "no_model"]
    model_loaded: bool
    experiment: str = Field(description="the config's `exp`")
    models: int = Field(ge=0, description="fold models in the ensemble")
    folds: int | str | list[int | str] | None = Field(
        description="the config's `predict.folds` (null: every fold model of the experiment)"
    )
    tta: list[str] = Field(description="test-time augmentation views")
    device: str | None
    backend: str | None = Field(description="what runs the models: torch, onnxruntime, openvino")
    precision: str | None = Field(description="fp32, bf16, fp16 or int8")
    threads: int | None = Field(description="threads per forward pass (null: every core)")
    runtime_reason: str | None = Field(description="why this backend and precision")
    input_size: int = Field(description="the side the model sees (`cache.size`)")
    postprocess: dict[str, Any] | None = Field(description="the tuned post-processing")
    concurrency: int = Field(description="forward passes at once")
    queue: int = Field(description="requests that may wait for one; beyond: 503")
    max_pixels: int = Field(description="pixels per image, from its headers (413 above)")
    max_request_pixels: int = Field(description="pixels per request, all files (413 above)")
    version: str = Field(description="pneumoseg's version")
    problem: str | None = Field(description="with no model: what to run")


def keep_nulls_in_examples(app) -> None:
    """FastAPI drops every null from ``/openapi.json``, inside examples too (the health example
    would lose ``problem``): put the models' examples back as written, once generated."""
    generate = app.openapi

    def openapi() -> dict:
        first = app.openapi_schema is None
        schema = generate()
        if first:
            for model in (FileResult, FileFailure, HealthAnswer):
                published = schema["components"]["schemas"][model.__name__]
                published["examples"] = copy.deepcopy(
                    model.model_config["json_schema_extra"]["examples"]
                )
        return schema

    app.openapi = openapi


def upload_body(max_files: int) -> dict:
    """The request body of ``POST /api/predict`` for ``openapi_extra``: multipart/form-data with
    the field ``files``, one to ``max_files`` files."""
    item = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    files = {
        "type": "array",
        "items": item,
        "minItems": 1,
        "maxItems": max_files,
        "title": "Files",
        "description": f"1 to {max_files} DICOM, PNG or JPEG files (the type is read from the "
        "content, not the name or the part's Content-Type); one result each, in order",
    }
    schema = {"type": "object", "title": "Upload", "required": ["files"],
              "properties": {"files": files}}  # fmt: skip
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


ERROR_DESCRIPTIONS = {
    400: "Not a multipart/form-data body, or too many parts",
    408: "The body did not arrive in time (the connection is closed)",
    413: "Too large: the body, a file's pixels (when every file is), or the request's pixels",
    415: "Every file is of a type the server does not decode",
    422: "Unknown `outputs`, no file in `files`, or every file unreadable",
    503: "Busy (retry after `Retry-After` seconds), or no model is loaded",
}


def error_responses(examples: Mapping[int, Mapping[str, dict]]) -> dict:
    """``responses=`` for the error statuses: ``examples`` maps a status to named example
    bodies; each status gets :class:`ErrorAnswer` and its description."""
    out: dict = {}
    for status, named in examples.items():
        content = {
            name: {"summary": name.replace("_", " "), "value": value}
            for name, value in named.items()
        }
        out[status] = {
            "model": ErrorAnswer,
            "description": ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"examples": content}},
        }
    return out


def ok_examples() -> dict:
    """Named examples of a 200 answer of ``POST /api/predict``."""
    return {
        "one_DICOM": {"summary": "one DICOM", "value": {"results": [RESULT_EXAMPLE]}},
        "a_file_that_failed": {
            "summary": "two files, the second not an image",
            "value": {"results": [RESULT_EXAMPLE, FAILURE_EXAMPLE]},
        },
    }
