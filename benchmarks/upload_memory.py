"""Peak memory of one app request with large uploads, two ways in one run: ``held``, every image
decoded and kept until the models have run (the app before 2026-12-07), and ``prepared``, each
image made into the models' inputs as it is read and only a small copy kept
(``app.ui._load_inputs`` with :meth:`lgam.engine.CamEngine.prepare`, what the app does). Each way
runs in its own process, the six models loaded and warmed up first; the number is the peak
resident memory during the request (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
above the resident memory before it. Linux only.

    python benchmarks/upload_memory.py [--checkpoints checkpoints] [--images 8] [--megapixels 50]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app_latency import _checkpoints, machine  # noqa: E402  (benchmarks/ is the script's folder)

WAYS = ("held", "prepared")


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_photo(path: Path, megapixels: float) -> tuple[int, int]:
    """A 3:2 JPEG of ``megapixels`` (a smooth colour field with noise: a few MB, like a photo)."""
    import numpy as np
    from PIL import Image

    w = int((megapixels * 1e6 * 1.5) ** 0.5)
    h = int(megapixels * 1e6 // w)
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    rgb += rng.normal(0, 8, (h, 1, 1)).astype(np.float32)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=90)
    return w, h


def one_request(way: str, checkpoints: str, photos: list[str], max_pixels: int) -> dict[str, float]:
    """In this process: load the models, warm up, then one request ``way``; memory in MiB."""
    from app.ui import _load_inputs
    from lgam.engine import CamEngine
    from lgam.imageio import MAX_BYTES, load_image

    engine = CamEngine.from_checkpoints(checkpoints, device="cpu", precision="float32")
    engine.warmup()
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    if way == "held":
        images = [load_image(p, max_pixels=max_pixels) for p in photos]
    else:
        images, _ = _load_inputs(engine, photos, MAX_BYTES, max_pixels)
    comps = engine.compare(images)
    assert all(r.ok for c in comps for r in c.results)
    return {"before_mb": before, "peak_mb": _status_mb("VmHWM")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--images", type=int, default=8, help="images in the request (the app's limit: 8)")
    p.add_argument("--megapixels", type=float, default=50, help="each image's size (the app's limit: 50)")
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--photos", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    max_pixels = int(args.megapixels * 1e6) + 1
    if args.child:
        print(json.dumps(one_request(args.child, args.checkpoints, args.photos, max_pixels)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoints(args.checkpoints, 160, tmp)
        photo = Path(tmp) / "photo.jpg"
        w, h = write_photo(photo, args.megapixels)
        print(f"One request of {args.images} JPEGs of {w}x{h} ({w * h / 1e6:.1f} MP, "
              f"{photo.stat().st_size / 2**20:.1f} MiB each) through the six models (float32, CPU, "
              f"Grad-CAM). Machine: {machine()}\n")
        print("| way | RSS before (MiB) | peak during the request (MiB) | peak above before (MiB) |")
        print("|---|---:|---:|---:|")
        rise = {}
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--child", way, "--checkpoints", str(ckpt),
                                  "--megapixels", str(args.megapixels), "--photos",
                                  *[str(photo)] * args.images], capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            rise[way] = m["peak_mb"] - m["before_mb"]
            print(f"| {way} | {m['before_mb']:.0f} | {m['peak_mb']:.0f} | {rise[way]:.0f} |")
        print(f"\nprepared / held, peak above before: {rise['prepared'] / rise['held']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
