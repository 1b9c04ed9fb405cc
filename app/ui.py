"""The Gradio 6 page: input image(s) -> the input and, per model, its Grad-CAM and/or its attention
module's own gate (the paper's Figure 5, live).

Thin by design: images are read by :mod:`lgam.imageio`, every number comes from
:class:`lgam.engine.CamEngine`, tiles and the result grid from :mod:`app.render`, the exported
figure from :mod:`lgam.figure`; this module holds the page's words and layout. Two named API
endpoints, ``/compare`` (the tiles as JSON, JPEG data URLs) and ``/export`` (the figure file), each callable with just
an image: every other input has a default. The page runs the comparison when an image is
uploaded, taken, pasted or picked from the examples, and when the view changes; the Compare button
re-runs it with changed settings. It opens on the first example (an ImageNet val image of one of
the models' classes, shipped in ``app/examples/``), compared once when the page is built.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import re
import shutil
import tempfile
import threading
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import gradio as gr
from PIL import Image

from lgam._format import format_bytes, format_or_dash
from lgam.cam import METHOD_LABELS, METHODS, SLOW_METHODS, CamError
from lgam.data import IMAGE_EXTENSIONS
from lgam.engine import CamEngine, ImageComparison, PreparedImage
from lgam.figure import TILE_PIXELS
from lgam.imageio import MAX_BYTES, MAX_PIXELS, ImageLoadError, load_image

from .render import TILE_PX, VIEWS, Tile, gate_notes, tiles_data, tiles_for, tiles_html

__all__ = ["OWN_TOP1", "LOW_CONFIDENCE", "MIN_AGREEMENT", "EXAMPLES_DIR", "build_app",
           "run_compare", "run_export", "default_examples", "package_photos", "first_view",
           "raw_image", "model_rows", "setup_help", "classes_note", "confidence_warning",
           "training_status", "run_page", "page_or_cleared"]

log = logging.getLogger("lgam.app")

#: the target-class choice meaning "each model explains its own prediction"
OWN_TOP1 = "each model's own top-1"
DEFAULT_METHOD = "gradcam"
#: held by the one SLOW_METHODS request a CPU runs at a time (:func:`_slow_run`)
_SLOW_RUN = threading.Lock()
DEFAULT_OPACITY = 0.5
DEFAULT_FORMAT = "png"
DEFAULT_VIEW = "Grad-CAM"
#: the largest side an upload is kept at once the models' inputs are made from it: the page's and
#: the exported figure's tiles are no larger, so they are drawn as from the full image
SHOWN_PX = max(TILE_PX, TILE_PIXELS)
#: the gate-stage choice: label -> stage (None: the last stage where the model has gates)
STAGES = {"last stage with gates": None, "stage 1": 1, "stage 2": 2, "stage 3": 3, "stage 4": 4}
DEFAULT_STAGE = "last stage with gates"
#: the stage dropdown's note: the Grad-CAM view ignores it
STAGE_INFO = "used when Show is " + " or ".join(f"'{k}'" for k, v in VIEWS.items() if v != "cam")
TOP5_HEADERS = ["image", "model", "#1", "#2", "#3", "#4", "#5", "ms"]
MODEL_HEADERS = ["model", "status", "params (M)", "GMACs 224", "input (px)",
                 "val top-1 err at input size (%)", "val images", "val top-1 err 224 px (%)"]
#: the components' labels: they also name the endpoints' inputs and outputs in the API
#: (``Client.view_api()``)
TILES_LABEL = "Input + Grad-CAM per model (JPEG data URLs)"
TOP5_LABEL = "Top-5 per model"
INFO_LABEL = "Run info"
FIGURE_LABEL = "Figure 5 file"

#: the example images shipped with the app: six ImageNet val images of the models' classes, the
#: inputs of docs/figure5.png (downscaled to 160 px; their source and original files in ``SOURCES.md`` there)
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
#: the labels of the example groups, in the order the page shows them
IN_CLASS_EXAMPLES = "Examples: ImageNet val images of the models' classes (as in Figure 5)"
OUT_OF_CLASS_EXAMPLES = "Photos of none of the classes (expect low confidence)"
EXTRA_EXAMPLES = "More examples"
#: the first view's run info starts with this line
FIRST_VIEW_NOTE = ("Showing the first example, `{name}`, compared when the page was built: pick "
                   "another example or drop in a photo of your own.")

#: Warn below this mean top-1 probability over the models. Every model knows only its classes and
#: must spread 100% over them, so a photo of something else tends to get a flat answer, while a
#: clear in-class photo should get well above 0.5 (the shipped models were trained with label
#: smoothing 0.1, whose target for the right class is 0.9 + 0.1/20 = 0.905). A heuristic, not a
#: detector: some out-of-class photos still get a confident wrong class.
LOW_CONFIDENCE = 0.5
#: Warn when no class is the top-1 of more than this fraction of the models. Each model is wrong on
#: about one val image in five, so one dissenting model is normal on an in-class photo; no majority
#: for any class is not.
MIN_AGREEMENT = 0.5

_C = TypeVar("_C", bound=gr.components.Component)


def _user_error(message: str, markdown: str | None = None) -> gr.Error:
    """A ``gr.Error`` for the user's input: shown to the user, no traceback in the server log.
    ``message`` is plain text (the toast, an API caller's error); ``markdown`` the same for the
    page's run info, where it is Markdown (default: ``message`` with its markup escaped)."""
    error = gr.Error(message, print_exception=False)
    error.markdown = markdown_text(message) if markdown is None else markdown
    return error


def _quiet_checks(comp: _C) -> _C:
    """``comp`` with Gradio's own input checks (a value not among a dropdown's choices, a slider
    value out of range) answered to the caller without a traceback in the server log: they are the
    caller's mistake, not the server's."""
    check = comp.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return check(payload)
        except gr.Error as e:
            e.print_exception = False
            raise

    comp.preprocess = preprocess  # type: ignore[method-assign]
    return comp


def _raw_preprocess(self: gr.Image, payload: Any) -> str | None:
    """``gr.Image.preprocess`` replacement: the uploaded file's path, untouched; an image sent
    as a ``data:`` URL (an API caller's) written to a file as it is (:func:`_data_url_file`)."""
    if payload is None:
        return None
    if getattr(payload, "path", None):
        return str(payload.path)
    url = str(getattr(payload, "url", None) or "")
    if url.startswith("data:"):
        path = _data_url_file(url, self.GRADIO_CACHE, self.max_bytes)
        self.temp_files.add(path)  # Gradio's delete_cache deletes the files its components track
        return path
    raise _user_error("The request's image has neither a file nor a data: URL.")


#: uploads (and data: URL images) are deleted this old, checked as often (Gradio's delete_cache)
CACHE_SECONDS = 3600

#: the name a data: URL's image gets (messages about it name it)
DATA_URL_NAME = "image-from-data-url"


def _data_url_file(url: str, cache_dir: str, max_bytes: int) -> str:
    """The bytes of base64 ``data:`` URL ``url``, untouched, in a new file in ``cache_dir``:
    :func:`lgam.imageio.load_image` then judges them as it judges an upload. Gradio decoded them
    itself, with no limits of ours, re-encoded them as lossy WebP, and answered a bad one with no
    message. Over ``max_bytes`` it is refused before it is decoded (Gradio's upload limit does not
    apply to a request's JSON)."""
    head, comma, body = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise _user_error("The image's data: URL is not base64-encoded (data:image/png;base64,...).")
    size = len(body) // 4 * 3  # within 2 bytes of the decoded size
    if size > max_bytes + 2:
        raise _user_error(f"The image's data: URL holds {format_bytes(size)}; the limit is "
                          f"{format_bytes(max_bytes)}.")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _user_error("The image's data: URL is not valid base64.") from None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=cache_dir)) / DATA_URL_NAME
    path.write_bytes(data)
    return str(path)


def raw_image(max_bytes: int = MAX_BYTES, **kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (upload, webcam, clipboard) whose handler receives the uploaded file's path
    untouched, so that :func:`lgam.imageio.load_image` - not Gradio - decodes it and can answer
    bad files with a clear message; ``max_bytes`` limits an image sent as a ``data:`` URL. (An
    instance override rather than a subclass: Gradio writes a ``.pyi`` stub next to the module of
    every ``Component`` subclass.)"""
    comp = gr.Image(type="filepath", **kwargs)
    comp.max_bytes = max_bytes
    comp.preprocess = types.MethodType(_raw_preprocess, comp)  # type: ignore[method-assign]
    return comp


def _images_in(folder: str | Path | None) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; none when it is not a folder."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def package_photos() -> list[Path]:
    """Photos shipped inside installed packages, none of the models' classes: matplotlib's Grace
    Hopper and, when scikit-learn is installed, its china and flower photos."""
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
    return [p for p in found if p.is_file()]


def default_examples(extra_dir: str | Path | None = None) -> dict[str, list[str]]:
    """The page's examples as ``{label: image paths}``, in the order shown: the ImageNet val
    images of the models' classes shipped in :data:`EXAMPLES_DIR` (the inputs of Figure 5, their
    source in its ``SOURCES.md``), then the photos of none of the classes that installed packages
    ship (:func:`package_photos`), then every image in ``extra_dir``. Empty groups are left out."""
    groups = {IN_CLASS_EXAMPLES: _images_in(EXAMPLES_DIR), OUT_OF_CLASS_EXAMPLES: package_photos(),
              EXTRA_EXAMPLES: _images_in(extra_dir)}
    return {label: [str(p) for p in paths] for label, paths in groups.items() if paths}


def _example_groups(examples: Mapping[str, Sequence[str]] | Sequence[str]) -> dict[str, list[str]]:
    """``examples`` as :func:`default_examples` gives them; a plain list is one "Examples" group."""
    if isinstance(examples, Mapping):
        return {label: list(paths) for label, paths in examples.items() if paths}
    return {"Examples": list(examples)} if examples else {}


def _input_paths(image: str | None, files: Sequence[Any] | None, max_images: int) -> list[str]:
    """The request's files (the image, then "more images"), their number checked before any is read."""
    paths = ([image] if image else []) + [str(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        raise _user_error("Please add an image: upload, webcam, paste, or pick an example.")
    if len(paths) > max_images:
        raise _user_error(f"At most {max_images} images at once, got {len(paths)}.")
    return paths


def _load_inputs(engine: CamEngine, paths: Sequence[str], max_bytes: int, max_pixels: int
                 ) -> tuple[list[PreparedImage], list[str]]:
    """Each file read, checked and prepared for the models (:meth:`CamEngine.prepare`) before the
    next is read: a request holds one full-size decode at a time, not up to ``max_images``."""
    imgs, names = [], []
    for p in paths:
        name = Path(p).name
        if not Path(p).is_file():  # every path the page sends is Gradio's: an upload it deleted
            raise _user_error(f"{name} is no longer on the server (uploads are deleted after "
                              f"{CACHE_SECONDS // 60} minutes): add it again.")
        try:
            full = load_image(p, max_bytes=max_bytes, max_pixels=max_pixels)
        except ImageLoadError as e:
            raise _user_error(f"Cannot use this file: {e}") from None
        imgs.append(engine.prepare(full, display_px=SHOWN_PX))
        del full
        names.append(name)
    return imgs, names


@contextlib.contextmanager
def _slow_run(method: str, n_images: int) -> Iterator[None]:
    """One :data:`SLOW_METHODS` request at a time on a CPU, of one image: each takes minutes (on
    private copies of the models, so Grad-CAM requests go on beside it); another is answered at
    once, before any file is read, rather than queued for minutes."""
    if n_images > 1:
        raise _user_error(f"{method} runs one forward pass per channel of the last feature map, for "
                          f"each image and model: one image at a time on a CPU, got {n_images}.")
    if not _SLOW_RUN.acquire(blocking=False):
        raise _user_error(f"{method} is already running for another request (it takes minutes on a "
                          "CPU): try again in a few minutes, or choose another CAM method.")
    try:
        yield
    finally:
        _SLOW_RUN.release()


def _quiet_progress() -> None:
    """No tqdm bars from pytorch-grad-cam's ScoreCAM in the server's log: it draws one per image
    and model (six a request, hundreds of lines), which buries the log's real messages. Its
    module's ``tqdm`` is swapped once for one whose bars are disabled (set when the first
    ScoreCAM request comes, so the app's start does not import pytorch-grad-cam)."""
    import pytorch_grad_cam.score_cam as score_cam
    import tqdm

    if not isinstance(score_cam.tqdm, types.SimpleNamespace):
        score_cam.tqdm = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))


def _compare(engine: CamEngine, image, files, target, method, max_images, max_bytes, max_pixels,
             view: str = "cam", stage: int | None = None
             ) -> tuple[list[ImageComparison], list[str], float]:
    if not engine.available:
        raise _user_error(setup_help(engine), markdown=setup_help(engine))  # its `code` is Markdown
    method = method or DEFAULT_METHOD
    paths = _input_paths(image, files, max_images)
    if method in SLOW_METHODS:
        _quiet_progress()
    slow = method in SLOW_METHODS and engine.device.type == "cpu"
    with _slow_run(method, len(paths)) if slow else contextlib.nullcontext():
        imgs, names = _load_inputs(engine, paths, max_bytes, max_pixels)
        tgt = None if target in (None, "", OWN_TOP1) else target
        t0 = time.perf_counter()
        try:
            comps = engine.compare(imgs, target=tgt, method=method, gates=view != "cam", stage=stage)
        except CamError as e:
            raise _user_error(str(e)) from None
    return comps, names, (time.perf_counter() - t0) * 1000


def _opacity(opacity: float | None) -> float:
    alpha = float(DEFAULT_OPACITY if opacity is None else opacity)
    if not 0.0 <= alpha <= 1.0:
        raise _user_error(f"Opacity must be between 0 and 1, got {alpha}.")
    return alpha


def confidence_warning(comp: ImageComparison, n_classes: int) -> str | None:
    """Why the models' answers on one image deserve no trust, or ``None``: their mean top-1
    probability is below :data:`LOW_CONFIDENCE`, or no class is the top-1 of more than
    :data:`MIN_AGREEMENT` of them. Only the models that gave an answer count."""
    tops = [r.top5[0] for r in comp.results if r.ok and r.top5]
    if not tops:
        return None
    reasons = []
    mean_p = sum(p for _, p in tops) / len(tops)
    if mean_p < LOW_CONFIDENCE:
        reasons.append(f"mean top-1 probability {mean_p:.2f} < {LOW_CONFIDENCE}")
    votes = Counter(c for c, _ in tops)
    if len(tops) > 1 and votes.most_common(1)[0][1] <= MIN_AGREEMENT * len(tops):
        reasons.append(f"the models disagree ({len(votes)} different top-1 classes "
                       f"among {len(tops)} models)")
    if not reasons:
        return None
    return (f"⚠ low confidence: {' and '.join(reasons)}; this photo may show none of the "
            f"{n_classes} classes")


#: what makes markup in the middle of a line (links, emphasis, code, HTML, tables, strikethrough)
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]<>|~])")
#: where GFM (Gradio's Markdown) starts a link by itself, even mid-word: www., an e-mail's @, a
#: scheme's colon; one escaped character is enough to stop it
_AUTOLINKS = re.compile(r"(?i)(?<=www)\.|@|:(?=//)")


def markdown_text(text: str) -> str:
    """``text`` (a file name, a message naming one), mid-line, shown as it is in Markdown: a
    name such as ``[x](y).png`` was rendered as a link, ``*a*.jpg`` in italics, and
    ``www.example.com.jpg`` as a link to it."""
    return _AUTOLINKS.sub(r"\\\g<0>", _MARKDOWN_SPECIALS.sub(r"\\\1", text))


def _info(comps: list[ImageComparison], names: list[str], total_ms: float, n_classes: int) -> str:
    """The run-info Markdown: a warning per doubtful image, then device, method and times."""
    lines = []
    for comp, name in zip(comps, names):
        warning = confidence_warning(comp, n_classes)
        if warning:
            lines.append(f"{warning} ({markdown_text(name)})" if len(comps) > 1 else warning)
    times = " · ".join(f"{r.label} {r.time_ms:.0f} ms" for r in comps[0].results if r.ok)
    lines.append(f"**Device:** `{comps[0].device}` · **method:** {METHOD_LABELS[comps[0].method]} · "
                 f"**{len(comps)} image(s), total {total_ms:.0f} ms** (per model and image: {times})")
    return "\n\n".join(lines)


def _view(view: str | None) -> str:
    if view in (None, ""):
        return "cam"
    if view not in VIEWS:
        raise _user_error(f"View must be one of {', '.join(VIEWS)}, got {view!r}.")
    return VIEWS[view]


def _stage(stage: str | None) -> int | None:
    if stage in (None, ""):
        return None
    if stage not in STAGES:
        raise _user_error(f"Gate stage must be one of {', '.join(STAGES)}, got {stage!r}.")
    return STAGES[stage]


def _results(engine: CamEngine, image, more_images, target, method, opacity, view, stage,
             limits: dict[str, int]) -> tuple[list[list[Tile]], list[str], list[list[Any]], str]:
    """``(rows of tiles, row titles, top-5 rows, info markdown)`` for one request."""
    alpha, v, st = _opacity(opacity), _view(view), _stage(stage)
    comps, names, total_ms = _compare(engine, image, more_images, target, method,
                                      limits["max_images"], limits["max_bytes"],
                                      limits["max_pixels"], v, st)
    rows, titles, top5 = [], [], []
    for comp, name in zip(comps, names):
        for k, row in enumerate(tiles_for(comp, name, alpha, v)):
            rows.append(row)
            titles.append(name if k == 0 and len(comps) > 1 else "")
        for r in comp.results:
            top5.append([name, r.label] + [f"{c} ({p:.2f})" for c, p in r.top5]
                        + [round(r.time_ms, 1)] if r.ok else
                        [name, r.label, r.problem, "", "", "", "", ""])
    info = _info(comps, names, total_ms, len(engine.classes))
    if v != "cam":
        info += "\n\n" + gate_notes(comps[0])
    return rows, titles, top5, info


def _guarded(what: str, fn, *args, failure: str = "Something went wrong"):
    """Call ``fn``; a user error goes to the user as it is, anything else is logged once and
    reported as ``failure: <error>`` without taking the app down."""
    try:
        return fn(*args)
    except gr.Error:
        raise
    except Exception as e:  # noqa: BLE001 - never take the app down; say what happened
        log.exception("%s failed", what)
        raise _user_error(f"{failure}: {type(e).__name__}: {e}") from None


def run_compare(engine: CamEngine, image: str | None, more_images: Sequence[Any] | None = None,
                target: str | None = OWN_TOP1, method: str = DEFAULT_METHOD,
                opacity: float = DEFAULT_OPACITY, view: str = DEFAULT_VIEW,
                stage: str = DEFAULT_STAGE, *, max_images: int = 8, max_bytes: int = MAX_BYTES,
                max_pixels: int = MAX_PIXELS) -> tuple[dict[str, list[dict[str, object]]], list[list[Any]], str]:
    """The ``/compare`` API handler: ``(tiles, top-5 rows, info markdown)``, the tiles as
    :func:`app.render.tiles_data` (JPEG data URLs). Per image the input, then one tile per model:
    its Grad-CAM captioned ``class · p`` and/or its attention gate (``view``); an unavailable model
    gets a grey tile with the reason. The info starts with a warning for each image the models are unsure about
    (:func:`confidence_warning`)."""
    limits = dict(max_images=max_images, max_bytes=max_bytes, max_pixels=max_pixels)

    def answer() -> tuple[dict[str, list[dict[str, object]]], list[list[Any]], str]:
        rows, _, top5, info = _results(engine, image, more_images, target, method, opacity, view,
                                       stage, limits)
        return tiles_data(rows), top5, info

    return _guarded("compare", answer)


def run_page(engine: CamEngine, image: str | None, more_images: Sequence[Any] | None = None,
             target: str | None = OWN_TOP1, method: str = DEFAULT_METHOD,
             opacity: float = DEFAULT_OPACITY, view: str = DEFAULT_VIEW,
             stage: str = DEFAULT_STAGE, *, max_images: int = 8, max_bytes: int = MAX_BYTES,
             max_pixels: int = MAX_PIXELS) -> tuple[str, list[list[Any]], str]:
    """The page's handler: like :func:`run_compare`, with the tiles as one HTML grid
    (:func:`app.render.tiles_html`) instead of JSON."""
    limits = dict(max_images=max_images, max_bytes=max_bytes, max_pixels=max_pixels)

    def answer() -> tuple[str, list[list[Any]], str]:
        rows, titles, top5, info = _results(engine, image, more_images, target, method, opacity,
                                            view, stage, limits)
        return tiles_html(rows, titles, _view(view)), top5, info

    return _guarded("compare", answer)


def page_or_cleared(engine: CamEngine, image: str | None, more_images: Sequence[Any] | None,
                    *settings: Any, **limits: int) -> tuple[str, list[list[Any]], str]:
    """The page's event handler: :func:`run_page`'s results; on an error the results are cleared
    and the message takes their place (shown as a toast too), so that a new image that fails is
    never shown beside the previous image's heatmaps. No image at all clears the results."""
    if not image and not more_images:
        return "", [], ""
    try:
        return run_page(engine, image, more_images, *settings, **limits)
    except gr.Error as e:
        gr.Warning(e.message)
        return "", [], f"⚠ {getattr(e, 'markdown', None) or markdown_text(e.message)}"


def first_view(engine: CamEngine, image: str | None, *, max_images: int = 8,
               max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS
               ) -> tuple[str, list[list[Any]], str] | None:
    """What the page shows before anyone uploads: ``image`` (the first example) compared with
    the default settings, as :func:`run_page` gives it - computed once, when the page is built,
    so that every visitor sees a finished Figure 5 at once. ``None`` (an empty page) without an
    image or models, or when that comparison fails (logged: the page still starts)."""
    if not image or not engine.available:
        return None
    try:
        grid, top5, info = run_page(engine, image, max_images=max_images, max_bytes=max_bytes,
                                    max_pixels=max_pixels)
    except gr.Error as e:
        log.warning("no first view: %s: %s", Path(image).name, e.message)
        return None
    return grid, top5, f"{FIRST_VIEW_NOTE.format(name=Path(image).name)}\n\n{info}"


def run_export(engine: CamEngine, image: str | None, more_images: Sequence[Any] | None = None,
               target: str | None = OWN_TOP1, method: str = DEFAULT_METHOD,
               opacity: float = DEFAULT_OPACITY, fmt: str = DEFAULT_FORMAT,
               view: str = DEFAULT_VIEW, stage: str = DEFAULT_STAGE, *,
               max_images: int = 8, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS
               ) -> str:
    """The ``/export`` handler: the current comparison as a Figure-5 PNG or PDF; returns its path
    (in the system temp dir, which Gradio may serve)."""
    from lgam.figure import save_figure5

    fmt = (fmt or DEFAULT_FORMAT).lower().lstrip(".")
    if fmt not in ("png", "pdf"):
        raise _user_error(f"Export format must be png or pdf, got {fmt!r}.")

    def figure() -> str:
        alpha, v = _opacity(opacity), _view(view)
        comps, _, _ = _compare(engine, image, more_images, target, method, max_images, max_bytes,
                               max_pixels, v, _stage(stage))
        out = Path(tempfile.mkdtemp(prefix="lgam_fig5_", dir=_export_root())) / f"figure5.{fmt}"
        return str(save_figure5(comps, out, alpha=alpha, view=v))

    return _guarded("export", figure, failure="Export failed")


#: an export's folder is removed this long after it was made (Gradio has served its own copy)
EXPORT_KEEP_S = 600


def _export_root() -> Path:
    """The exports' parent folder in the system temp dir, its folders older than
    :data:`EXPORT_KEEP_S` removed (a long-running Space would otherwise fill its disk)."""
    root = Path(tempfile.gettempdir()) / "lgam_exports"
    root.mkdir(exist_ok=True)
    now = time.time()
    for old in root.glob("lgam_fig5_*"):
        try:
            if now - old.stat().st_mtime > EXPORT_KEEP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another request removed it first
            pass
    return root


def training_status(engine: CamEngine, name: str) -> str:
    """``"trained 20 epochs"`` from the model's manifest entry (``"trained (epochs not recorded)"``
    without ``epochs``), or ``"unavailable: <reason>"``."""
    if engine.model(name) is None:
        return f"unavailable: {engine.unavailable[name]}"
    epochs = engine.entry(name).get("epochs")
    if epochs is None:
        return "trained (epochs not recorded)"
    return f"trained {epochs} epoch{'' if epochs == 1 else 's'}"


def model_rows(engine: CamEngine) -> list[list[Any]]:
    """The page's model table (:data:`MODEL_HEADERS`), from the manifest: each model's training
    status (:func:`training_status`), and the val error at the input size the model is fed, with
    the number of val images it was measured on."""
    rows = []
    for name in engine.names:
        met, model = engine.entry(name).get("metrics") or {}, engine.model(name)
        params = met.get("params")
        if params is None and model is not None:
            params = sum(p.numel() for p in model.parameters())
        size = engine.input_size(name)
        rows.append([engine.label(name), training_status(engine, name),
                     format_or_dash(None if params is None else params / 1e6, ".3f"),
                     format_or_dash(met.get("gmacs_224"), ".2f"), size,
                     format_or_dash(met.get(f"val_top1_err_{size}"), ".2f"),
                     format_or_dash(met.get("val_images"), ","),
                     format_or_dash(met.get("val_top1_err_224"), ".2f")])
    return rows


def classes_note(classes: Sequence[str]) -> str:
    """The page's line on what the models know: their classes, and that anything else still gets
    one of them."""
    return (f"**The models know {len(classes)} classes:** {', '.join(classes)}. A photo of "
            "anything else still gets one of these; the run info warns when the models are unsure.")


def setup_help(engine: CamEngine) -> str:
    """What to tell a person when no model could be loaded: why, and how to get checkpoints."""
    return (f"No trained checkpoints could be loaded ({engine.setup_message or 'none given'}). "
            "The app needs a folder with manifest.json and the six .safetensors files: train them "
            "with `lgam train` (see `lgam train --help` and docs/training.md), or copy a released "
            "checkpoints/ folder, then start the app with `--checkpoints DIR`.")


def _notices(engine: CamEngine) -> None:
    """The page's head: what it is, the models' classes, and any model that did not load."""
    gr.Markdown(INTRO)
    if engine.classes:
        gr.Markdown(classes_note(engine.classes), elem_id="classes")
    if not engine.available:
        gr.Markdown(f"> ⚠️ **No models loaded.** {setup_help(engine)}", elem_id="setup-message")
    elif engine.unavailable:
        gr.Markdown("> ⚠️ Unavailable: " + "; ".join(
            f"**{engine.label(n)}** ({why})" for n, why in engine.unavailable.items()))


def view_choices(method: str) -> list[tuple[str, str]]:
    """The Show radio's ``(label, value)`` choices for CAM ``method``: the heatmap view is labelled
    with the method it draws; its value stays ``"Grad-CAM"``, the API's."""
    name = METHOD_LABELS.get(method, METHOD_LABELS[DEFAULT_METHOD])
    return [(name if mode == "cam" else label, label) for label, mode in VIEWS.items()]


def _controls(engine: CamEngine, groups: Mapping[str, Sequence[str]],
              first: str | None, max_bytes: int, max_images: int) -> types.SimpleNamespace:
    """The left column: the image (opening on ``first``), Compare, the view, the examples and
    the settings."""
    image = raw_image(max_bytes, value=first, sources=["upload", "webcam", "clipboard"], label="Image",
                      elem_id="input-image")
    run = gr.Button("Compare", variant="primary", elem_id="compare-button")
    view = _quiet_checks(gr.Radio(
        view_choices(DEFAULT_METHOD), value=DEFAULT_VIEW, label="Show", elem_id="view",
        info="the CAM method (Settings): where each model's evidence is; attention gates: where "
             "each module itself attends"))
    for label, paths in groups.items():  # a click fills `image`: its change runs
        gr.Examples(examples=[[p] for p in paths], inputs=[image], cache_examples=False,
                    label=label)
    with gr.Accordion("Settings", open=False):
        target = _quiet_checks(gr.Dropdown(
            [OWN_TOP1] + list(engine.classes), value=OWN_TOP1, label="Target class",
            elem_id="target"))
        method = _quiet_checks(gr.Dropdown(
            [(METHOD_LABELS[m], m) for m in METHODS], value=DEFAULT_METHOD, label="CAM method",
            info="Grad-CAM: one forward pass; Score-CAM is slow on a CPU; EigenCAM's map is the same "
                 "for every class"))
        stage = _quiet_checks(gr.Dropdown(list(STAGES), value=DEFAULT_STAGE, label="Gate stage",
                                          info=STAGE_INFO))
        opacity = _quiet_checks(gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05,
                                          label="Heatmap opacity"))
        # no file_types: Gradio's filter goes by extension (an extensionless IMG_0001 or an .mpo
        # was refused, with a traceback); lgam.imageio reads the bytes and names what it refuses
        # Gradio's File has no count limit: the label says it, the run refuses past it
        files = gr.File(file_count="multiple", type="filepath", elem_id="more-images",
                        label=f"More images (one row each; at most {max_images} images in all)")
    return types.SimpleNamespace(image=image, run=run, view=view, target=target, method=method,
                                 stage=stage, opacity=opacity, files=files)


def _outputs(grid: str, top5: Any, info: str, max_bytes: int) -> types.SimpleNamespace:
    """The right column, opening on the first example's results, and the API's hidden parts."""
    grid_html = gr.HTML(grid, elem_id="results")
    info_md = gr.Markdown(info, label=INFO_LABEL, elem_id="run-info")
    with gr.Accordion("Top-5 per model", open=False):
        top5_df = gr.Dataframe(top5, headers=TOP5_HEADERS, label=TOP5_LABEL, interactive=False,
                               wrap=True)
    with gr.Row():
        fmt = _quiet_checks(gr.Radio(["png", "pdf"], value=DEFAULT_FORMAT, label="Figure format"))
        export_btn = gr.Button("Export Figure 5")
    figure_file = gr.File(label=FIGURE_LABEL, interactive=False)
    # the API's /compare answers with the tiles as JSON; the page shows the HTML grid
    tiles = gr.JSON(label=TILES_LABEL, visible=False)
    # the API's own image, without the page's first example: a component's initial value would
    # become the endpoints' default image
    api_image = raw_image(max_bytes, label="Image", visible=False)
    api_run, api_export = gr.Button(visible=False), gr.Button(visible=False)
    return types.SimpleNamespace(grid=grid_html, info=info_md, top5=top5_df, fmt=fmt,
                                 export_btn=export_btn, figure_file=figure_file, tiles=tiles,
                                 api_image=api_image, api_run=api_run, api_export=api_export)


def _wire(c: types.SimpleNamespace, out: types.SimpleNamespace, compare, page, export,
          concurrency_limit: int) -> None:
    """The page's events and the two API endpoints, all in one concurrency group: the page's
    runs, the API and the export share the limit."""
    inputs = [c.image, c.files, c.target, c.method, c.opacity, c.view, c.stage]
    api_inputs = [out.api_image, *inputs[1:]]
    queue = dict(concurrency_limit=concurrency_limit, concurrency_id="cam")
    out.api_run.click(compare, api_inputs, [out.tiles, out.top5, out.info], api_name="compare",
                      **queue,
                      api_description="Input + Grad-CAM (or attention gate) of each model as "
                                      "JPEG data URLs with their captions, the top-5 table and "
                                      "the run info for an image (plus more images for a grid)")
    c.method.change(lambda method: gr.Radio(choices=view_choices(method)), c.method, c.view,
                    api_visibility="private", queue=False, show_progress="hidden")
    for trigger in (c.run.click, c.image.change, c.files.change, c.view.change):
        trigger(page, inputs, [out.grid, out.top5, out.info], api_visibility="private", **queue)
    out.export_btn.click(export, inputs + [out.fmt], [out.figure_file], api_name="page_export",
                         api_visibility="private", **queue)
    out.api_export.click(export, api_inputs + [out.fmt], [out.figure_file], api_name="export",
                         **queue, api_description="The comparison as a Figure-5 PNG or PDF file")


INTRO = """# LGAM · Figure 5, live
Drop in a photo: the input and the Grad-CAM of six ImageNet-20 ResNet18 variants —
plain, SE, SGE, CBAM, BAM and LGAM — each captioned with the class it explains and its
probability, like Figure 5 of the LGAM paper (§3.2.2), for any image. Switch **Show** to see where
each attention module itself attends (its own spatial gate), or both. Add more images for a grid."""


def build_app(
    engine: CamEngine,
    examples: Mapping[str, Sequence[str]] | Sequence[str] = (),
    *,
    max_images: int = 8,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    concurrency_limit: int = 4,
) -> gr.Blocks:
    """The Blocks page around ``engine``. Launch with :func:`app.launch` (theme, size limits).

    ``examples``: ``{label: image paths}`` as :func:`default_examples` gives them (a plain list
    is one group), shown in that order. The page opens on the first one, already compared
    (:func:`first_view`)."""
    limits = dict(max_images=max_images, max_bytes=max_bytes, max_pixels=max_pixels)
    groups = _example_groups(examples)
    first = next(iter(groups.values()), [None])[0]
    shown = first_view(engine, first, **limits)
    first_grid, first_top5, first_info = shown or ("", None, "")

    # the API's parameter names and defaults are these functions' (image is the one required)
    def compare(image, more_images=None, target=OWN_TOP1, method=DEFAULT_METHOD,
                opacity=DEFAULT_OPACITY, view=DEFAULT_VIEW, stage=DEFAULT_STAGE):
        return run_compare(engine, image, more_images, target, method, opacity, view, stage,
                           **limits)

    def export(image, more_images=None, target=OWN_TOP1, method=DEFAULT_METHOD,
               opacity=DEFAULT_OPACITY, view=DEFAULT_VIEW, stage=DEFAULT_STAGE,
               figure_format=DEFAULT_FORMAT):
        return run_export(engine, image, more_images, target, method, opacity, figure_format,
                          view, stage, **limits)

    def page(image, more_images, target, method, opacity, view, stage):
        """The page's run (on a new, taken, pasted, picked image, or Compare)."""
        return page_or_cleared(engine, image, more_images, target, method, opacity, view, stage,
                               **limits)

    # uploads and served outputs are deleted once CACHE_SECONDS old (Gradio keeps them forever)
    with gr.Blocks(title="LGAM · Figure 5, live", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        _notices(engine)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                c = _controls(engine, groups, first if shown else None, max_bytes, max_images)
            with gr.Column(scale=3):
                out = _outputs(first_grid, first_top5, first_info, max_bytes)
        gr.Markdown(f"**Models** (from the checkpoint manifest: training status, val error) · "
                    f"device `{engine.device}`")
        gr.Dataframe(value=model_rows(engine), headers=MODEL_HEADERS, interactive=False,
                     elem_id="model-table")
        _wire(c, out, compare, page, export, concurrency_limit)
    return demo
