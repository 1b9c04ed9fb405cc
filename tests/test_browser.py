"""Real-browser tests: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
selenium at a desktop and a phone width. The page opens on the first example already compared;
clearing the image clears the results; an upload alone runs the comparison, and every tile must be
readable: its caption fully visible (not clipped), the photo's aspect ratio kept, at least 200 px
wide on the desktop. Screenshots go to ``$LGAM_SCREENSHOTS`` (default: the test's temp folder)."""
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
def browser(request):
    profile = tempfile.mkdtemp(prefix="lgam_chromium_")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    width, height = request.param
    driver.set_window_size(width, height)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# per tile: widths, the image's natural and rendered aspect, whether the caption is clipped
TILE_METRICS = """
return Array.from(document.querySelectorAll('#results figure')).map(f => {
  const img = f.querySelector('img'), cap = f.querySelector('figcaption');
  const r = img.getBoundingClientRect(), c = cap.getBoundingClientRect();
  return {width: r.width, rendered: r.width / r.height,
          natural: img.naturalWidth / img.naturalHeight, text: cap.innerText,
          clipped: cap.scrollWidth > cap.clientWidth + 1 || cap.scrollHeight > cap.clientHeight + 1
                   || c.right > window.innerWidth + 1 || c.width < 20};
});
"""


# the number of tiles and the first one's caption (read at once: the grid may be re-rendered)
GRID_STATE = """
const f = document.querySelectorAll('#results figure');
return [f.length, f.length ? f[0].querySelector('figcaption').innerText : ''];
"""


def _tiles_of(name: str):
    """A wait condition: seven tiles or more, the first of them the input ``name``."""
    def shown(d) -> bool:
        count, caption = d.execute_script(GRID_STATE)
        return count >= 7 and name in caption
    return shown


@pytest.mark.slow
@pytest.mark.parametrize("browser", [(1280, 800), (420, 900)], indirect=True,
                         ids=["desktop-1280x800", "phone-420x900"])
def test_first_view_then_upload_alone_shows_seven_readable_tiles(server, browser, tmp_path):
    from app.ui import IN_CLASS_EXAMPLES, default_examples

    img = tmp_path / "wide.png"
    synthetic_image(11, (240, 120)).save(img)  # 2:1, to see the aspect ratio kept
    browser.get(server)
    # the first view: the first example, compared before anyone uploads or clicks
    first = os.path.basename(default_examples()[IN_CLASS_EXAMPLES][0])
    WebDriverWait(browser, 60).until(_tiles_of(first))
    assert len(browser.execute_script(TILE_METRICS)) == 7
    # clearing the image (its × button, Gradio's "Remove Image") clears the results
    remove = browser.find_element(By.CSS_SELECTOR, "#input-image button[aria-label='Remove Image']")
    browser.execute_script("arguments[0].click()", remove)  # shown on hover on some themes
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(GRID_STATE)[0] == 0)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(str(img))  # no click: the upload runs the comparison

    WebDriverWait(browser, 120).until(_tiles_of(img.name))
    time.sleep(0.5)  # images decoded and laid out
    width = browser.execute_script("return window.innerWidth")
    shots = os.environ.get("LGAM_SCREENSHOTS") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    browser.find_element(By.ID, "results").screenshot(os.path.join(shots, f"results-{width}.png"))
    browser.save_screenshot(os.path.join(shots, f"page-{width}.png"))

    metrics = browser.execute_script(TILE_METRICS)
    assert len(metrics) == 7
    for m in metrics:
        assert not m["clipped"], m
        assert m["rendered"] == pytest.approx(m["natural"], rel=0.03), m
        assert m["natural"] == pytest.approx(2.0, rel=0.05)
        if width >= 1280:
            assert m["width"] >= 200, m
    captions = [m["text"] for m in metrics]
    assert captions[0].startswith("Input")
    for cap, label in zip(captions[1:], ("ResNet18", "SE", "SGE", "CBAM", "BAM", "LGAM")):
        assert cap.startswith(label) and (" · 0." in cap or " · 1.00" in cap), cap
    info = browser.find_element(By.ID, "run-info").text
    assert "Device" in info and "cpu" in info
