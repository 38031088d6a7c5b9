"""The page in a real browser: headless Chromium from the OS packages (``chromium`` and
``chromium-driver``), driven by selenium with explicit binary and driver paths so that nothing is
downloaded. It opens the page served by ``src/serve.py`` on a free 127.0.0.1 port, uploads a real
SIIM DICOM, waits for the overlay and the probability, moves the threshold slider and sees the
mask change, and saves a screenshot.

``PNEUMOSEG_SCREENSHOT=path.png`` keeps the screenshot there (the README's is made this way, with
``PNEUMOSEG_SERVE_CONFIG=configs/demo.yaml`` to serve the demo experiment instead of the test's
untrained tiny model, and ``PNEUMOSEG_SCREENSHOT_IMAGE`` to upload a synthetic test image the
demo model was made for)."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs the OS packages chromium and chromium-driver (apt-get install chromium "
    "chromium-driver; .ci/run installs them when it runs as root on Debian)",
)


@pytest.fixture
def server(tmp_path):
    from test_serve import _experiment

    from conftest import start_serve, stop_serve

    config = os.environ.get("PNEUMOSEG_SERVE_CONFIG")
    if config:
        argv = ["--config", config]
    else:
        _, over = _experiment(tmp_path)
        argv = ["--config", str(REPO / "configs" / "demo.yaml"), *over]
    proc, url = start_serve(*argv)
    yield url
    stop_serve(proc)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1350"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_a_real_dicom_and_move_the_threshold(server, browser, real_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    dicom = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]
    dicom = Path(os.environ.get("PNEUMOSEG_SCREENSHOT_IMAGE") or dicom).resolve()
    browser.get(server + "/")
    wait = WebDriverWait(browser, 120)
    assert "Research use only, not for diagnosis" in browser.find_element(By.ID, "notice").text
    wait.until(ec.text_to_be_present_in_element((By.ID, "model-status"), "Model:"))
    browser.find_element(By.ID, "files").send_keys(str(dicom))
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card[data-ready='1']")))
    probability = card.find_element(By.CSS_SELECTOR, ".probability").text
    assert 0 <= float(probability) <= 1
    canvas = card.find_element(By.TAG_NAME, "canvas")
    import pydicom

    columns = int(pydicom.dcmread(dicom, stop_before_pixels=True).Columns)
    assert browser.execute_script("return arguments[0].width", canvas) == columns  # full size
    assert card.find_element(By.CSS_SELECTOR, ".dl-row").get_attribute("href").startswith("blob:")
    # the DICOM SEG download: the tuned mask as a Segmentation object, readable by pydicom
    seg = card.find_element(By.CSS_SELECTOR, ".dl-seg")
    href = seg.get_attribute("href")
    assert href.startswith("data:application/dicom;base64,") and seg.text == "DICOM SEG"
    assert seg.get_attribute("download") == f"{dicom.stem}.seg.dcm"
    import base64
    import io

    segds = pydicom.dcmread(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
    assert segds.Modality == "SEG" and segds.SegmentationType == "BINARY"

    def area_at(value: float) -> int:
        slider = browser.find_element(By.ID, "threshold")
        browser.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            slider, str(value),
        )  # fmt: skip
        return int(card.get_attribute("data-area"))

    low, high = area_at(0.05), area_at(0.95)
    assert low > high, (low, high)  # the mask follows the slider without a new request
    browser.find_element(By.ID, "reset").click()  # back to the tuned mask for the screenshot
    shot = Path(os.environ.get("PNEUMOSEG_SCREENSHOT") or tmp_path / "page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_docs_try_it_out_uploads_a_real_dicom(server, browser, real_dir):
    """``/docs`` (Swagger UI, served by the app itself: no CDN) draws a file picker for the
    documented ``files`` field; "Try it out" with a real DICOM answers 200 with its result."""
    pytest.importorskip("fastapi_offline", reason="/docs would load Swagger UI from a CDN")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    dicom = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0].resolve()
    browser.get(server + "/docs")
    wait = WebDriverWait(browser, 120)
    op = wait.until(ec.presence_of_element_located(
        (By.ID, "operations-default-predict_api_predict_post")))  # fmt: skip
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: op.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    field = wait.until(lambda _: op.find_element(
        By.CSS_SELECTOR, "tr[data-property-name='files'] input[type='file']"))  # fmt: skip
    field.send_keys(str(dicom))
    op.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(lambda _: op.find_element(
        By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"))  # fmt: skip
    wait.until(lambda _: status.text.strip())
    body = op.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre")
    assert status.text.strip() == "200", body.text
    text = body.text
    assert '"id"' in text and '"rle"' in text and '"kind": "dicom"' in text, text
