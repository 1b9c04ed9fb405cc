"""Results as a person sees them: one tile per model (the heatmap over the photo, its caption), laid
out as an HTML grid for the page and as a JSON list for the API.

The page's grid is HTML (``<figure>`` + ``<figcaption>``), not a gallery of thumbnails: captions are
text that wraps instead of being cut, every tile keeps the photo's aspect ratio, and the columns
follow the width (at least :data:`MIN_TILE_PX` wide: four per row at 1280 px, two on a phone).
Tiles travel as JPEG data URLs, inside the HTML and inside the API's JSON: no file per tile,
nothing for two requests to overwrite, nothing for a client to download one by one (seven files
cost gradio_client seven connections: 160 ms of a 530 ms round trip).
"""
from __future__ import annotations

import base64
import html
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw

from lgam.cam import colormap_lut, overlay
from lgam.engine import ImageComparison, ModelResult
from lgam.figure import SCALE_LABELS, cam_caption, gate_place, squeeze_to_tile_aspect

__all__ = ["Tile", "VIEWS", "tiles_for", "tiles_html", "scale_html", "tiles_data", "gate_notes", "GRID_CSS"]

#: the view switch: label -> what the model tiles show
VIEWS = {"Grad-CAM": "cam", "attention gates": "gates", "both": "both"}
#: the longest side of a tile's bitmap: sharp at the widest grid cell, small to send
TILE_PX = 448
#: the narrowest grid column (CSS px; at most four columns), and on a phone (two columns at 420 px)
MIN_TILE_PX = 200
PHONE_TILE_PX = 150
JPEG_QUALITY = 88
#: overlays and JPEG encodes run here, a tile per task (OpenCV and Pillow release the GIL): seven
#: tiles are ~40 ms of work one after another, done after the models, when the cores are free
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="lgam-tiles")

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
.lgam-scale {{ display: flex; align-items: center; gap: 6px; margin-top: 10px; font-size: 0.85rem; }}
.lgam-scale .bar {{ width: 180px; height: 10px; border-radius: 2px; flex: none; }}
"""


@dataclass
class Tile:
    """One cell: ``image`` (RGB, the photo's aspect), ``title`` (the model) and ``caption``."""

    image: Image.Image
    title: str
    caption: str


def _shown(image: Image.Image) -> Image.Image:
    """The photo as its tiles show it: at most :data:`TILE_PX` a side, at most 4:1 (a 10 x 10,000
    strip drawn at its own shape made the grid ~90,000 px tall)."""
    if max(image.size) <= TILE_PX:
        return squeeze_to_tile_aspect(image)
    small = image.copy()
    small.thumbnail((TILE_PX, TILE_PX), Image.Resampling.BICUBIC)
    return squeeze_to_tile_aspect(small)


def _blank(size: tuple[int, int]) -> Image.Image:
    tile = Image.new("RGB", size, (228, 228, 228))
    d = ImageDraw.Draw(tile)
    d.line([(0, 0), size], fill=(190, 190, 190), width=2)
    d.line([(0, size[1]), (size[0], 0)], fill=(190, 190, 190), width=2)
    return tile


def _model_tile(r: ModelResult, shown: Image.Image, alpha: float, view: str, method: str) -> Tile:
    if not r.ok:
        return Tile(_blank(shown.size), r.label, r.problem)
    if view == "cam":
        return Tile(overlay(shown, r.cam, alpha), r.label, cam_caption(r, method))
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
        tiles = _POOL.map(lambda r: _model_tile(r, shown, alpha, v, comp.method), comp.results)
        rows.append([head] + list(tiles))
    return rows


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _data_urls(rows: Sequence[Sequence[Tile]]):
    """Every tile's data URL, row by row, encoded in parallel (an iterator)."""
    return iter(_POOL.map(_data_url, [t.image for row in rows for t in row]))


def scale_html(view: str) -> str:
    """The heatmaps' colour key: 0 to 1 in the overlays' colormap, and what it measures in
    ``view`` (``"cam"``, ``"gates"`` or ``"both"``)."""
    lut = colormap_lut()
    stops = ", ".join("#%02x%02x%02x" % tuple(lut[round(k * (len(lut) - 1) / 8)]) for k in range(9))
    return (f'<div class="lgam-scale">0<span class="bar" style="background: linear-gradient(to right, '
            f'{stops})"></span>1 <span>· {html.escape(SCALE_LABELS[view])}</span></div>')


def tiles_html(rows: Sequence[Sequence[Tile]], titles: Sequence[str] = (), view: str | None = None) -> str:
    """The page's result grid: one block per row of tiles, each with an optional title; with
    ``view``, the colour key (:func:`scale_html`) under it."""
    parts = [f"<style>{GRID_CSS}</style>"]  # with the grid: styled however the page is launched
    urls = _data_urls(rows)
    for k, row in enumerate(rows):
        if k < len(titles) and titles[k]:
            parts.append(f'<div class="lgam-row-title">{html.escape(titles[k])}</div>')
        cells = "".join(
            f'<figure><img src="{next(urls)}" alt="{html.escape(t.title)}: '
            f'{html.escape(t.caption)}"><figcaption><b>{html.escape(t.title)}</b>'
            f"{html.escape(t.caption)}</figcaption></figure>"
            for t in row)
        parts.append(f'<div class="lgam-grid">{cells}</div>')
    if view is not None:
        parts.append(scale_html(view))
    return "\n".join(parts)


def tiles_data(rows: Sequence[Sequence[Tile]]) -> dict[str, list[dict[str, object]]]:
    """The API's tiles: ``{"tiles": [{"row", "title", "caption", "image"}]}``, row by row (a row
    per image and view: its input, then one tile per model), ``image`` a JPEG data URL."""
    urls = _data_urls(rows)
    return {"tiles": [{"row": k, "title": t.title, "caption": t.caption, "image": next(urls)}
                      for k, row in enumerate(rows) for t in row]}


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
