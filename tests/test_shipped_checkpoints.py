"""The trained models shipped in checkpoints/: complete records, loadable, and what the app loads.

Skips (saying so) while no model has been shipped yet.
"""
import json
from pathlib import Path

import pytest
import torch

from _helpers import REPO
from lgam.engine import CamEngine
from lgam.models import FIGURE5_MODELS
from lgam.checkpoints import load_checkpoint, load_manifest
from lgam.device import cpu_has_native_bf16
from lgam.evaluate import SIZES

CHECKPOINTS = REPO / "checkpoints"


@pytest.fixture(scope="module")
def shipped() -> dict:
    if not (CHECKPOINTS / "manifest.json").is_file():
        pytest.skip(f"no trained models shipped yet ({CHECKPOINTS / 'manifest.json'} is absent)")
    return load_manifest(CHECKPOINTS)["models"]


def test_every_shipped_model_has_its_record(shipped):
    for name, entry in shipped.items():
        assert name in FIGURE5_MODELS, name
        assert entry["arch"] == name and len(entry["classes"]) == 20
        assert entry["input_size"] in SIZES
        metrics = entry["metrics"]
        assert {f"val_top1_err_{s}" for s in SIZES} <= metrics.keys(), f"{name}: run lgam evaluate"
        assert metrics["val_images"] == 7854 and metrics["train_wall_min"] > 0
        assert entry["seed"] is not None and entry["recipe"] and entry["extra"]["machine"]
        log = CHECKPOINTS / entry["extra"]["run_log"]
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["epoch"] for r in records] == list(range(1, entry["epochs"] + 1))
        config = json.loads((log.parent / "config.json").read_text())
        assert config["recipe"] == entry["recipe"] and config["seed"] == entry["seed"]


def test_files_are_parts_under_10_mb(shipped):
    """As ``lgam.checkpoints`` writes them (parts of at most 9 MiB). A Space no longer needs this:
    ``scripts/space_upload.py`` stores them with LFS/Xet, which takes files of any size."""
    for entry in shipped.values():
        for fname in entry["sha256"]:
            assert (CHECKPOINTS / fname).stat().st_size < 10**7, fname


def test_shipped_models_load_and_predict(shipped):
    for name, entry in shipped.items():
        model, _ = load_checkpoint(CHECKPOINTS, name)  # verifies every sha256
        size = entry["input_size"]
        with torch.inference_mode():
            logits = model(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 20) and torch.isfinite(logits).all()


def test_the_app_loads_the_shipped_models_with_no_flag(shipped, monkeypatch):
    """``python -m app`` from the repository, no --checkpoints: the app's own default folder."""
    pytest.importorskip("gradio")
    from app.server import build_engine, parse_args

    monkeypatch.chdir(CHECKPOINTS.parent)
    monkeypatch.delenv("LGAM_CHECKPOINTS", raising=False)
    engine = build_engine(parse_args(["--device", "cpu"]))
    assert set(shipped) <= set(engine.available)
    assert engine.setup_message is None


def test_the_app_opens_on_an_example_the_models_get_right(shipped):
    """The page's first view, as on the Space: the first shipped example (an ImageNet val image,
    the first row of docs/figure5.png) compared by the shipped models, most of which name its
    class without the low-confidence warning."""
    pytest.importorskip("gradio")
    from app.ui import IN_CLASS_EXAMPLES, default_examples, first_view

    first = Path(default_examples()[IN_CLASS_EXAMPLES][0])
    engine = CamEngine.from_checkpoints(CHECKPOINTS, device="cpu")
    grid, top5, info = first_view(engine, str(first))
    label = first.stem.split("_", 1)[1].replace("_", " ")  # 00_tench.jpg: tench
    tops = [row[2].rsplit(" (", 1)[0] for row in top5 if not row[2].startswith("unavailable")]
    assert grid.count("<figure>") == 7 and len(tops) == len(shipped)
    assert sum(t == label for t in tops) > len(tops) / 2, tops
    assert "low confidence" not in info


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_bf16_app_agrees_with_float32_on_val_images(shipped, imagenet20_dir):
    """The app's bf16 fast path: the same top-1 as float32 and heatmaps within 0.02 on a val
    subset (48 images, every class)."""
    import numpy as np
    from PIL import Image

    from lgam.data import load_split

    split = load_split(imagenet20_dir, "val", limit=48)
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in split.images]
    fp32 = CamEngine.from_checkpoints(CHECKPOINTS, device="cpu", precision="float32")
    bf16 = CamEngine.from_checkpoints(CHECKPOINTS, device="cpu", precision="bf16")
    a, b = fp32.compare(images), bf16.compare(images)
    pairs = [(ra, rb) for ca, cb in zip(a, b) for ra, rb in zip(ca.results, cb.results) if ra.ok]
    agree = [ra.target == rb.target for ra, rb in pairs]
    assert sum(agree) >= 0.98 * len(pairs)
    diffs = [np.abs(ra.cam - rb.cam).mean() for (ra, rb), ok in zip(pairs, agree) if ok]
    assert max(diffs) <= 0.02
