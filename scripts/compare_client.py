"""Call a running app's ``/compare`` with one image through gradio_client and check the answer.

    python scripts/compare_client.py http://127.0.0.1:7860/
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image


def main(url: str) -> int:
    img = Path(tempfile.mkdtemp()) / "probe.png"
    Image.radial_gradient("L").convert("RGB").save(img)
    client = Client(url, verbose=False)
    t0 = time.perf_counter()
    tiles, top5, info = client.predict(handle_file(str(img)), api_name="/compare")
    ms = (time.perf_counter() - t0) * 1000
    tiles = tiles["tiles"]
    print(f"/compare: {len(tiles)} tiles, {len(top5['data'])} top-5 rows in {ms:.0f} ms")
    if len(tiles) < 2 or not all(t["image"].startswith("data:image/jpeg;base64,") for t in tiles):
        print("FAIL: expected the input and one heatmap per model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:7860/", help="the app's address")
    sys.exit(main(parser.parse_args().url))
