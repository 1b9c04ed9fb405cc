"""Several classifiers side by side on the same images: the engine the app and ``lgam figure5``
share (the app holds no model math; this module holds no app text).

:class:`CamEngine` holds the loaded models (or, per model, the reason it is unavailable), the
device and one lock per model (a :data:`lgam.cam.SLOW_METHODS` CAM runs on a private copy instead,
so that it holds no other request up). :meth:`CamEngine.compare` preprocesses the images once per
input size, runs every model and returns, per image and model, the class probabilities, the top-5,
the CAM (:mod:`lgam.cam`) for the target (each model's own top-1, or one class for all) and the
time it took. One model failing leaves the others' results intact.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .attention import GateRecorder, capture_gates, stage_gate
from .cam import (SLOW_METHODS, CamError, check_method, fast_gradcam, inference_copy, library_cam,
                  supports_fast_path)
from .data import IMAGENET_MEAN, IMAGENET_STD
from .device import bf16_native, resolve_device
from .imageio import ImageSource, load_image
from .models import FIGURE5_MODELS

__all__ = ["CamEngine", "ModelResult", "ImageComparison", "PreparedImage", "PRECISIONS"]

#: the engine's precision choices (see :class:`CamEngine`)
PRECISIONS = ("auto", "bf16", "float32")


# --------------------------------------------------------------------------------------------
# results


def _is_one_image(source: object) -> bool:
    """Whether ``source`` is one image (a PIL image, a :class:`PreparedImage`, a path, bytes, an
    open file), not a list."""
    return (isinstance(source, (Image.Image, PreparedImage, str, os.PathLike, bytes, bytearray))
            or hasattr(source, "read"))


def _as_image(source: ImageSource) -> Image.Image:
    """A PIL image as given; a path or bytes loaded; anything else a :class:`CamError`."""
    if isinstance(source, Image.Image):
        return source
    if _is_one_image(source):
        return load_image(source)
    raise CamError(f"images must be PIL images or image files (paths, bytes, open files), got "
                   f"{type(source).__name__}: for a tensor, call fast_gradcam / library_cam")


@dataclass
class PreparedImage:
    """An image made ready for :meth:`CamEngine.compare` by :meth:`CamEngine.prepare`, so that the
    full-size decode need not be kept: ``inputs`` maps each ``(size, mean, std)`` the engine's
    models use to the image's model input, ``(1, 3, size, size)`` float32 on the CPU, made from the
    full image exactly as ``compare`` makes it; ``image`` is the picture the results carry (RGB; a
    copy at most ``display_px`` a side when :meth:`CamEngine.prepare` was given one)."""

    image: Image.Image
    inputs: dict[tuple, Tensor]
    #: input key -> why that input could not be made (its models fail in ``compare``, with this)
    failed: dict[tuple, str] = field(default_factory=dict)


@dataclass
class ModelResult:
    """One model on one image. ``error`` is set (and the rest is empty) when the model is
    unavailable (it did not load) or ``failed`` (it raised while running on this request, e.g.
    out of memory: the next request tries it again).

    probs: ``(K,)`` float32 class probabilities; top5: ``[(class name, p)]``; target: the class
    the CAM explains; score: ``probs[target]``; cam: ``(S, S)`` float32 in [0, 1] at the model's
    input size ``S`` (the whole image resized to a square: resize it back with :func:`overlay`);
    time_ms: this model's wall time for the call divided by the number of images.

    With ``gates=True`` in :meth:`CamEngine.compare`: gate: ``(S, S)`` float32, the spatial gate
    its attention module computed in the same forward pass (values as the module used them, in
    [0, 1], not rescaled); gate_source: that module's name (``"layer4.1.attention"``);
    gate_formula: what the gate is; gate_note: why there is no gate (SE's gates are per channel,
    the plain network has none).
    """

    name: str
    label: str
    error: str | None = None
    probs: np.ndarray | None = None
    top5: list[tuple[str, float]] = field(default_factory=list)
    target: int | None = None
    target_class: str | None = None
    score: float | None = None
    cam: np.ndarray | None = None
    time_ms: float = 0.0
    gate: np.ndarray | None = None
    gate_source: str | None = None
    gate_formula: str | None = None
    gate_note: str | None = None
    failed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def problem(self) -> str | None:
        """``"unavailable: reason"``, ``"failed on this request: error"``, or ``None`` when ok."""
        if self.ok:
            return None
        return f"{'failed on this request' if self.failed else 'unavailable'}: {self.error}"

    def caption(self) -> str:
        """``"LGAM · tench · 0.93"`` (or ``"LGAM · unavailable: reason"``, :attr:`problem`)."""
        if not self.ok:
            return f"{self.label} · {self.problem}"
        return f"{self.label} · {self.target_class} · {self.score:.2f}"


@dataclass
class ImageComparison:
    """All models on one image: ``image`` (RGB, as given; a :class:`PreparedImage`'s own, small
    copy) and ``results`` in model order."""

    image: Image.Image
    results: list[ModelResult]
    method: str
    device: str

    def __getitem__(self, name: str) -> ModelResult:
        for r in self.results:
            if r.name == name or r.label == name:
                return r
        raise KeyError(name)


@dataclass
class _Slot:
    name: str
    label: str
    model: nn.Module | None
    error: str | None
    entry: dict[str, Any]
    fast: nn.Module | None = None  # folded/channels_last copy for the no-backward path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pre_key(self) -> tuple:
        e = self.entry
        return (int(e.get("input_size", 224)), tuple(e.get("mean", IMAGENET_MEAN)),
                tuple(e.get("std", IMAGENET_STD)))


# --------------------------------------------------------------------------------------------
# the engine


class CamEngine:
    """Several classifiers side by side: ``compare(images, target, method)``.

    ``models`` maps name -> ``nn.Module`` (available) or ``str`` (the reason it is unavailable).
    ``entries`` (optional, name -> manifest entry) give each model's ``input_size``, ``mean``,
    ``std`` and ``metrics``; ``classes`` are the class names, shared by all models.
    ``precision``: ``"bf16"`` runs the Grad-CAM fast path under bf16 autocast on channels_last
    copies of the models (:func:`inference_copy`; CAMs within ~0.02 of float32, see the tests),
    ``"float32"`` exactly as ``lgam evaluate`` computes, ``"auto"`` (default) bf16 where it is
    native (a GPU of compute capability 8.0 or newer, a CPU with AVX512-BF16/AMX:
    :func:`lgam.device.bf16_native`), else float32.
    The pytorch-grad-cam methods always run in float32 on the models themselves.
    ``fast_copies`` (default: on for bf16 and for CUDA) runs the float32 fast path on the
    channels_last copies too. The engine works on frozen float32 eval-mode copies of ``models``:
    the caller's modules are left as they were (a training model stays trainable).
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module | str],
        classes: Sequence[str],
        *,
        device: str | torch.device | None = None,
        labels: Mapping[str, str] | None = None,
        entries: Mapping[str, dict[str, Any]] | None = None,
        setup_message: str | None = None,
        fast_copies: bool | None = None,
        precision: str = "auto",
    ) -> None:
        try:
            self.device = resolve_device(device)
        except ValueError as e:
            raise CamError(str(e)) from e
        if precision not in PRECISIONS:
            raise CamError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "auto":
            precision = "bf16" if bf16_native(self.device) else "float32"
        self.precision = precision
        self.classes = list(classes)
        self.setup_message = setup_message
        if fast_copies is None:
            fast_copies = self.device.type == "cuda" or precision == "bf16"
        labels = dict(FIGURE5_MODELS, **(labels or {}))
        self._slots: list[_Slot] = []
        for name, m in models.items():
            entry = dict((entries or {}).get(name) or {})
            label = labels.get(name, name)
            if isinstance(m, nn.Module):
                m = inference_copy(m, channels_last=False).float().to(self.device)
                out = getattr(getattr(m, "fc", None), "out_features", len(self.classes))
                if getattr(m, "num_classes", None) == 0:
                    self._slots.append(_Slot(name, label, None, "it has no classifier (num_classes=0)",
                                             entry))
                    continue
                if out != len(self.classes):
                    self._slots.append(_Slot(name, label, None, (
                        f"it predicts {out} classes, the others {len(self.classes)}"), entry))
                    continue
                fast = inference_copy(m) if fast_copies and supports_fast_path(m) else None
                self._slots.append(_Slot(name, label, m, None, entry, fast))
            else:
                self._slots.append(_Slot(name, label, None, str(m), entry))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(
        cls,
        directory: str | Path,
        names: Sequence[str] | Mapping[str, str] = FIGURE5_MODELS,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
    ) -> "CamEngine":
        """Load ``names`` (or name -> label) from ``directory``'s manifest with
        :func:`lgam.checkpoints.load_models`: a missing or broken model is unavailable, with the
        reason, and the others load. When none loads, :attr:`setup_message` says why."""
        from .checkpoints import load_models

        labels = dict(names) if isinstance(names, Mapping) else {}
        found = load_models(directory, list(names))
        return cls(found.models, found.classes, device=device, labels=labels,
                   entries=found.entries, setup_message=found.problem, precision=precision)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots]

    @property
    def available(self) -> list[str]:
        return [s.name for s in self._slots if s.model is not None]

    @property
    def unavailable(self) -> dict[str, str]:
        """name -> reason."""
        return {s.name: s.error for s in self._slots if s.model is None}

    def label(self, name: str) -> str:
        return self._slot(name).label

    def model(self, name: str) -> nn.Module | None:
        return self._slot(name).model

    def entry(self, name: str) -> dict[str, Any]:
        """The model's manifest entry (``input_size``, ``metrics``, ...; empty when none)."""
        return self._slot(name).entry

    def input_size(self, name: str) -> int:
        """The square size the model is fed (the manifest's ``input_size``, default 224)."""
        return self._slot(name).pre_key()[0]

    def _slot(self, name: str) -> _Slot:
        for s in self._slots:
            if s.name == name or s.label == name:
                return s
        raise CamError(f"unknown model {name!r}; the engine has {self.names}")

    # -- work ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One small comparison so that the first real request does not pay for the backend's
        one-time initialisation (oneDNN/cuDNN kernels, thread pools)."""
        if self.available:
            self.compare(Image.new("RGB", (32, 32), (128, 128, 128)))

    def resolve_target(self, target: int | str | None) -> int | None:
        """``None`` (own top-1), a class index or a class name -> index; :class:`CamError` when
        out of range or unknown (pytorch-grad-cam would silently swallow the IndexError)."""
        if target is None or (isinstance(target, str) and target.strip() == ""):
            return None
        if isinstance(target, str):
            if target in self.classes:
                return self.classes.index(target)
            if target.strip().lstrip("-").isdigit():
                target = int(target)
            else:
                raise CamError(f"unknown class {target!r}")
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise CamError(f"target must be a class index or name, got {target!r}")
        if not 0 <= int(target) < len(self.classes):
            raise CamError(f"class index {target} is out of range 0..{len(self.classes) - 1}")
        return int(target)

    def preprocess(self, images: Sequence[Image.Image], size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Tensor:
        """RGB images -> ``(B, 3, size, size)`` float32 on the engine's device
        (:func:`lgam.data.preprocess`: the same path as evaluation)."""
        from .data import preprocess

        return preprocess(list(images), size, mean, std).to(self.device, non_blocking=True)

    def prepare(self, source: ImageSource | Image.Image, display_px: int | None = None) -> PreparedImage:
        """``source`` (a PIL image, or an image file as :meth:`compare` takes it) -> a
        :class:`PreparedImage`: its model inputs, one per input size the available models use
        (:func:`lgam.data.preprocess` on the full image: ``compare`` gives the same numbers for the
        prepared image as for the image), and the image, shrunk to at most ``display_px`` a side
        (``Image.thumbnail``, bicubic) when given. A caller reading many large images prepares each
        as it is read and keeps only the small copies (eight 50-MP uploads held at once: ~1.2 GB).
        An input that cannot be made (a bad ``mean`` in an entry, out of memory) is left out, with
        why: the models that need it fail in ``compare``, the others run. A :class:`PreparedImage`
        is returned as it is (its image may be the small copy: never prepared again from that)."""
        from .data import preprocess

        if display_px is not None and display_px < 1:
            raise CamError(f"display_px must be at least 1, got {display_px!r}")
        if isinstance(source, PreparedImage):
            return self._prepared_already(source)
        img = _as_image(source)
        img = img if img.mode == "RGB" else img.convert("RGB")
        inputs: dict[tuple, Tensor] = {}
        failed: dict[tuple, str] = {}
        for key in self._input_keys():
            try:
                inputs[key] = preprocess([img], *key)
            except Exception as e:  # noqa: BLE001 - compare reports it for the models that need it
                failed[key] = f"{type(e).__name__}: {e}"
        if display_px is not None and max(img.size) > display_px:
            img = img.copy()
            img.thumbnail((display_px, display_px), Image.Resampling.BICUBIC)
        return PreparedImage(img, inputs, failed)

    def _input_keys(self) -> list[tuple]:
        """The ``(size, mean, std)`` of every available model, once each; a model whose entry
        gives none is left out (``compare`` raises its error for that model alone)."""
        keys = []
        for s in self._slots:
            try:
                key = s.pre_key() if s.model is not None else None
            except Exception:  # noqa: BLE001
                continue
            if key is not None and key not in keys:
                keys.append(key)
        return keys

    def _prepared_already(self, prep: PreparedImage) -> PreparedImage:
        """``prep`` as it is when it has every input this engine's models take; its image may be
        the small copy, so it is never prepared again from that."""
        missing = [k for k in self._input_keys() if k not in prep.inputs and k not in prep.failed]
        if missing:
            raise CamError(f"the image was prepared without an input of {missing[0][0]} px that this "
                           "engine's models take: prepare the original image")
        return prep

    def _batch(self, items: Sequence[Image.Image | PreparedImage], key: tuple) -> Tensor:
        """``(B, 3, S, S)`` model input for ``key`` = (size, mean, std) on the engine's device:
        prepared images' own inputs, the others preprocessed here."""
        from .data import preprocess

        parts = []
        for it in items:
            if isinstance(it, PreparedImage):
                if key in it.failed:
                    raise CamError(f"its input could not be made from the image: {it.failed[key]}")
                if key not in it.inputs:
                    raise CamError(f"the image was prepared without an input of {key[0]} px with "
                                   f"mean {list(key[1])} and std {list(key[2])}")
                parts.append(it.inputs[key])
            else:
                parts.append(preprocess([it], *key))
        return torch.cat(parts).to(self.device, non_blocking=True)

    def compare(
        self,
        images: ImageSource | Sequence[ImageSource],
        target: int | str | None = None,
        method: str = "gradcam",
        *,
        models: Sequence[str] | None = None,
        gates: bool = False,
        stage: int | None = None,
    ) -> list[ImageComparison]:
        """Run every (or the named) available model on ``images``: PIL images, image files
        (paths, bytes or open files, read by :func:`lgam.imageio.load_image`: upright RGB, its
        size limits) or :class:`PreparedImage` (:meth:`prepare`).

        target: ``None`` = each model's own top-1, or one class (index or name) for all models.
        method: one of :data:`lgam.cam.METHODS`. gates: also return each model's spatial attention
        gate of ``stage`` (1-4; ``None``: the last stage that has one), captured in the same forward
        pass. Returns one :class:`ImageComparison` per image; a model that is unavailable or
        fails has ``error`` set while the others carry on.
        """
        if _is_one_image(images):
            images = [images]
        images = [im if isinstance(im, PreparedImage) else _as_image(im) for im in images]
        if not images:
            raise CamError("no images given")
        check_method(method)
        if not self.available:
            raise CamError(self.setup_message or "no model is available")
        tgt = self.resolve_target(target)
        if stage is not None and stage not in (1, 2, 3, 4):
            raise CamError(f"stage must be 1, 2, 3 or 4, got {stage!r}")
        images = [im if isinstance(im, PreparedImage) or im.mode == "RGB" else im.convert("RGB")
                  for im in images]
        slots = self._slots if models is None else [self._slot(n) for n in models]

        batches: dict[tuple, Tensor] = {}  # preprocess once per (size, mean, std)
        per_image: list[list[ModelResult]] = [[] for _ in images]
        for s in slots:
            if s.model is None:
                for res in per_image:
                    res.append(ModelResult(s.name, s.label, error=s.error))
                continue
            try:
                key = s.pre_key()
                if key not in batches:
                    batches[key] = self._batch(images, key)
                out = self._run_model(s, batches[key], tgt, method, gates, stage)
            except Exception as e:  # noqa: BLE001 - one model failing must not stop the others
                out = [ModelResult(s.name, s.label, error=f"{type(e).__name__}: {e}", failed=True)
                       for _ in images]
            for res, r in zip(per_image, out):
                res.append(r)
        return [ImageComparison(im.image if isinstance(im, PreparedImage) else im, res, method,
                                str(self.device))
                for im, res in zip(images, per_image)]

    def _run_model(self, s: _Slot, x: Tensor, target: int | None, method: str, gates: bool,
                   stage: int | None) -> list[ModelResult]:
        B = x.shape[0]
        if method in SLOW_METHODS:  # on its own copy: holding the model's lock for minutes would
            with s.lock:            # hold every other request up behind it
                model, lock = inference_copy(s.model, channels_last=False), nullcontext()
        else:
            model, lock = s.model, s.lock
        with lock:
            t0 = time.perf_counter()
            targets = None if target is None else torch.full((B,), target, dtype=torch.long)
            probs, cams, captured = self._forward(s, model, x, targets, method, gates)
            tgt = probs.argmax(1) if targets is None else targets
            probs_np, tgt_list = probs.cpu().numpy(), [int(t) for t in tgt.tolist()]
            gate_maps = _gate_maps(s, captured, stage, x.shape[-2:]) if gates else None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = (time.perf_counter() - t0) * 1000 / B
        out = []
        k = min(5, probs_np.shape[1])
        for i in range(B):
            p, t = probs_np[i], tgt_list[i]
            top = np.argsort(-p, kind="stable")[:k]
            r = ModelResult(
                s.name, s.label, probs=p, top5=[(self._cls(j), float(p[j])) for j in top],
                target=t, target_class=self._cls(t), score=float(p[t]), cam=cams[i], time_ms=dt)
            if gate_maps is not None:
                maps, r.gate_source, r.gate_formula, r.gate_note = gate_maps
                r.gate = None if maps is None else maps[i]
            out.append(r)
        return out

    def _forward(self, s: _Slot, model: nn.Module, x: Tensor, targets: Tensor | None, method: str,
                 gates: bool) -> tuple[Tensor, np.ndarray, dict[str, dict[str, Tensor]]]:
        """``(probs, cams, captured gates)`` from one forward pass (plus the CAM method's own
        passes for the pytorch-grad-cam methods); ``model``: ``s.model`` or a private copy of it."""
        fast = method == "gradcam" and supports_fast_path(model)
        net = s.fast if fast and s.fast is not None else model
        with (capture_gates(net) if gates else nullcontext({})) as captured:
            if fast:
                fx = x.contiguous(memory_format=torch.channels_last) if net is s.fast else x
                with torch.autocast(self.device.type, torch.bfloat16,
                                    enabled=self.precision == "bf16"):
                    probs, cams = fast_gradcam(net, fx, targets)
            else:
                with torch.inference_mode():
                    probs = torch.softmax(model(x).float(), dim=1)
        if not fast:
            tgt = probs.argmax(1) if targets is None else targets
            cams = library_cam(model, x, tgt.tolist(), method)
        return probs, cams, captured

    def _cls(self, i: int) -> str:
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)


def _gate_maps(s: _Slot, captured: dict[str, dict[str, Tensor]], stage: int | None,
               size: tuple[int, int]) -> tuple[np.ndarray | None, str | None, str | None, str | None]:
    """``(maps (B, H, W) in [0, 1] or None, source module, formula, note)`` for one model."""
    found = stage_gate(captured, stage)
    if found is None:
        modules = [m for m in s.model.modules() if isinstance(m, GateRecorder)]
        if not modules:
            return None, None, None, "no attention module"
        if not any(m.gate_description for m in modules):
            return None, None, None, "channel gates only, no spatial map"
        return None, None, None, f"no spatial gate in stage {stage}"
    name, gate = found
    maps = F.interpolate(gate.float(), size=tuple(size), mode="bilinear", align_corners=False)
    formula = s.model.get_submodule(name).gate_description  # the copy has the same names
    return maps[:, 0].clamp_(0, 1).cpu().numpy(), name, formula, None
