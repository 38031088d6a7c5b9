"""The web app's API (FastAPI's TestClient, in process): same masks as predict.py, every error
path, the limits, and logs without patient data. An untrained tiny U-Net stands in for a trained
experiment (the comparison with predict.py needs equal code paths, not a good model)."""

import base64
import logging
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch

from pneumoseg.config import load_config
from pneumoseg.data.rle import rle_decode
from pneumoseg.models.registry import build_model

from conftest import REPO

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from pneumoseg.data.intake import PNG_SIGNATURE, sniff  # noqa: E402
from pneumoseg.serve import create_app  # noqa: E402
from pneumoseg.serve.app import id_of_name  # noqa: E402
from pneumoseg.serve.uploads import j2k_header, jpeg_dims, jpeg_frames, png_dims  # noqa: E402

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
    for name, image_id in (("../../x.png", "x"), ("..\\..\\y.png", "y"),
                           ("a b;rm.png", "sha256-8b7eb4c81266")):  # fmt: skip
        r = _post(client, ("ok.png", png_path.read_bytes()), (name, png_path.read_bytes()))
        assert r.status_code == 200
        # the last path part if a plain name, else a hash of it (sha256sum of "a b;rm")
        assert r.json()["results"][1]["id"] == image_id
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]  # nothing written anywhere
    assert id_of_name(None, 3) == id_of_name("dir/.png", 3) == "image-3"  # no name at all


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


def test_a_client_at_the_cap_never_gets_503(tmp_path, png_path):
    """One place in all (concurrency 1, queue 0), one client sending its next request the moment
    it has an answer: every answer is a 200 (the place is given back before the answer's last
    byte, not after the app returns)."""
    import httpx

    from conftest import start_serve, stop_serve

    _, over = _experiment(tmp_path)
    proc, url = start_serve("--config", DEMO, *over, "serve.concurrency=1", "serve.queue=0")
    data = png_path.read_bytes()
    try:
        with httpx.Client(timeout=60) as http:
            codes = [http.post(f"{url}/api/predict", files=[("files", ("a.png", data))]).status_code
                     for _ in range(40)]  # fmt: skip
    finally:
        stop_serve(proc)
    assert codes == [200] * 40, codes


def test_serve_script_user_errors(tmp_path):
    import socket

    from conftest import run_cli

    code, out = run_cli("serve", "--config", DEMO, "serve.port=70000", "serve.max_files=0")
    assert code == 2 and "serve.port" in out and "serve.max_files" in out
    code, out = run_cli("serve", "--config", DEMO, "serve.max_request_pixels=1000",
                        "serve.max_inflight_pixels=10", "serve.body_timeout_s=0")  # fmt: skip
    assert code == 2 and "Traceback" not in out
    for text in ("serve.max_request_pixels: 1000 is below serve.max_pixels",
                 "serve.max_inflight_pixels: 10 is below serve.max_request_pixels",
                 "serve.body_timeout_s: 0"):  # fmt: skip
        assert text in out, out
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
    assert '<script src="/static/csv.js">' in r.text
    for name in ("app.js", "csv.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


# ------------------------------------------------------------------ headers: types and dimensions
def _png(h: int, w: int) -> bytes:
    return cv2.imencode(".png", np.zeros((h, w), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[
        1
    ].tobytes()


def _with_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (which ends at byte 33)."""
    chunk = len(payload).to_bytes(4, "big") + kind + payload
    return png[:33] + chunk + zlib.crc32(kind + payload).to_bytes(4, "big") + png[33:]


SOF0_30x50 = (
    b"\xff\xc0\x00\x0b\x08\x00\x1e\x00\x32\x01\x01\x11\x00"  # 8-bit, 30 high, 50 wide, 1 comp
)
SOS = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
SCAN = b"\x12\xff\x00\x34\xff\xd0\x56"  # entropy-coded bytes: a stuffed FF00 and a restart marker
HEADERS = {
    # name: (bytes, function, expected) -- all hand-made
    "PNG IHDR: width 50 first, height 30": (PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR\x00\x00\x00\x32\x00\x00\x00\x1e", png_dims, (30, 50)),
    "JPEG SOF0 30x50": (b"\xff\xd8" + SOF0_30x50 + SOS + SCAN + b"\xff\xd9", jpeg_dims, (30, 50)),
    "JPEG fill bytes before SOF": (b"\xff\xd8\xff\xff" + SOF0_30x50 + b"\xff\xd9", jpeg_dims, (30, 50)),
    "JPEG 'FFC0' inside an APP1 is skipped": (b"\xff\xd8\xff\xe1\x00\x06\xff\xc0\x00\x10" + SOF0_30x50, jpeg_dims, (30, 50)),
    "JPEG progressive SOF2": (b"\xff\xd8\xff\xc2\x00\x0b\x08\x01\x00\x00\x80\x01\x01\x11\x00", jpeg_dims, (256, 128)),
    "JPEG-LS SOF55": (b"\xff\xd8\xff\xf7\x00\x0b\x10\x00\x40\x00\x20\x01\x01\x11\x00", jpeg_dims, (64, 32)),
    "two images: every frame header": (b"\xff\xd8" + SOF0_30x50 + SOS + SCAN + b"\xff\xd9\xff\xd8\xff\xc0\x00\x0b\x08\x2e\xe0\x2e\xe0\x01\x01\x11\x00\xff\xd9", jpeg_frames, [(30, 50, 1), (12000, 12000, 1)]),
    "JPEG-LS oversize record (LSE id 4)": (b"\xff\xd8\xff\xf7\x00\x0b\x08\x00\x00\x00\x00\x01\x01\x11\x00\xff\xf8\x00\x0c\x04\x04\x00\x01\x00\x00\x00\x02\x00\x00", jpeg_frames, [(0, 0, 1), (65536, 131072, None)]),
    "J2K SIZ 300x200, 1 component": (b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (200).to_bytes(4, "big") + (300).to_bytes(4, "big") + bytes(8) + (64).to_bytes(4, "big") * 2 + bytes(8) + b"\x00\x01", j2k_header, (300, 200, 1, 20)),
    "J2K SIZ with an image offset": (b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (210).to_bytes(4, "big") + (305).to_bytes(4, "big") + (10).to_bytes(4, "big") + (5).to_bytes(4, "big") + (512).to_bytes(4, "big") * 2 + bytes(8) + b"\x00\x03", j2k_header, (300, 200, 3, 1)),
}  # fmt: skip


@pytest.mark.parametrize("case", HEADERS)
def test_header_dimensions(case):
    data, read, expected = HEADERS[case]
    assert read(data) == expected


SNIFF = {
    "DICM at 128": (bytes(128) + b"DICM" + bytes(8), "dicom"),
    "DICM at 127": (bytes(127) + b"DICM" + bytes(9), None),
    "DICM at 129": (bytes(129) + b"DICM" + bytes(7), None),
    "DICM at 0": (b"DICM" + bytes(140), None),
    "PNG with DICM in an early chunk": (
        _with_chunk(_png(8, 8), b"tEXt", b"Comment\x00DICM"),
        "png",
    ),
    "JPEG": (b"\xff\xd8\xff\xe0" + bytes(140), "jpeg"),
}


@pytest.mark.parametrize("case", SNIFF)
def test_type_comes_from_the_magic_at_its_place(case):
    data, kind = SNIFF[case]
    assert sniff(data) == kind


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_non_square_images_are_predicted_at_their_size(served, kind):
    client, _ = served
    ext = ".png" if kind == "png" else ".jpg"
    data = cv2.imencode(ext, (np.arange(30 * 50) % 251).astype(np.uint8).reshape(30, 50))[1]
    r = _post(client, (f"a{ext}", data.tobytes()))
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert (res["kind"], res["height"], res["width"]) == (kind, 30, 50)


def test_dicm_early_in_a_png_does_not_make_it_a_dicom(served):
    client, _ = served
    png = _with_chunk(_png(40, 40), b"tEXt", b"Comment\x00DICM")
    assert png.index(b"DICM") < 128
    r = _post(client, ("a.png", png))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["kind"] == "png"


# ---------------------------------------------------------------- DICOM pixel streams, by codec
TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled with pydicom


def _u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


SOF0, SOF55, SIZ = b"\xff\xc0\x00\x0b", b"\xff\xf7\x00\x0b", b"\xff\x4f\xff\x51"
RLE_HEAD = b"\x02\x00\x00\x00\x40\x00\x00\x00"  # MR_small_RLE: 2 segments, the first at 64
# name: (source file, tags to set, [(marker, offset from it, new bytes)], syntax, status, text).
# "siim" is a real SIIM DICOM (JPEG baseline, 1024x1024); the others are pydicom's test files.
STREAMS = {
    "JPEG: as it is": ("siim", {}, [], None, 200, None),
    "JPEG: header 64x64, stream 12000x12000 (the issue's)": ("siim", {"Rows": 64, "Columns": 64}, [(SOF0, 5, _u16(12000) * 2)], None, 413, "pixel stream has 12000x12000 pixels"),
    "JPEG: stream 12000x12000": ("siim", {}, [(SOF0, 5, _u16(12000) * 2)], None, 413, "pixel stream has 12000x12000 pixels"),
    "JPEG: stream 1023x1024": ("siim", {}, [(SOF0, 5, _u16(1023))], None, 422, "pixel stream is 1023x1024 but its header says 1024x1024"),
    "JPEG: 3 components, 1 sample": ("siim", {}, [(SOF0, 9, b"\x03")], None, 422, "3 components"),
    "JPEG: header 12000x12000": ("siim", {"Rows": 12000, "Columns": 12000}, [], None, 413, "has 12000x12000 pixels"),
    "JPEG: no end-of-image": ("siim", {}, [(b"\xff\xd9", 0, b"\x00\x00")], None, 422, "no end-of-image marker"),
    "JPEG-LS: as it is": ("MR_small_jpeg_ls_lossless.dcm", {}, [], None, 200, None),
    "JPEG-LS: stream 12000x12000": ("MR_small_jpeg_ls_lossless.dcm", {}, [(SOF55, 5, _u16(12000) * 2)], None, 413, "pixel stream has 12000x12000"),
    "JPEG 2000: as it is": ("MR_small_jp2klossless.dcm", {}, [], None, 200, None),
    "JPEG 2000: stream 12000x12000": ("MR_small_jp2klossless.dcm", {}, [(SIZ, 8, _u32(12000) * 2)], None, 413, "pixel stream has 12000x12000"),
    "JPEG 2000: stream 64x65": ("MR_small_jp2klossless.dcm", {}, [(SIZ, 8, _u32(65))], None, 422, "pixel stream is 64x65 but its header says 64x64"),
    "JPEG 2000 in a JP2 box: stream 12000x12000": ("GDCMJ2K_TextGBR.dcm", {}, [(SIZ, 8, _u32(12000) * 2)], None, 413, "pixel stream has 12000x12000"),
    "JPEG 2000: 1x1 tiles": ("MR_small_jp2klossless.dcm", {"Rows": 512, "Columns": 512}, [(SIZ, 8, _u32(512) * 2 + bytes(8) + _u32(1) * 2)], None, 422, "262,144 tiles"),
    "RLE: as it is": ("MR_small_RLE.dcm", {}, [], None, 200, None),
    "RLE: Rows enlarged": ("MR_small_RLE.dcm", {"Rows": 4096}, [], None, 422, "RLE segments are too short for 4096x64"),
    "RLE: 3 segments for 16-bit grey": ("MR_small_RLE.dcm", {}, [(RLE_HEAD, 0, b"\x03")], None, 422, "RLE header does not match"),
    "uncompressed: as it is": ("MR_small.dcm", {}, [], None, 200, None),
    "uncompressed: Rows enlarged": ("MR_small.dcm", {"Rows": 128}, [], None, 422, "pixel data has 8,192 bytes but 128x64 pixels need 16,384"),
    "deflated": ("MR_small.dcm", {}, [], "1.2.840.10008.1.2.1.99", 415, "'Deflated Explicit VR Little Endian'"),
    "MPEG2": ("siim", {}, [], "1.2.840.10008.1.2.4.100", 415, "'MPEG2 Main Profile / Main Level'"),
    "unknown syntax": ("MR_small.dcm", {}, [], "1.2.3.4", 415, "an unknown transfer syntax"),
}  # fmt: skip


def _edited_dicom(path: Path, tags: dict, patches: list, syntax: str | None) -> bytes:
    """A real DICOM with tags set through pydicom and pixel-stream bytes overwritten in place."""
    import io

    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    kw = {}
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
        kw = {"implicit_vr": False, "little_endian": True}  # pydicom cannot tell for 1.2.3.4
    buf = io.BytesIO()
    ds.save_as(buf, **kw)
    data = bytearray(buf.getvalue())
    for marker, offset, new in patches:
        at = (data.rindex if marker == b"\xff\xd9" else data.index)(marker) + offset
        data[at : at + len(new)] = new
    return bytes(data)


@pytest.fixture
def decodes(monkeypatch):
    """The kinds of the uploads the app decodes, in order."""
    from pneumoseg.serve import app as app_module

    calls, real = [], app_module.decode
    monkeypatch.setattr(app_module, "decode", lambda h: (calls.append(h.kind), real(h))[1])
    return calls


@pytest.mark.parametrize("case", STREAMS)
def test_pixel_streams_are_checked_before_decoding(served, case, dicom_path, decodes, monkeypatch):
    client, _ = served
    source, tags, patches, syntax, status, text = STREAMS[case]
    path = dicom_path if source == "siim" else TESTDATA / source
    if not path.is_file():
        pytest.skip(f"{source} is not bundled with this pydicom")
    data = _edited_dicom(path, tags, patches, syntax)
    if syntax == "1.2.840.10008.1.2.1.99":  # refused from the file meta: pydicom never inflates it
        monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: pytest.fail("dcmread called"))
    r = _post(client, ("x.dcm", data))
    assert r.status_code == status, r.text
    if status == 200:
        res = r.json()["results"][0]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (res["height"], res["width"]) == (ds.Rows, ds.Columns) and decodes == ["dicom"]
    else:
        assert text in r.json()["detail"] and decodes == []  # refused before any decoding
        assert "1.2.3.4" not in r.text  # a UID that is not registered is not echoed


# ------------------------------------------------------------------------- pixels per request
def test_pixels_per_request_are_capped_before_decoding(tmp_path, decodes):
    cfg, _ = _experiment(tmp_path, max_pixels=4096, max_request_pixels=8192,
                         max_inflight_pixels=8192)  # fmt: skip
    client = TestClient(create_app(cfg))
    png = _png(64, 64)  # 4,096 pixels
    r = _post(client, *[(f"{k}.png", png) for k in range(3)])
    assert r.status_code == 413 and decodes == []
    assert "12,288 pixels together" in r.json()["detail"] and "(8,192)" in r.json()["detail"]
    r = _post(client, ("a.png", png), ("b.png", png))  # at the cap
    assert r.status_code == 200 and decodes == ["png", "png"]


def test_the_issues_request_of_sixteen_6000px_pngs_is_refused_unread(served, decodes):
    client, _ = served  # the default limits: 40 M pixels per image, 64 M per request
    png = _png(6000, 6000)
    assert len(png) * 16 < 600_000  # ~35 KB each: highly compressed, as in the issue
    r = _post(client, *[(f"{k}.png", png) for k in range(16)])
    assert r.status_code == 413 and decodes == []
    assert "576,000,000 pixels together" in r.json()["detail"]


def test_decoding_waits_for_a_run_slot_and_for_pixel_room(tmp_path, png_path, decodes, monkeypatch):
    import threading
    import time

    from pneumoseg.serve import app as app_module

    cfg, _ = _experiment(tmp_path, concurrency=1, queue=1)
    app = create_app(cfg)
    client, service = TestClient(app), app.state.service
    inspected = threading.Event()
    real_inspect = app_module.inspect_upload
    monkeypatch.setattr(app_module, "inspect_upload",
                        lambda *a: (real_inspect(*a), inspected.set())[0])  # fmt: skip
    for held in (service.gate.run, service.pixels.hold(service.pixels.limit)):
        held.__enter__()  # another request runs, or holds every pixel of the budget
        inspected.clear()
        answer: dict = {}
        post = (client, ("a.png", png_path.read_bytes()))
        worker = threading.Thread(target=lambda a=answer, p=post: a.update(r=_post(*p)))
        worker.start()
        try:
            assert inspected.wait(60)
            time.sleep(0.5)
            assert decodes == []  # its header is read, its pixels wait
        finally:
            held.__exit__(None, None, None)
        worker.join(120)
        assert answer["r"].status_code == 200 and decodes == ["png"]
        decodes.clear()


# ------------------------------------------------------------------------------- request bodies
def test_chunked_body_over_the_cap_is_413(tmp_path, png_path):
    cfg, _ = _experiment(tmp_path, max_body_mb=0.05)
    client = TestClient(create_app(cfg))
    boundary = b"b0undary"

    def body():  # ~80 KB in 16 KB chunks, no Content-Length
        yield (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        )
        for _ in range(5):
            yield bytes(16 * 1024)

    req = client.build_request("POST", "/api/predict", content=body(),
                               headers={"content-type": f"multipart/form-data; boundary={boundary.decode()}"})  # fmt: skip
    assert "content-length" not in req.headers and req.headers["transfer-encoding"] == "chunked"
    r = client.send(req)
    assert (
        r.status_code == 413
        and "body over the server's limit of 52,428 bytes" in r.json()["detail"]
    )


def _read_until_closed(sock) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_slow_body_gets_408_and_holds_a_place_until_then(tmp_path, png_path):
    import socket
    import time

    import httpx

    from conftest import start_serve, stop_serve

    _, over = _experiment(tmp_path)
    proc, url = start_serve("--config", DEMO, *over, "serve.body_timeout_s=2",
                            "serve.concurrency=1", "serve.queue=0")  # fmt: skip
    png = png_path.read_bytes()
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as slow:
            slow.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\nContent-"
                         b'Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + png[:100])  # fmt: skip
            t0 = time.monotonic()
            time.sleep(0.5)
            busy = httpx.post(f"{url}/api/predict", files=[("files", ("a.png", png))], timeout=60)
            reply = _read_until_closed(slow)  # a socket timeout here: the connection stayed open
            waited = time.monotonic() - t0
        assert busy.status_code == 503  # the stalled body holds the only place
        assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2 s" in reply
        assert 1.5 < waited < 15
        r = httpx.post(f"{url}/api/predict", files=[("files", ("a.png", png))], timeout=60)
        assert r.status_code == 200  # the place is free again
    finally:
        out = stop_serve(proc)
    assert "Traceback" not in out


# ------------------------------------------------------------------------------------------ logs
def _undecodable(dicom_path) -> tuple[bytes, list[str]]:
    """A real SIIM DICOM with planted patient data whose JPEG Huffman table is damaged: its
    headers pass every check and pydicom's decoders fail (and log why, with tracebacks)."""
    import io

    ds = pydicom.dcmread(dicom_path)
    ds.PatientID, ds.PatientName = "PAT-7731-XQ", "Doe^Jane"
    buf = io.BytesIO()
    ds.save_as(buf)
    data = bytearray(buf.getvalue())
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code counts that sum past 256
    return bytes(data), ["PAT-7731-XQ", "Doe^Jane", str(ds.SOPInstanceUID), "secret-name"]


def test_server_log_has_no_text_of_other_loggers(tmp_path, dicom_path):
    import httpx

    from conftest import start_serve, stop_serve

    data, secrets = _undecodable(dicom_path)
    _, over = _experiment(tmp_path)
    proc, url = start_serve("--config", DEMO, *over)
    try:
        r = httpx.post(f"{url}/api/predict", files=[("files", ("secret-name.dcm", data))],
                       timeout=60)  # fmt: skip
    finally:
        out = stop_serve(proc)
    assert r.status_code == 422 and "cannot be decoded" in r.json()["detail"]
    # pydicom's records come, their text not (each decoder's failure with its traceback is
    # dropped by the intake's filter before any handler: the intake reports the failure itself)
    assert "pydicom: message withheld" in out, out
    assert "pydicom.pixels.decoders.base" not in out, out
    for text in ("Traceback", "huffman", "broken data stream", "libjpeg", "RuntimeError",
                 "OSError", *secrets):  # fmt: skip
        assert text not in out, out
    assert "predict: 1 file(s) (dicom), 1 failed" in out  # the app's own lines stay


LOG_RECORDS = {
    # name: (logger, message, args, exception, the line as formatted)
    "the app's": ("pneumoseg.serve", "predict: %d file(s)", (2,), None, "pneumoseg.serve predict: 2 file(s)"),
    "uvicorn's start line": ("uvicorn.error", "Started server process [%d]", (7,), None, "uvicorn.error Started server process [7]"),
    "uvicorn's with a traceback": ("uvicorn.error", "Exception in ASGI application", (), ValueError("PAT-7731-XQ"), "uvicorn.error Exception in ASGI application (traceback withheld: ValueError)"),
    "pydicom's child": ("pydicom.pixels.decoders.base", "%s", ("Doe^Jane",), RuntimeError("Doe^Jane"), "pydicom.pixels.decoders.base pydicom.pixels.decoders.base: message withheld (third-party text may quote DICOM values)"),
    "PIL's": ("PIL.PngImagePlugin", "STREAM %r", (b"PAT-7731-XQ",), None, "PIL.PngImagePlugin PIL.PngImagePlugin: message withheld (third-party text may quote DICOM values)"),
    "a warning": ("py.warnings", "%s", ("x.dcm:1: UserWarning: Invalid value for VR UI: 'Doe^Jane'",), None, "py.warnings py.warnings: message withheld (third-party text may quote DICOM values)"),
    "a name that only starts alike": ("pneumosegx", "%s", ("Doe^Jane",), None, "pneumosegx pneumosegx: message withheld (third-party text may quote DICOM values)"),
}  # fmt: skip


@pytest.mark.parametrize("case", LOG_RECORDS)
def test_redact_foreign_on_a_handler(case):
    from pneumoseg.serve.app import RedactForeign

    name, msg, args, exc, line = LOG_RECORDS[case]
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except Exception:
            import sys

            exc_info = sys.exc_info()
    record = logging.LogRecord(name, logging.ERROR, "x.py", 1, msg, args, exc_info)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.addFilter(RedactForeign())
    assert handler.filter(record)
    assert handler.format(record) == line


# ----------------------------------------------------------------------------------------- ids
def test_an_injected_uid_becomes_a_safe_id_and_one_csv_row(served, dicom_path, png_path):
    import csv
    import io

    from test_safe_text import HOSTILE_UID, node_csv

    client, _ = served
    ds = pydicom.dcmread(dicom_path)
    ds.SOPInstanceUID = HOSTILE_UID
    buf = io.BytesIO()
    ds.save_as(buf)
    r = _post(client, ("x.dcm", buf.getvalue()), ("y.png", png_path.read_bytes()))
    assert r.status_code == 200
    results = r.json()["results"]
    assert [it["id"] for it in results] == ["sha256-25e67775f52d", "y"]
    assert "HYPERLINK" not in r.text and "EVIL" not in r.text
    # the page's CSV (static/csv.js) of these results: one row per file
    text = node_csv(["ImageId", "EncodedPixels"], [[it["id"], it["rle"]] for it in results])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["ImageId", "EncodedPixels"], *([it["id"], it["rle"]] for it in results)]
