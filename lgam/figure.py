"""``lgam figure5``: the paper's Figure 5 (Grad-CAM of six models) for any images.

Rows are images; columns are the input and one heatmap per model, each captioned with the class
the map explains and the model's probability for it. Drawn with matplotlib's object API (no
pyplot state, safe in a server thread); PNG, PDF or SVG by the output's suffix.

    lgam figure5 cat.jpg dog.png --out fig5.pdf [--checkpoints checkpoints] [--target tench]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from ._fileio import FIGURE_FORMATS, save_figure
from .cam import METHODS, overlay
from .engine import ImageComparison
from .errors import UsageError
from .models import FIGURE5_MODELS

__all__ = ["figure5", "save_figure5", "FORMATS", "configure_parser", "main"]

FORMATS = FIGURE_FORMATS
#: the longest side of each tile's bitmap (keeps PDFs small)
TILE_PIXELS = 448


def _thumb(image: Image.Image) -> Image.Image:
    im = image.convert("RGB")
    if max(im.size) > TILE_PIXELS:
        im = im.copy()
        im.thumbnail((TILE_PIXELS, TILE_PIXELS), Image.Resampling.BICUBIC)
    return im


def figure5(comparisons: Sequence[ImageComparison], alpha: float = 0.5, tile_inches: float = 1.7):
    """A matplotlib ``Figure``: one row per :class:`~lgam.engine.ImageComparison`, columns = input +
    one CAM overlay per model (an "unavailable" tile where a model failed)."""
    from matplotlib.figure import Figure

    if not comparisons:
        raise UsageError("figure5 needs at least one image")
    n_rows, n_cols = len(comparisons), 1 + len(comparisons[0].results)
    fig = Figure(figsize=(tile_inches * n_cols, tile_inches * n_rows * 1.2 + 0.2),
                 layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, comp in enumerate(comparisons):
        thumb = _thumb(comp.image)
        tiles = [("Input", thumb, "")]
        for r in comp.results:
            if r.ok:
                tiles.append((r.label, overlay(thumb, r.cam, alpha), f"{r.target_class}\n{r.score:.2f}"))
            else:
                tiles.append((r.label, None, "unavailable"))
        for j, (label, img, caption) in enumerate(tiles):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if img is not None:
                ax.imshow(img.resize((224, 224), Image.Resampling.BILINEAR))
            else:
                ax.set_facecolor("0.9")
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
            if i == 0:
                ax.set_title(label, fontsize=10, fontweight="bold")
            if caption:
                ax.set_xlabel(caption, fontsize=8)
    return fig


def save_figure5(
    comparisons: Sequence[ImageComparison], path: str | Path, alpha: float = 0.5, dpi: int = 150
) -> Path:
    """Draw :func:`figure5` into ``path`` (``.png``, ``.pdf`` or ``.svg``); returns the path."""
    return save_figure(figure5(comparisons, alpha), path, dpi)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMG", help="image files (one row each)")
    p.add_argument("--out", required=True, help="output file: .png, .pdf or .svg")
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder with manifest.json (default: checkpoints)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="models to show, in this order (default: the six of Figure 5)")
    p.add_argument("--target", default=None,
                   help="class name or index for all models (default: each model's own top-1)")
    p.add_argument("--method", default="gradcam", choices=METHODS, help="CAM method")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1]")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--dpi", type=int, default=150)


def main(args: argparse.Namespace) -> int:
    from .engine import CamEngine
    from .imageio import load_image

    if Path(args.out).suffix.lower() not in FORMATS:
        raise UsageError(f"--out must end in one of {', '.join(FORMATS)}")
    images = [load_image(f) for f in args.images]
    names = args.models or list(FIGURE5_MODELS)
    unknown = [n for n in names if n not in FIGURE5_MODELS]
    if unknown:
        raise UsageError(f"unknown model(s) {unknown}; choose from {list(FIGURE5_MODELS)}")
    engine = CamEngine.from_checkpoints(args.checkpoints, {n: FIGURE5_MODELS[n] for n in names},
                                        device=args.device)
    if not engine.available:
        print(f"error: {engine.setup_message}", file=sys.stderr)
        return 1
    for name, why in engine.unavailable.items():
        print(f"warning: {name} unavailable: {why}", file=sys.stderr)
    comps = engine.compare(images, target=args.target, method=args.method)
    out = save_figure5(comps, args.out, alpha=args.alpha, dpi=args.dpi)
    for comp, f in zip(comps, args.images):
        print(f + ": " + "; ".join(r.caption() for r in comp.results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.figure"))
