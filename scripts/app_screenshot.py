"""Screenshot a running app's first view (the README's ``docs/app.jpg``) in headless Chromium.

    python -m app --port 7860 &
    python scripts/app_screenshot.py http://127.0.0.1:7860/ --out docs/app.jpg

Waits until the first example's seven tiles (the input and six models) are shown, then saves the
whole page at ``--width`` CSS px as a JPEG (or PNG, by the file's extension). Needs Debian's
``chromium`` and ``chromium-driver`` (or ``CHROMIUM_BIN`` / ``CHROMEDRIVER_BIN``) and selenium.
:func:`chromium` is also the browser the real-browser tests drive.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")

# the number of tiles and the first one's caption (read at once: the grid may be re-rendered)
GRID_STATE = """
const f = document.querySelectorAll('#results figure');
return [f.length, f.length ? f[0].querySelector('figcaption').innerText : ''];
"""


@contextlib.contextmanager
def chromium(width: int, height: int) -> Iterator[Any]:
    """A headless Chromium (selenium ``webdriver.Chrome``) with a window of ``width`` x ``height``
    CSS px and a fresh profile, closed and its profile removed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        raise SystemExit("needs Chromium and chromedriver (Debian: apt-get install -y chromium "
                         "chromium-driver)")
    profile = tempfile.mkdtemp(prefix="lgam_chromium_")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_window_size(width, height)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def tiles_of(name: str) -> Callable[[Any], bool]:
    """A wait condition: seven tiles or more, the first of them the input ``name``."""
    def shown(d) -> bool:
        count, caption = d.execute_script(GRID_STATE)
        return count >= 7 and name in caption
    return shown


def shoot(url: str, out: str | Path, first_example: str, width: int = 1280, timeout: float = 120) -> Path:
    """Open ``url``, wait for the comparison of ``first_example`` (a file name), save the page."""
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    out = Path(out)
    with chromium(width, 800) as browser:
        browser.get(url)
        WebDriverWait(browser, timeout).until(tiles_of(first_example))
        time.sleep(0.5)  # images decoded and laid out
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(width, height)  # the whole page, not the first screen
        time.sleep(0.5)
        png = browser.get_screenshot_as_png()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".jpg", ".jpeg"):
        img.save(out, quality=85, optimize=True)
    else:
        img.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the running app, e.g. http://127.0.0.1:7860/")
    p.add_argument("--out", default="docs/app.jpg")
    p.add_argument("--width", type=int, default=1280, help="window width in CSS px")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from app.ui import IN_CLASS_EXAMPLES, default_examples

    first = os.path.basename(default_examples()[IN_CLASS_EXAMPLES][0])
    out = shoot(args.url, args.out, first, args.width)
    print(f"{out}: {out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
