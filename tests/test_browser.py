"""One real-browser test: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
selenium uploads an image, runs the comparison and finds seven tiles (input + six models)."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import pytest

from _helpers import synthetic_image

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and chromedriver (Debian: apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(engine, app_checkpoints):
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = app.parse_args(["--checkpoints", str(app_checkpoints), "--device", "cpu",
                           "--host", "127.0.0.1", "--port", str(port)])
    demo = app.launch(args, engine=engine, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture()
def browser():
    profile = tempfile.mkdtemp(prefix="lgam_chromium_")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", f"--user-data-dir={profile}", "--window-size=1600,1200"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_upload_compare_seven_tiles(server, browser, tmp_path):
    img = tmp_path / "shapes.png"
    synthetic_image(11, (160, 120)).save(img)
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(str(img))
    # the upload is shown in the image component before we press Compare
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    time.sleep(0.5)
    browser.find_element(By.ID, "compare-button").click()

    def tiles(d):
        found = d.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item img, #gallery button img")
        return found if len(found) >= 7 else False

    found = WebDriverWait(browser, 120).until(tiles)
    assert len(found) == 7
    text = browser.find_element(By.ID, "gallery").text + browser.find_element(By.ID, "run-info").text
    for label in ("ResNet18", "SE", "SGE", "CBAM", "BAM", "LGAM"):
        assert f"{label} · " in text, label
    assert "Device" in text and "cpu" in text
