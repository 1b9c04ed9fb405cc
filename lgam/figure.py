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
from .cam import CLASS_AGNOSTIC, CMAP, METHOD_LABELS, METHODS, overlay
from .cli import positive_int
from .engine import PRECISIONS, ImageComparison, ModelResult
from .errors import UsageError
from .models import FIGURE5_MODELS

__all__ = ["figure5", "save_figure5", "cam_caption", "gate_place", "squeeze_to_tile_aspect", "FORMATS", "VIEWS",
           "SCALE_LABELS", "configure_parser", "main"]

FORMATS = FIGURE_FORMATS
#: the longest side of each tile's bitmap (keeps PDFs small)
TILE_PIXELS = 448
#: the most a tile's height/width (or width/height) may be: a 1 x 1000 px strip drawn at its own
#: ratio made a row 760 inches tall (a 114,000-px PNG); beyond it the photo is squeezed into the
#: tile, as the models see every image squeezed into a square
MAX_TILE_ASPECT = 4.0


def _thumb(image: Image.Image) -> Image.Image:
    im = image.convert("RGB")
    if max(im.size) > TILE_PIXELS:
        im = im.copy()
        im.thumbnail((TILE_PIXELS, TILE_PIXELS), Image.Resampling.BICUBIC)
    return im


#: what the model tiles show: the Grad-CAM, the attention modules' own spatial gates, or both
VIEWS = ("cam", "gates", "both")


def figure5(comparisons: Sequence[ImageComparison], alpha: float = 0.5, tile_inches: float = 1.7,
            view: str = "cam"):
    """A matplotlib ``Figure``: one row per :class:`~lgam.engine.ImageComparison` (two with
    ``view="both"``: CAMs, then gates), columns = input + one overlay per model (an
    "unavailable" tile where a model failed). Gates need ``compare(..., gates=True)``; they are
    drawn on the colormap's absolute scale (0.5 is 0.5 in every tile), CAMs min-max scaled."""
    from matplotlib.figure import Figure

    if not comparisons:
        raise UsageError("figure5 needs at least one image")
    if view not in VIEWS:
        raise UsageError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    rows = [(comp, v) for comp in comparisons for v in (("cam", "gates") if view == "both" else (view,))]
    n_cols = 1 + len(comparisons[0].results)
    thumbs = {id(comp): _thumb(comp.image) for comp in comparisons}
    aspects = [_tile_aspect(thumbs[id(comp)]) for comp, _ in rows]
    fig = Figure(figsize=(tile_inches * n_cols, sum(tile_inches * a + 0.45 for a in aspects) + 0.8),
                 layout="constrained")
    axes = fig.subplots(len(rows), n_cols, squeeze=False, height_ratios=aspects)
    for i, (comp, v) in enumerate(rows):
        thumb = thumbs[id(comp)]
        row = METHOD_LABELS[comp.method] if v == "cam" else "gates"
        tiles = [("Input", thumb, "" if view != "both" else row)]
        tiles += [_tile(r, thumb, alpha, v, comp.method) for r in comp.results]
        for j, (label, img, caption) in enumerate(tiles):
            _draw(axes[i][j], img, label if i == 0 else None, caption, aspects[i])
    _colour_bar(fig, axes, view)
    return fig


#: what the heatmaps' colours measure, by view
SCALE_LABELS = {
    "cam": "CAM, each map min-max scaled to 0-1",
    "gates": "gate value (what the module multiplies by)",
    "both": "CAM rows: each map min-max scaled to 0-1 · gate rows: the gate's value",
}


def _colour_bar(fig, axes, view: str) -> None:
    """One horizontal colour bar under the grid, 0 to 1, saying what the colours measure."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=CMAP), ax=axes, orientation="horizontal",
                       fraction=0.04, aspect=50, pad=0.02, shrink=0.6)
    bar.set_ticks([0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=7)
    bar.set_label(SCALE_LABELS[view], fontsize=8)


def _tile_aspect(thumb: Image.Image) -> float:
    """The tile's height / width: the photo's, within ``1/MAX_TILE_ASPECT .. MAX_TILE_ASPECT``."""
    return min(max(thumb.height / thumb.width, 1 / MAX_TILE_ASPECT), MAX_TILE_ASPECT)


def squeeze_to_tile_aspect(image: Image.Image) -> Image.Image:
    """``image`` itself when its height/width is within ``1/MAX_TILE_ASPECT .. MAX_TILE_ASPECT``,
    else a copy with its short side stretched to that bound (a 1 x 448 strip -> 112 x 448): the
    tile shape Figure 5 draws, for bitmaps shown as they are (the app's page)."""
    w, h = image.size
    aspect = _tile_aspect(image)
    if aspect == h / w:
        return image
    size = (max(1, round(h / aspect)), h) if h / w > aspect else (w, max(1, round(w * aspect)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _tile(r: ModelResult, thumb: Image.Image, alpha: float, view: str, method: str):
    """``(title, image or None, caption)`` of one model's tile."""
    if not r.ok:
        return r.label, None, "failed on this run" if r.failed else "unavailable"
    if view == "cam":
        return r.label, overlay(thumb, r.cam, alpha), cam_caption(r, method, "\n")
    if r.gate is None:
        return r.label, None, r.gate_note or "no gate"
    return r.label, overlay(thumb, r.gate, alpha), gate_place(r.gate_source)


def cam_caption(r: ModelResult, method: str, sep: str = " · ") -> str:
    """A CAM tile's caption: the class and its probability, and, for a method whose map is the
    same for every class (:data:`lgam.cam.CLASS_AGNOSTIC`), that the map does not explain it."""
    text = f"{r.target_class}{sep}{r.score:.2f}"
    return text + f"{sep}map not class-specific" if method in CLASS_AGNOSTIC else text


def gate_place(module: str) -> str:
    """Where a gate comes from, for a caption: ``layer4.1.attention`` -> ``stage 4 · layer4.1``,
    ``stage_attention.2`` (BAM) -> ``after stage 3``."""
    from .attention import stage_of

    if module.startswith("stage_attention."):
        return f"after stage {stage_of(module)}"
    return f"stage {stage_of(module)} · {module.removesuffix('.attention')}"


def _draw(ax, img: Image.Image | None, title: str | None, caption: str, aspect: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if img is not None:
        ax.imshow(img, aspect="auto")  # fills the tile: the photo's own ratio unless clamped
    else:
        ax.set_facecolor("0.9")
    ax.set_box_aspect(aspect)
    if title:
        ax.set_title(title, fontsize=10, fontweight="bold")
    if caption:
        ax.set_xlabel(caption, fontsize=7, wrap=True)


def save_figure5(
    comparisons: Sequence[ImageComparison], path: str | Path, alpha: float = 0.5, dpi: int = 150,
    view: str = "cam",
) -> Path:
    """Draw :func:`figure5` into ``path`` (``.png``, ``.pdf`` or ``.svg``); returns the path."""
    return save_figure(figure5(comparisons, alpha, view=view), path, dpi)


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
    p.add_argument("--view", choices=VIEWS, default="cam",
                   help="cam: Grad-CAM; gates: each attention module's own spatial gate; both")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), default=None,
                   help="stage of the gates (default: the last stage that has them)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="float32: the numbers lgam evaluate computes; auto/bf16: the app's fast path")
    p.add_argument("--dpi", type=positive_int, default=150)


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
                                        device=args.device, precision=args.precision)
    if not engine.available:
        raise UsageError(engine.setup_message or "no model could be loaded")
    for name, why in engine.unavailable.items():
        print(f"warning: {name} unavailable: {why}", file=sys.stderr)
    comps = engine.compare(images, target=args.target, method=args.method,
                           gates=args.view != "cam", stage=args.stage)
    out = save_figure5(comps, args.out, alpha=args.alpha, dpi=args.dpi, view=args.view)
    for comp, f in zip(comps, args.images):
        print(f + ": " + "; ".join(r.caption() for r in comp.results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.figure"))
