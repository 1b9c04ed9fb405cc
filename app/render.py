"""Results as a person sees them: one tile per model (the heatmap over the photo, its caption), laid
out as an HTML grid for the page and written as JPEG files for the API.

The page's grid is HTML (``<figure>`` + ``<figcaption>``), not a gallery of thumbnails: captions are
text that wraps instead of being cut, every tile keeps the photo's aspect ratio, and the columns
follow the width (at least :data:`MIN_TILE_PX` wide: four per row at 1280 px, two on a phone).
Tiles travel inside the HTML as JPEG data URLs: no file per tile, nothing for two requests to
overwrite. The API's gallery gets JPEG files, each written under a fresh temporary folder.
"""
from __future__ import annotations

import base64
import html
import io
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from lgam.cam import overlay
from lgam.engine import ImageComparison, ModelResult
from lgam.figure import gate_place

__all__ = ["Tile", "VIEWS", "tiles_for", "tiles_html", "save_tiles", "gate_notes", "GRID_CSS",
           "TILE_FILES", "TILE_FILES_KEEP_S"]

#: the view switch: label -> what the model tiles show
VIEWS = {"Grad-CAM": "cam", "attention gates": "gates", "both": "both"}
#: the longest side of a tile's bitmap: sharp at the widest grid cell, small to send
TILE_PX = 448
#: the narrowest grid column (CSS px; at most four columns), and on a phone (two columns at 420 px)
MIN_TILE_PX = 200
PHONE_TILE_PX = 150
JPEG_QUALITY = 88

GRID_CSS = f"""
.lgam-grid {{ display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(max({MIN_TILE_PX}px, 23%), 1fr)); }}
@media (max-width: 600px) {{ .lgam-grid {{
  grid-template-columns: repeat(auto-fill, minmax({PHONE_TILE_PX}px, 1fr)); }} }}
.lgam-grid figure {{ margin: 0; }}
.lgam-grid img {{ width: 100%; height: auto; display: block; border-radius: 4px; }}
.lgam-grid figcaption {{ font-size: 0.9rem; line-height: 1.25; margin-top: 3px;
  overflow-wrap: anywhere; }}
.lgam-grid figcaption b {{ display: block; }}
.lgam-row-title {{ margin: 12px 0 4px; font-weight: 600; }}
"""


@dataclass
class Tile:
    """One cell: ``image`` (RGB, the photo's aspect), ``title`` (the model) and ``caption``."""

    image: Image.Image
    title: str
    caption: str


def _shown(image: Image.Image) -> Image.Image:
    if max(image.size) <= TILE_PX:
        return image
    small = image.copy()
    small.thumbnail((TILE_PX, TILE_PX), Image.Resampling.BICUBIC)
    return small


def _blank(size: tuple[int, int]) -> Image.Image:
    tile = Image.new("RGB", size, (228, 228, 228))
    d = ImageDraw.Draw(tile)
    d.line([(0, 0), size], fill=(190, 190, 190), width=2)
    d.line([(0, size[1]), (size[0], 0)], fill=(190, 190, 190), width=2)
    return tile


def _model_tile(r: ModelResult, shown: Image.Image, alpha: float, view: str) -> Tile:
    if not r.ok:
        return Tile(_blank(shown.size), r.label, f"unavailable: {r.error}")
    if view == "cam":
        return Tile(overlay(shown, r.cam, alpha), r.label, f"{r.target_class} · {r.score:.2f}")
    if r.gate is None:
        return Tile(_blank(shown.size), r.label, r.gate_note or "no gate")
    return Tile(overlay(shown, r.gate, alpha), r.label, f"gate, {gate_place(r.gate_source)}")


def tiles_for(comp: ImageComparison, name: str, alpha: float, view: str) -> list[list[Tile]]:
    """Rows of tiles for one image: the input, then one tile per model; ``view="both"`` gives a
    Grad-CAM row and a gates row."""
    shown = _shown(comp.image)
    views = ("cam", "gates") if view == "both" else (view,)
    rows = []
    for v in views:
        head = Tile(shown, "Input", name if v == "cam" else f"{name} · attention gates")
        rows.append([head] + [_model_tile(r, shown, alpha, v) for r in comp.results])
    return rows


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def tiles_html(rows: Sequence[Sequence[Tile]], titles: Sequence[str] = ()) -> str:
    """The page's result grid: one block per row of tiles, each with an optional title."""
    parts = [f"<style>{GRID_CSS}</style>"]  # with the grid: styled however the page is launched
    for k, row in enumerate(rows):
        if k < len(titles) and titles[k]:
            parts.append(f'<div class="lgam-row-title">{html.escape(titles[k])}</div>')
        cells = "".join(
            f'<figure><img src="{_data_url(t.image)}" alt="{html.escape(t.title)}: '
            f'{html.escape(t.caption)}"><figcaption><b>{html.escape(t.title)}</b>'
            f"{html.escape(t.caption)}</figcaption></figure>"
            for t in row)
        parts.append(f'<div class="lgam-grid">{cells}</div>')
    return "\n".join(parts)


#: where the API's tile files go, one folder per call; Gradio copies them into its own cache, so a
#: folder older than TILE_FILES_KEEP_S seconds is no longer needed and is removed by later calls
TILE_FILES = Path(tempfile.gettempdir()) / "lgam_tiles"
TILE_FILES_KEEP_S = 600


def _prune_tile_files(now: float) -> None:
    for old in TILE_FILES.iterdir():
        try:
            if now - old.stat().st_mtime > TILE_FILES_KEEP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed by another request meanwhile
            pass


def save_tiles(rows: Sequence[Sequence[Tile]]) -> list[tuple[str, str]]:
    """JPEG files of the tiles in a fresh folder: ``[(path, "title · caption")]`` for the API's
    gallery (a new folder per call: no two requests write the same file; folders older than
    :data:`TILE_FILES_KEEP_S` are removed, so a long-running server does not fill the disk)."""
    TILE_FILES.mkdir(exist_ok=True)
    _prune_tile_files(time.time())
    folder = Path(tempfile.mkdtemp(dir=TILE_FILES))
    out = []
    for i, t in enumerate(t for row in rows for t in row):
        path = folder / f"{i:02d}.jpg"
        t.image.save(path, format="JPEG", quality=JPEG_QUALITY)
        out.append((str(path), f"{t.title} · {t.caption}"))
    return out


def gate_notes(comp: ImageComparison) -> str:
    """Markdown: what each model's gate map is (its module's formula)."""
    lines = []
    for r in comp.results:
        if r.ok and r.gate is not None:
            lines.append(f"- **{r.label}** ({gate_place(r.gate_source)}): {r.gate_formula}")
        elif r.ok:
            lines.append(f"- **{r.label}**: {r.gate_note}")
    return "**What the gate maps are** (values as the module used them; 0.5 looks the same in "\
           "every tile):\n" + "\n".join(lines)
