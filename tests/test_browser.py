"""Real-browser tests: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
selenium at a desktop and a phone width. The page opens on the first example already compared;
clearing the image clears the results; an upload alone runs the comparison, and every tile must be
readable: its caption fully visible (not clipped), the photo's aspect ratio kept, at least 200 px
wide on the desktop. Screenshots go to ``$LGAM_SCREENSHOTS`` (default: the test's temp folder)."""
from __future__ import annotations

import importlib.util
import os
import socket
import time
from pathlib import Path

import pytest

from _helpers import synthetic_image

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "app_screenshot", Path(__file__).resolve().parents[1] / "scripts" / "app_screenshot.py")
shots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shots)  # the browser and the wait condition, one home for both
GRID_STATE, _tiles_of = shots.GRID_STATE, shots.tiles_of

pytestmark = pytest.mark.skipif(
    not (shots.CHROMIUM and shots.CHROMEDRIVER),
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
    width, height = request.param
    with shots.chromium(width, height) as driver:
        yield driver


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


# the Show radio's option labels and which one is checked
SHOW_STATE = """
return Array.from(document.querySelectorAll('#view label')).map(l =>
  [l.innerText.trim(), l.querySelector('input').checked]);
"""


@pytest.mark.slow
@pytest.mark.parametrize("browser", [(1280, 800)], indirect=True, ids=["desktop-1280x800"])
def test_the_show_radio_names_the_cam_method_chosen_in_settings(server, browser):
    """Choosing Score-CAM in Settings relabels Show's first option (it said Grad-CAM); the choice
    checked stays, and the relabelling runs no comparison of its own."""
    from selenium.webdriver.common.keys import Keys

    from app.ui import IN_CLASS_EXAMPLES, default_examples

    browser.get(server)
    WebDriverWait(browser, 60).until(_tiles_of(os.path.basename(default_examples()[IN_CLASS_EXAMPLES][0])))
    assert browser.execute_script(SHOW_STATE)[0] == ["Grad-CAM", True]
    # every request the page makes from here on, by URL (a comparison joins the queue)
    browser.execute_script("""window.lgamSeen = []; const f = window.fetch;
        window.fetch = (...a) => { window.lgamSeen.push(String(a[0].url || a[0])); return f(...a); };""")
    settings = browser.find_element(By.XPATH, "//span[normalize-space()='Settings']")  # the accordion's
    browser.execute_script("arguments[0].click()", settings)
    method = WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "input[aria-label='CAM method']"))
    method.click()
    method.send_keys(Keys.CONTROL, "a")
    method.send_keys("Score-CAM")
    time.sleep(0.3)  # the options filtered
    method.send_keys(Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(SHOW_STATE)[0][0] == "Score-CAM")
    assert browser.execute_script(SHOW_STATE) == [["Score-CAM", True], ["attention gates", False], ["both", False]]
    assert browser.find_element(By.CSS_SELECTOR, "#view input").get_attribute("value") == "Grad-CAM"  # the API's
    time.sleep(1.5)
    seen = browser.execute_script("return window.lgamSeen")
    assert seen and not [u for u in seen if "queue/join" in u], seen  # the relabelling's request only


@pytest.mark.slow
def test_the_screenshot_script_saves_the_first_view(server, tmp_path):
    """``scripts/app_screenshot.py`` (the README's picture) waits for the first example's seven
    tiles and saves the whole page at the width asked."""
    from PIL import Image

    from app.ui import IN_CLASS_EXAMPLES, default_examples

    first = os.path.basename(default_examples()[IN_CLASS_EXAMPLES][0])
    out = shots.shoot(server, tmp_path / "app.jpg", first, width=1000)
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.width == 1000 and img.height > 800
