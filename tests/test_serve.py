"""The web app's API (FastAPI's TestClient, in process): same masks as predict.py, every error
path, the limits, and logs without patient data. An untrained tiny U-Net stands in for a trained
experiment (the comparison with predict.py needs equal code paths, not a good model)."""

import base64
import logging

import cv2
import numpy as np
import pydicom
import pytest
import torch

from pneumoseg.config import load_config
from pneumoseg.models import build_model
from pneumoseg.rle import rle_decode

from conftest import REPO

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from pneumoseg.serve import create_app  # noqa: E402

# the real stage-2 files hold ids like 'ID_0011fe81e' in UI elements; pydicom warns when the
# *tests* read them (the server reads with warnings silenced, see test_logs_...)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = {"arch": "unet", "encoder": "resnet18", "encoder_weights": None,
        "decoder_channels": [16, 8, 8, 8, 8]}  # fmt: skip


def _overrides(tmp_path, exp="servetest", **serve):
    return [
        f"exp={exp}",
        f"train.out_dir={tmp_path / 'runs'}",
        "train.device=cpu",
        "cache.size=64",
        "predict.folds=[0]",
        *(f"serve.{k}={v}" for k, v in serve.items()),
    ]


def _experiment(tmp_path, exp="servetest", **serve):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    folder = tmp_path / "runs" / exp / "fold0"
    folder.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "config": {"model": TINY}}, folder / "model.pt")
    return load_config(DEMO, _overrides(tmp_path, exp, **serve)), _overrides(tmp_path, exp)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg, over = _experiment(tmp)
    return TestClient(create_app(cfg)), over


@pytest.fixture(scope="module")
def dicom_path(real_dir):
    return sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]


@pytest.fixture(scope="module")
def png_path(real_dir):
    return sorted((real_dir / "vbookshelf_sample" / "png_images").glob("*.png"))[0]


def _post(client, *files, outputs=""):
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/api/predict", files=parts, params={"outputs": outputs} if outputs else {})


def _cli_row(over, path, capsys):
    import predict

    capsys.readouterr()
    assert predict.main(["--config", DEMO, "--image", str(path), *over]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[1].split(",", 1)[1]


def test_health(served):
    client, _ = served
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] and h["models"] == 1
    assert h["experiment"] == "servetest" and h["tta"] == ["hflip"] and h["device"] == "cpu"
    assert h["folds"] == [0] and h["version"] and h["problem"] is None
    assert client.get("/openapi.json").status_code == 200  # FastAPI's generated docs stay


@pytest.mark.parametrize("which", ["dicom", "png"])
def test_same_mask_and_rle_as_predict_image(served, which, dicom_path, png_path, capsys):
    client, over = served
    path = dicom_path if which == "dicom" else png_path
    r = _post(client, (path.name, path.read_bytes()), outputs="mask,overlay,prob")
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    expected = _cli_row(over, path, capsys)
    assert res["rle"] == expected and res["kind"] == which
    h, w = res["height"], res["width"]
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(res["mask_png"]), np.uint8), 0)
    assert mask.shape == (h, w)
    truth = rle_decode(expected, (h, w)) if expected != "-1" else np.zeros((h, w), np.uint8)
    np.testing.assert_array_equal(mask > 0, truth > 0)
    assert res["area"] == int(truth.sum())
    assert res["decision"] == ("pneumothorax" if truth.any() else "no pneumothorax")
    assert sum(c["area"] for c in res["components"]) == res["area"]
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(res["overlay_png"]), np.uint8), 1)
    assert overlay.shape == (h, w, 3)
    prob = cv2.imdecode(np.frombuffer(base64.b64decode(res["prob_png"]), np.uint8), 0)
    assert prob.shape == (h, w) and 0 <= res["probability"] <= 1
    if which == "dicom":  # the Kaggle ImageId comes from the DICOM, not from the file name
        assert res["id"] == str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    else:
        assert res["id"] == path.stem


def test_several_files_keep_their_order_and_a_bad_one_does_not_fail_the_rest(served, png_path):
    client, _ = served
    png = png_path.read_bytes()
    r = _post(client, ("a.png", png), ("notes.txt", b"hello"), ("b.png", png))
    assert r.status_code == 200
    items = r.json()["results"]
    assert [it["index"] for it in items] == [0, 1, 2]
    assert items[1]["error"]["status"] == 415 and "rle" not in items[1]
    assert items[0]["rle"] == items[2]["rle"]


def test_content_decides_the_type_not_the_name(served, png_path):
    client, _ = served
    r = _post(client, ("scan.dcm", png_path.read_bytes()))
    assert r.status_code == 200 and r.json()["results"][0]["kind"] == "png"


def _truncated(dicom_path):
    data = dicom_path.read_bytes()
    return data[: len(data) // 2]


ERRORS = {
    "text file": (lambda d, p: ("x.dcm", b"just some text\n" * 20), 415, "not a DICOM, PNG or JPEG"),
    "empty upload": (lambda d, p: ("x.png", b""), 422, "empty"),
    "truncated DICOM": (lambda d, p: ("x.dcm", _truncated(d)), 422, "truncated"),
    "truncated PNG": (lambda d, p: ("x.png", p.read_bytes()[:40]), 422, "cannot be decoded"),
    "PNG header only": (lambda d, p: ("x.png", p.read_bytes()[:16]), 422, "no image header"),
    "JPEG without a frame": (lambda d, p: ("x.jpg", b"\xff\xd8\xff\xe0\x00\x04ab"), 422, "no frame header"),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
def test_error_paths_are_clean_messages(served, case, dicom_path, png_path):
    client, _ = served
    make, status, text = ERRORS[case]
    r = _post(client, make(dicom_path, png_path))
    assert r.status_code == status
    body = r.json()
    assert text in body["detail"]
    assert "Traceback" not in r.text and "Error:" not in r.text and str(REPO) not in r.text


def test_path_in_the_file_name_is_never_used(served, png_path, tmp_path, monkeypatch):
    client, _ = served
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for name, image_id in (("../../x.png", "x"), ("..\\..\\y.png", "y"), ("a b;rm.png", "image-1")):
        r = _post(client, ("ok.png", png_path.read_bytes()), (name, png_path.read_bytes()))
        assert r.status_code == 200
        assert r.json()["results"][1]["id"] == image_id  # the last path part, if a plain name
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]  # nothing written anywhere


def test_no_files_and_unknown_outputs(served, png_path):
    client, _ = served
    assert client.post("/api/predict", data={"x": "1"}).status_code == 422
    assert client.post("/api/predict", content=b"raw", headers={"content-type": "text/plain"}
                       ).status_code in (400, 422)  # fmt: skip
    r = _post(client, ("a.png", png_path.read_bytes()), outputs="mask,secrets")
    assert r.status_code == 422 and "unknown outputs" in r.json()["detail"]


def test_body_and_pixel_caps(tmp_path, dicom_path, png_path):
    cfg, _ = _experiment(tmp_path, max_body_mb=0.05, max_pixels=1000)
    client = TestClient(create_app(cfg))
    big = dicom_path.read_bytes()
    assert len(big) > 0.05 * 1024 * 1024
    r = _post(client, ("a.dcm", big))
    assert r.status_code == 413 and "body over" in r.json()["detail"]
    small = cv2.imencode(".png", np.zeros((40, 40), np.uint8))[1].tobytes()  # 1600 px > 1000
    r = _post(client, ("a.png", small))
    assert r.status_code == 413 and "more than the server accepts" in r.json()["detail"]
    cfg2, _ = _experiment(tmp_path / "b", max_pixels=1000)
    r = _post(TestClient(create_app(cfg2)), ("a.dcm", big))  # DICOM: refused from its header
    assert r.status_code == 413 and "1024x1024" in r.json()["detail"]


def test_over_capacity_is_503_at_once(tmp_path, png_path):
    cfg, _ = _experiment(tmp_path, concurrency=1, queue=0)
    app = create_app(cfg)
    client = TestClient(app)
    gate = app.state.service.gate
    assert gate.enter()  # a request in flight
    try:
        r = _post(client, ("a.png", png_path.read_bytes()))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["detail"]
    finally:
        gate.leave()
    assert _post(client, ("a.png", png_path.read_bytes())).status_code == 200


def test_without_a_model_it_starts_and_says_what_to_run(tmp_path, png_path):
    cfg = load_config(DEMO, _overrides(tmp_path, exp="nothing_trained"))
    client = TestClient(create_app(cfg))
    h = client.get("/health").json()
    assert h["status"] == "no_model" and not h["model_loaded"]
    assert "train.py" in h["problem"] or "model" in h["problem"]
    r = _post(client, ("a.png", png_path.read_bytes()))
    assert r.status_code == 503 and "/health" in r.json()["detail"]


def test_logs_carry_no_patient_data_or_file_names(served, dicom_path, caplog):
    import io
    import warnings

    client, _ = served
    ds = pydicom.dcmread(dicom_path)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "PAT-7731-XQ", "Doe^Jane", "19610203"
    buf = io.BytesIO()
    ds.save_as(buf)
    secrets = ["PAT-7731-XQ", "Doe", "19610203", str(ds.SOPInstanceUID), "secret-name"]
    caplog.clear()  # what writing the test file logged
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        r = _post(client, ("secret-name.dcm", buf.getvalue()))
        _post(client, ("secret-name.dcm", buf.getvalue()[:4000]))
    assert not [w for w in warned if any(s in str(w.message) for s in secrets)]  # stderr too
    assert r.status_code == 200
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "predict: 1 file(s) (dicom)" in text
    for s in secrets:
        assert s not in text


# ------------------------------------------------------------------------------------ the script
def test_serve_script_starts_answers_and_stops(tmp_path, png_path):
    import httpx

    from conftest import start_serve, stop_serve

    _, over = _experiment(tmp_path)
    proc, url = start_serve("--config", DEMO, *over)
    try:
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        r = httpx.post(f"{url}/api/predict", timeout=60,
                       files=[("files", ("a.png", png_path.read_bytes()))])  # fmt: skip
        assert r.status_code == 200 and r.json()["results"][0]["kind"] == "png"
    finally:
        out = stop_serve(proc)
    assert proc.returncode == 0, out
    assert f"serving on {url}/" in out and "Traceback" not in out


def test_serve_script_user_errors(tmp_path):
    import socket

    from conftest import run_cli

    code, out = run_cli("serve", "--config", DEMO, "serve.port=70000", "serve.max_files=0")
    assert code == 2 and "serve.port" in out and "serve.max_files" in out
    _, over = _experiment(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        code, out = run_cli("serve", "--config", DEMO, "--port", str(busy), *over)
    assert code == 2 and f"cannot listen on 127.0.0.1:{busy}" in out and "Traceback" not in out


def test_page_and_its_files_are_served_with_safe_headers(served):
    client, _ = served
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "Research use only, not for diagnosis" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
