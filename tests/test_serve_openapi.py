"""The web API documents itself: ``/openapi.json`` names the multipart upload (``files``, binary
items: a file picker in ``/docs``), the answers' pydantic models with examples, and every error
status with this server's own texts; real answers validate against the models and are the JSON
the app built, byte for byte. (The ``/docs`` "Try it out" upload in a real browser is in
test_browser.py.)"""

import io
import json

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import _experiment, _post  # noqa: E402

from pneumoseg.serve import create_app  # noqa: E402
from pneumoseg.serve.api_models import (  # noqa: E402
    ErrorAnswer,
    FileFailure,
    FileResult,
    HealthAnswer,
    PredictAnswer,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
ERROR_STATUSES = ["400", "408", "413", "415", "422", "503"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cfg, _ = _experiment(tmp_path_factory.mktemp("openapi"), max_files=5, max_body_mb=2)
    return create_app(cfg)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def schema(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def dicom_path(real_dir):
    return sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]


def _predict_op(schema: dict) -> dict:
    return schema["paths"]["/api/predict"]["post"]


def _ref(schema: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/")
    return schema["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _json_schema(op: dict, status: str) -> dict:
    return op["responses"][status]["content"]["application/json"]["schema"]


def _examples(op: dict, status: str) -> dict:
    return op["responses"][status]["content"]["application/json"]["examples"]


def _upload_field(schema: dict) -> str:
    """The name of the upload's file field, read from the schema."""
    body = _predict_op(schema)["requestBody"]["content"]["multipart/form-data"]["schema"]
    (name,) = body["required"]
    return name


# ------------------------------------------------------------------------------------- the schema
def test_the_upload_is_a_typed_multipart_field_of_binary_files(schema):
    body = _predict_op(schema)["requestBody"]
    assert body["required"] is True and list(body["content"]) == ["multipart/form-data"]
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["type"] == "object" and form["required"] == ["files"]
    files = form["properties"]["files"]
    assert files["type"] == "array" and files["minItems"] == 1
    assert files["maxItems"] == 5  # serve.max_files of this server
    # format: binary is what Swagger UI needs to draw a file picker per item of an array
    assert files["items"] == {"type": "string", "format": "binary",
                              "contentMediaType": "application/octet-stream"}  # fmt: skip
    (param,) = _predict_op(schema)["parameters"]
    assert param["name"] == "outputs" and param["in"] == "query"
    assert "mask, overlay, prob, image" in param["description"]


def test_the_answers_have_models_and_examples(schema):
    op = _predict_op(schema)
    ok = _ref(schema, _json_schema(op, "200")["$ref"])
    assert ok["title"] == "PredictAnswer"
    union = {
        _ref(schema, s["$ref"])["title"] for s in ok["properties"]["results"]["items"]["anyOf"]
    }
    assert union == {"FileResult", "FileFailure"}
    result = schema["components"]["schemas"]["FileResult"]
    for key in ("id", "kind", "height", "width", "probability", "decision", "area", "rle",
                "components", "threshold", "mask_png", "prob_png", "image_png", "overlay_png"):  # fmt: skip
        assert key in result["properties"], key
    assert set(result["required"]) >= {"id", "kind", "rle", "components", "threshold"}
    component = schema["components"]["schemas"]["Component"]
    assert set(component["properties"]) == {"box", "area", "score", "max_probability"}
    for name in ("FileResult", "FileFailure", "HealthAnswer"):
        assert schema["components"]["schemas"][name]["examples"], name
    # every example shown in /docs is an answer the models accept
    for example in _examples(op, "200").values():
        PredictAnswer.model_validate(example["value"])
    assert sorted(op["responses"]) == ["200", *ERROR_STATUSES]
    for status in ERROR_STATUSES:
        assert _ref(schema, _json_schema(op, status)["$ref"])["title"] == "ErrorAnswer"
        assert op["responses"][status]["description"]
        for example in _examples(op, status).values():
            ErrorAnswer.model_validate(example["value"])
    health = schema["paths"]["/health"]["get"]["responses"]["200"]
    health_model = _ref(schema, health["content"]["application/json"]["schema"]["$ref"])
    assert health_model["title"] == "HealthAnswer"
    HealthAnswer.model_validate(health_model["examples"][0])


def test_the_error_examples_are_the_texts_this_server_answers(client, schema, app):
    op = _predict_op(schema)

    def example(status: str, name: str) -> str:
        return _examples(op, status)[name]["value"]["detail"]

    png = b"\x89PNG\r\n\x1a\n" + bytes(40)
    r = client.post("/api/predict?outputs=secrets", files=[("files", ("a.png", png))])
    assert r.status_code == 422 and r.json() == {"detail": example("422", "unknown_outputs")}
    r = client.post("/api/predict", data={"x": "1"})
    assert r.status_code == 422 and r.json() == {"detail": example("422", "no_file")}
    r = client.post("/api/predict", files=[("files", ("a.png", bytes(3 * 1024 * 1024)))])
    assert r.status_code == 413 and r.json() == {"detail": example("413", "body_too_large")}
    assert "2,097,152 bytes" in example("413", "body_too_large")  # serve.max_body_mb=2
    parts = [("files", (f"{k}.txt", b"x")) for k in range(6)]  # one more than max_files
    r = client.post("/api/predict", files=parts)
    assert r.status_code == 400 and r.json() == {"detail": example("400", "not_multipart")}
    r = client.post("/api/predict", files=[("files", ("notes.txt", b"hello"))])
    assert r.status_code == 415
    assert r.json()["detail"] == example("415", "every_file_unsupported")
    gate = app.state.service.gate
    taken = 0
    while gate.enter():  # every place taken
        taken += 1
    try:
        r = client.post("/api/predict", files=[("files", ("a.png", png))])
    finally:
        for _ in range(taken):
            gate.leave()
    assert r.status_code == 503 and r.json() == {"detail": example("503", "busy")}


def test_without_a_model_the_answers_match_the_models_too(tmp_path):
    from test_serve import DEMO, _overrides

    from pneumoseg.config import load_config

    client = TestClient(create_app(load_config(DEMO, _overrides(tmp_path, exp="untrained"))))
    health = HealthAnswer.model_validate(client.get("/health").json())
    assert health.status == "no_model" and health.problem
    r = _post(client, ("a.png", b"\x89PNG"))
    assert r.status_code == 503
    examples = _examples(_predict_op(client.get("/openapi.json").json()), "503")
    assert r.json() == examples["no_model"]["value"]


# ---------------------------------------------------------------------------------- real answers
def test_a_real_dicom_through_the_schemas_field_and_its_answer_validates(
    client, schema, dicom_path
):
    field = _upload_field(schema)
    parts = [(field, (dicom_path.name, dicom_path.read_bytes())), (field, ("notes.txt", b"hi"))]
    r = client.post("/api/predict", files=parts, params={"outputs": "mask,overlay,prob,image"})
    assert r.status_code == 200, r.text
    answer = PredictAnswer.model_validate(r.json())
    ok, failed = answer.results
    assert isinstance(ok, FileResult) and isinstance(failed, FileFailure)
    assert ok.kind == "dicom" and ok.id and ok.height == ok.width == 1024
    assert ok.mask_png and ok.prob_png and ok.image_png and ok.overlay_png
    assert failed.error.status == 415 and failed.kind is None
    # the model reproduces the answer exactly: no key added, dropped or reordered
    dumped = answer.model_dump(mode="json", exclude_unset=True)
    assert json.dumps(dumped) == json.dumps(r.json())
    r = client.post("/api/predict", files=[(field, ("notes.txt", b"hello"))])
    assert r.status_code == 415
    error = ErrorAnswer.model_validate(r.json())
    assert isinstance(error.results[0], FileFailure) and error.results[0].error.status == 415
    HealthAnswer.model_validate(client.get("/health").json())


def test_answers_are_byte_for_byte_the_json_the_app_built(client, app, dicom_path):
    """Answers go out through the models, rendered as before (json.dumps): the same bytes as the
    app's own dicts, where pydantic's JSON writer would print some floats differently."""
    service = app.state.service
    files = [("scan.dcm", dicom_path.read_bytes()), ("notes.txt", b"hello")]
    items = service.run_request([(n, io.BytesIO(d)) for n, d in files], {"mask"})
    r = _post(client, *files, outputs="mask")
    assert r.status_code == 200

    def dumps(value) -> bytes:  # Starlette's JSONResponse.render
        return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode()  # fmt: skip

    assert r.content == dumps({"results": items})
    assert client.get("/health").content == dumps(service.health())
    assert r.headers["content-type"] == "application/json"


def test_docs_load_swagger_ui_from_this_server(client):
    pytest.importorskip("fastapi_offline")
    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        url = f"/static-offline-docs/{asset}"
        assert f'"{url}"' in page.text
        assert client.get(url).status_code == 200
    assert "cdn." not in page.text
