"""The Gradio 6 page: input image(s) -> input + six Grad-CAM overlays (the paper's Figure 5).

Thin by design: images are read by :mod:`lgam.imageio`, every number comes from
:class:`lgam.engine.CamEngine`, overlays from :func:`lgam.cam.overlay` and the exported figure from
:mod:`lgam.figure`; this module holds the page's words and layout. One named API endpoint, ``/compare`` (plus ``/export`` for the figure file).
"""
from __future__ import annotations

import logging
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
from PIL import Image, ImageDraw

from lgam._format import format_or_dash
from lgam.cam import METHODS, CamError, overlay
from lgam.data import IMAGE_EXTENSIONS
from lgam.engine import CamEngine, ImageComparison
from lgam.imageio import MAX_BYTES, MAX_PIXELS, ImageLoadError, load_image

__all__ = ["OWN_TOP1", "build_app", "run_compare", "run_export", "default_examples", "raw_image",
           "model_rows", "setup_help"]

log = logging.getLogger("lgam.app")

#: the target-class choice meaning "each model explains its own prediction"
OWN_TOP1 = "each model's own top-1"
TOP5_HEADERS = ["image", "model", "#1", "#2", "#3", "#4", "#5", "ms"]
MODEL_HEADERS = ["model", "status", "params (M)", "GMACs 224", "input (px)", "val top-1 err (%)",
                 "val top-1 err 224 px (%)"]


def _raw_preprocess(self: gr.Image, payload: Any) -> str | None:
    """``gr.Image.preprocess`` replacement: the uploaded file's path, untouched."""
    if payload is None:
        return None
    if getattr(payload, "path", None):
        return str(payload.path)
    return gr.Image.preprocess(self, payload)  # data: URLs (webcam streams)


def raw_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (upload, webcam, clipboard) whose handler receives the uploaded file's path
    untouched, so that :func:`lgam.imageio.load_image` - not Gradio - decodes it and can answer
    bad files with a clear message. (An instance override rather than a subclass: Gradio writes a
    ``.pyi`` stub next to the module of every ``Component`` subclass.)"""
    comp = gr.Image(type="filepath", **kwargs)
    comp.preprocess = types.MethodType(_raw_preprocess, comp)  # type: ignore[method-assign]
    return comp


def default_examples(extra_dir: str | Path | None = None) -> list[str]:
    """Example photos shipped inside installed packages (matplotlib's Grace Hopper, scikit-learn's
    sample images when installed) plus every image in ``extra_dir``. The repo ships no photos."""
    found: list[Path] = []
    try:
        import matplotlib

        found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except Exception:  # noqa: BLE001
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("sklearn")
        if spec and spec.submodule_search_locations:
            d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
            found += [d / "china.jpg", d / "flower.jpg"]
    except Exception:  # noqa: BLE001
        pass
    if extra_dir is not None:
        d = Path(extra_dir)
        if d.is_dir():
            found += sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [str(p) for p in found if p.is_file()]


def _unavailable_tile(size: tuple[int, int] = (224, 224)) -> Image.Image:
    tile = Image.new("RGB", size, (225, 225, 225))
    d = ImageDraw.Draw(tile)
    d.line([(0, 0), size], fill=(180, 180, 180), width=3)
    d.line([(0, size[1]), (size[0], 0)], fill=(180, 180, 180), width=3)
    return tile


def _load_inputs(image: str | None, files: Sequence[Any] | None, max_images: int,
                 max_bytes: int, max_pixels: int) -> tuple[list[Image.Image], list[str]]:
    paths = ([image] if image else []) + [str(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        raise gr.Error("Please add an image: upload, webcam, paste, or pick an example.")
    if len(paths) > max_images:
        raise gr.Error(f"At most {max_images} images at once, got {len(paths)}.")
    imgs, names = [], []
    for p in paths:
        name = Path(p).name
        try:
            imgs.append(load_image(p, max_bytes=max_bytes, max_pixels=max_pixels))
        except ImageLoadError as e:
            raise gr.Error(f"Cannot use this file: {e}") from None
        names.append(name)
    return imgs, names


def _compare(engine: CamEngine, image, files, target, method, max_images, max_bytes, max_pixels
             ) -> tuple[list[ImageComparison], list[str], float]:
    if not engine.available:
        raise gr.Error(setup_help(engine))
    imgs, names = _load_inputs(image, files, max_images, max_bytes, max_pixels)
    tgt = None if target in (None, "", OWN_TOP1) else target
    t0 = time.perf_counter()
    try:
        comps = engine.compare(imgs, target=tgt, method=method or "gradcam")
    except CamError as e:
        raise gr.Error(str(e)) from None
    return comps, names, (time.perf_counter() - t0) * 1000


def run_compare(engine: CamEngine, image: str | None, files: Sequence[Any] | None,
                target: str | None, method: str, opacity: float, *, max_images: int = 8,
                max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
    """The ``/compare`` handler: ``(gallery [(image, caption)], top-5 rows, info markdown)``.

    Gallery: per image the input then one overlay per model, captioned ``model · class · p``
    (an unavailable model gets a grey tile captioned with the reason)."""
    try:
        comps, names, total_ms = _compare(engine, image, files, target, method, max_images,
                                          max_bytes, max_pixels)
        alpha = float(opacity if opacity is not None else 0.5)
        if not 0.0 <= alpha <= 1.0:
            raise gr.Error(f"Opacity must be between 0 and 1, got {alpha}.")
        gallery, rows = [], []
        for k, (comp, name) in enumerate(zip(comps, names)):
            shown = comp.image
            if max(shown.size) > 640:  # smaller PNGs to the browser; the CAM is resized anyway
                shown = shown.copy()
                shown.thumbnail((640, 640), Image.Resampling.BICUBIC)
            gallery.append((shown, f"Input · {name}"))
            for r in comp.results:
                if r.ok:
                    gallery.append((overlay(shown, r.cam, alpha), r.caption()))
                    rows.append([name, r.label] + [f"{c} ({p:.2f})" for c, p in r.top5]
                                + [round(r.time_ms, 1)])
                else:
                    gallery.append((_unavailable_tile(), r.caption()))
                    rows.append([name, r.label, f"unavailable: {r.error}", "", "", "", "", ""])
        times = " · ".join(f"{r.label} {r.time_ms:.0f} ms" for r in comps[0].results if r.ok)
        info = (f"**Device:** `{comps[0].device}` · **method:** {comps[0].method} · "
                f"**{len(comps)} image(s), total {total_ms:.0f} ms** (per model and image: {times})")
        return gallery, rows, info
    except gr.Error:
        raise
    except Exception as e:  # noqa: BLE001 - never take the app down; say what happened
        log.exception("compare failed")
        raise gr.Error(f"Something went wrong: {type(e).__name__}: {e}") from None


def run_export(engine: CamEngine, image, files, target, method, opacity, fmt: str, *,
               max_images: int = 8, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS
               ) -> str:
    """The ``/export`` handler: the current comparison as a Figure-5 PNG or PDF; returns its path
    (in the system temp dir, which Gradio may serve)."""
    from lgam.figure import save_figure5

    fmt = (fmt or "png").lower().lstrip(".")
    if fmt not in ("png", "pdf"):
        raise gr.Error(f"Export format must be png or pdf, got {fmt!r}.")
    try:
        comps, _, _ = _compare(engine, image, files, target, method, max_images, max_bytes,
                               max_pixels)
        out = Path(tempfile.mkdtemp(prefix="lgam_fig5_")) / f"figure5.{fmt}"
        return str(save_figure5(comps, out, alpha=float(opacity)))
    except gr.Error:
        raise
    except Exception as e:  # noqa: BLE001
        log.exception("export failed")
        raise gr.Error(f"Export failed: {type(e).__name__}: {e}") from None


def model_rows(engine: CamEngine) -> list[list[Any]]:
    """The page's model table (:data:`MODEL_HEADERS`), from the manifest: the val error shown is
    the one at the input size the model is fed."""
    rows = []
    for name in engine.names:
        met, model = engine.entry(name).get("metrics") or {}, engine.model(name)
        params = met.get("params")
        if params is None and model is not None:
            params = sum(p.numel() for p in model.parameters())
        size = engine.input_size(name)
        status = "ok" if model is not None else f"unavailable: {engine.unavailable[name]}"
        rows.append([engine.label(name), status,
                     format_or_dash(None if params is None else params / 1e6, ".3f"),
                     format_or_dash(met.get("gmacs_224"), ".2f"), size,
                     format_or_dash(met.get(f"val_top1_err_{size}"), ".2f"),
                     format_or_dash(met.get("val_top1_err_224"), ".2f")])
    return rows


def setup_help(engine: CamEngine) -> str:
    """What to tell a person when no model could be loaded: why, and how to get checkpoints."""
    return (f"No trained checkpoints could be loaded ({engine.setup_message or 'none given'}). "
            "The app needs a folder with manifest.json and the six .safetensors files: train them "
            "with `lgam train` (see `lgam train --help` and the README), or copy a released "
            "checkpoints/ folder, then start the app with `--checkpoints DIR`.")


INTRO = """# LGAM · Figure 5, live
Drop in a photo: the input and the Grad-CAM of six ImageNet-20 ResNet18 variants —
plain, SE, SGE, CBAM, BAM and LGAM — each captioned *model · class · probability*,
like Figure 5 of the LGAM paper (§3.2.2), for any image. Add more images for a grid."""


def build_app(
    engine: CamEngine,
    examples: Sequence[str] = (),
    *,
    max_images: int = 8,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    concurrency_limit: int = 4,
) -> gr.Blocks:
    """The Blocks page around ``engine``. Launch with :func:`app.launch` (theme, size limits)."""
    limits = dict(max_images=max_images, max_bytes=max_bytes, max_pixels=max_pixels)

    def compare(image, files, target, method, opacity):
        return run_compare(engine, image, files, target, method, opacity, **limits)

    def export(image, files, target, method, opacity, fmt):
        return run_export(engine, image, files, target, method, opacity, fmt, **limits)

    with gr.Blocks(title="LGAM · Figure 5, live") as demo:
        gr.Markdown(INTRO)
        if not engine.available:
            gr.Markdown(f"> ⚠️ **No models loaded.** {setup_help(engine)}",
                        elem_id="setup-message")
        elif engine.unavailable:
            gr.Markdown("> ⚠️ Unavailable: " + "; ".join(
                f"**{engine.label(n)}** ({why})" for n, why in engine.unavailable.items()))
        with gr.Row():
            with gr.Column(scale=1):
                image = raw_image(sources=["upload", "webcam", "clipboard"],
                                 label="Image", elem_id="input-image")
                files = gr.File(file_count="multiple", type="filepath", label="More images (grid)",
                                file_types=["image"], elem_id="more-images")
                target = gr.Dropdown([OWN_TOP1] + list(engine.classes), value=OWN_TOP1,
                                     label="Target class", elem_id="target")
                method = gr.Dropdown(list(METHODS), value="gradcam", label="CAM method",
                                     info="gradcam: one forward pass; scorecam is slow on a CPU")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity")
                run = gr.Button("Compare", variant="primary", elem_id="compare-button")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[image],
                                cache_examples=False, label="Examples")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Input + Grad-CAM per model", columns=7, format="png",
                                     object_fit="contain", height="auto", elem_id="gallery")
                info = gr.Markdown(elem_id="run-info")
                top5 = gr.Dataframe(headers=TOP5_HEADERS, label="Top-5 per model",
                                    interactive=False, wrap=True)
                with gr.Row():
                    fmt = gr.Radio(["png", "pdf"], value="png", label="Figure format")
                    export_btn = gr.Button("Export Figure 5")
                figure_file = gr.File(label="Figure 5", interactive=False)
        gr.Markdown(f"**Models** (from the checkpoint manifest) · device `{engine.device}`")
        gr.Dataframe(value=model_rows(engine), headers=MODEL_HEADERS, interactive=False,
                     elem_id="model-table")

        inputs = [image, files, target, method, opacity]
        run.click(compare, inputs, [gallery, top5, info], api_name="compare",
                  concurrency_limit=concurrency_limit)
        export_btn.click(export, inputs + [fmt], [figure_file], api_name="export",
                         concurrency_limit=concurrency_limit)
    return demo
