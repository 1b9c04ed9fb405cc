"""Server-side time per app request (one image, six models, Grad-CAM): the engine vs a naive loop.

Per request and device, in the same run:

- ``engine``: :meth:`lgam.engine.CamEngine.compare` - preprocess once, one forward per model, the
  fast no-backward Grad-CAM, probabilities, top-5 (what ``/compare`` computes before drawing);
- ``engine channels_last``: the same on channels_last copies of the models (the CUDA default);
- ``engine+overlays``: the engine plus the six heatmap overlays at the image's size;
- ``naive``: preprocess once, then per model a new pytorch-grad-cam ``GradCAM(model,
  [model.cam_target_layer()])`` in ``with``, called with the model's own top-1 (forward + backward), plus
  the softmax - the usual tutorial loop.

Models come from ``--checkpoints`` when it has a manifest, else are freshly initialised (timing
does not depend on the weights). Prints a Markdown table (median and p90 over ``--reps``) and the
machine.

    python benchmarks/app_latency.py [--reps 30] [--devices cpu cuda] [--size 224] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lgam
from lgam.cam import overlay
from lgam.engine import CamEngine
from lgam.models import FIGURE5_MODELS


def _image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1)
    arr = np.clip(arr + rng.integers(-30, 30, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _engine(checkpoints: str | None, device: str, size: int) -> CamEngine:
    if checkpoints and (Path(checkpoints) / "manifest.json").is_file():
        eng = CamEngine.from_checkpoints(checkpoints, device=device)
        if len(eng.available) == len(FIGURE5_MODELS):
            return eng
    models = {n: lgam.create_model(n, num_classes=20) for n in FIGURE5_MODELS}
    classes = [f"class_{i}" for i in range(20)]
    return CamEngine(models, classes, device=device, entries={n: {"input_size": size} for n in models})


def _naive(engine: CamEngine, image: Image.Image, size: int) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = engine.preprocess([image], size)
    for name in engine.available:
        model = engine.model(name)
        with GradCAM(model=model, target_layers=[model.cam_target_layer()]) as cam:
            xin = x.clone().requires_grad_(True)
            grayscale = cam(input_tensor=xin, targets=None)  # own top-1
            probs = torch.softmax(cam.outputs.detach(), 1).cpu().numpy()
            top = np.argsort(-probs[0])[:5]
            _ = grayscale[0], top


def _time(fn, reps: int, sync) -> list[float]:
    fn()
    fn()  # warm-up (kernel selection, allocator)
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _fmt(ts: list[float]) -> tuple[float, float]:
    ts = sorted(ts)
    return statistics.median(ts), ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
         f"({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        s += f", GPU {torch.cuda.get_device_name(0)}"
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: cpu, plus cuda when available")
    p.add_argument("--size", type=int, default=224, help="model input size (the app uses 224)")
    p.add_argument("--image-size", type=int, default=480, help="side of the request's image")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--naive-reps", type=int, default=None, help="default: --reps")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    image = _image(args.image_size)
    print(f"# App request latency: 1 image ({args.image_size}x{args.image_size}), six models, "
          f"Grad-CAM, {args.size} px\n\nMachine: {machine()}\n")
    print("| device | path | median ms | p90 ms | speed-up vs naive |\n|---|---|---:|---:|---:|")
    for dev in devices:
        engine = _engine(args.checkpoints, dev, args.size)
        sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)

        def with_overlays():
            for r in engine.compare(image)[0].results:
                overlay(image, r.cam, 0.5)

        naive = _time(lambda: _naive(engine, image, args.size), args.naive_reps or args.reps, sync)
        fast = CamEngine({n: engine.model(n) for n in engine.available}, engine.classes,
                         device=dev, entries={n: {"input_size": args.size} for n in engine.available},
                         fast_copies=True)
        rows = [("engine", _time(lambda: engine.compare(image), args.reps, sync)),
                ("engine channels_last", _time(lambda: fast.compare(image), args.reps, sync)),
                ("engine+overlays", _time(with_overlays, args.reps, sync)), ("naive", naive)]
        base = _fmt(naive)[0]
        for name, ts in rows:
            med, p90 = _fmt(ts)
            print(f"| {dev} | {name} | {med:.2f} | {p90:.2f} | {base / med:.1f}x |")


if __name__ == "__main__":
    main()
