"""Helpers shared by the tests (plain functions and constants; the fixtures built from them are in
``conftest.py``): the six Figure-5 models, initialised here and saved with
``lgam.checkpoints.save_checkpoint``, small synthetic test images, a thread runner.

The models are perturbed (seeded) so that they disagree with each other and their predictions
depend on the image: BN running statistics are recalibrated on a few structured images and the
``fc`` layer is random with logits of a moderate scale.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import lgam
from lgam.data import IMAGENET_MEAN, IMAGENET_STD
from lgam.models import FIGURE5_MODELS

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the app/ folder is not installed (python -m app runs from the repo)
    sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("LGAM_SHARED_DATA", REPO.parent / "shared" / "data"))

NAMES = list(FIGURE5_MODELS)


def run_in_threads(work, n: int, timeout: float = 300) -> list[BaseException]:
    """Run ``work(i)`` for ``i < n`` in ``n`` threads released together; the exceptions raised."""
    barrier, errors = threading.Barrier(n), []

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors


def class_names() -> list[str]:
    tsv = SHARED_DATA / "imagenet20" / "classes.tsv"
    if tsv.is_file():
        rows = [ln.split("\t") for ln in tsv.read_text().splitlines()[1:] if ln.strip()]
        names = [r[2] for r in rows]
        if len(names) == 20:
            return names
    return [f"class_{i:02d}" for i in range(20)]


CLASSES = class_names()


def synthetic_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A seeded RGB picture with a gradient background and a few coloured shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([
        (xx / max(w - 1, 1)) * 255 * rng.uniform(0.2, 1),
        (yy / max(h - 1, 1)) * 255 * rng.uniform(0.2, 1),
        np.full((h, w), rng.uniform(0, 255)),
    ], -1)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(6, w // 2)), y0 + int(rng.integers(6, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def make_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The six models, perturbed (seeded), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    calib = torch.stack([
        torch.from_numpy(np.asarray(synthetic_image(100 + i, (112, 112)), dtype=np.float32)
                         ).permute(2, 0, 1) / 255.0 for i in range(6)
    ])
    calib = (calib - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    models = {}
    for k, name in enumerate(NAMES):
        torch.manual_seed(seed * 100 + k)
        m = lgam.create_model(name, num_classes=20, stem="imagenet")
        # recalibrate BN running stats on the structured images (cumulative average)
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None
        m.train()
        with torch.no_grad():
            m(calib)
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = 0.1
        m.eval()
        with torch.no_grad():
            f = m.avgpool(m.forward_features(calib)).flatten(1)
            w = torch.randn(20, f.shape[1], generator=g)
            scale = 3.0 / ((f - f.mean(0)) @ w.T).std().clamp_min(1e-6)
            m.fc.weight.copy_(w * scale)
            m.fc.bias.copy_(-(f.mean(0) @ (w * scale).T) + 0.3 * torch.randn(20, generator=g))
        models[name] = m
    return models


def save_models(directory: Path, seed: int = 0) -> Path:
    from lgam.checkpoints import save_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    for name, m in make_models(seed).items():
        params = sum(p.numel() for p in m.parameters())
        save_checkpoint(
            m, directory, name, classes=CLASSES, input_size=224, seed=seed, recipe="test-fixture",
            metrics={"params": params, "gmacs_224": 1.82, "val_top1_err_224": 95.0,
                     "val_top1_err_160": 95.0},
        )
    return directory


def entry_files(directory: Path, name: str) -> list[Path]:
    """The files a manifest entry names (``files`` may be a list, dict or string)."""
    entry = json.loads((directory / "manifest.json").read_text())["models"][name]
    files = entry["files"]
    if isinstance(files, dict):
        files = list(files.values())
    elif isinstance(files, str):
        files = [files]
    return [directory / f for f in files]
