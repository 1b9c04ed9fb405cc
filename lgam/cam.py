"""Class-activation maps for several models and images at once: the engine the app and ``lgam
figure5`` share (the app holds no model math).

:class:`CamEngine` holds the loaded models (or, per model, the reason it is unavailable), the
device and one lock per model. :meth:`CamEngine.compare` preprocesses the images once, runs every
model and returns, per image and model, the class probabilities, the top-5, the CAM for the target
(each model's own top-1, or one class for all) and the time it took.

**Fast Grad-CAM.** The Grad-CAM target is the output of ``layer4``, which is followed only by a
global average pool and ``fc``. The gradient of logit ``t`` with respect to that output is
``fc.weight[t] / (h*w)`` at every position, so Grad-CAM's channel weights need no backward pass:
``CAM = ReLU(sum_c fc.weight[t, c] / (h*w) * A_c)`` from one forward pass, normalised and resized
exactly as pytorch-grad-cam does (:func:`pytorch_grad_cam.utils.image.scale_cam_image`). The tests
check it equals ``GradCAM(model, [model.layer4[-1]])`` to 1e-5 for all six models.

Other methods (``gradcam++ xgradcam layercam eigencam scorecam hirescam``) run pytorch-grad-cam in
float32, one CAM object per call inside ``with`` (its hooks are always released), under the model's
lock (pytorch-grad-cam objects keep activations on themselves and are not thread-safe).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .device import resolve_device

__all__ = [
    "APP_MODELS", "METHODS", "CamError", "CamEngine", "ModelResult", "ImageComparison",
    "overlay", "no_checkpoints_message", "fast_gradcam", "library_cam",
    "inference_copy",
]

#: the six ImageNet-20 models of the paper's Figure 5, in column order: name -> label
APP_MODELS: "OrderedDict[str, str]" = OrderedDict(
    [("resnet18", "ResNet18"), ("resnet18_se", "SE"), ("resnet18_sge", "SGE"),
     ("resnet18_cbam", "CBAM"), ("resnet18_bam", "BAM"), ("resnet18_lgam", "LGAM")]
)

#: CAM method names (``gradcam`` uses the no-backward fast path)
METHODS: tuple[str, ...] = (
    "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam", "scorecam",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CamError(ValueError):
    """A bad request to the engine (unknown method or class, no images); message for the user."""


def no_checkpoints_message(directory: str | Path) -> str:
    """What to tell a person who has no checkpoints."""
    return (
        f"No trained checkpoints were found in '{directory}'. The app needs a folder with "
        "manifest.json and the six .safetensors files: train them with `lgam train` (see "
        "`lgam train --help` and the README), or copy a released checkpoints/ folder, then start "
        "the app with `--checkpoints DIR`."
    )


# --------------------------------------------------------------------------------------------
# results


@dataclass
class ModelResult:
    """One model on one image. ``error`` is set (and the rest is empty) when the model is
    unavailable or failed.

    probs: ``(K,)`` float32 class probabilities; top5: ``[(class name, p)]``; target: the class
    the CAM explains; score: ``probs[target]``; cam: ``(S, S)`` float32 in [0, 1] at the model's
    input size ``S`` (the whole image resized to a square: resize it back with :func:`overlay`);
    time_ms: this model's wall time for the call divided by the number of images.
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

    @property
    def ok(self) -> bool:
        return self.error is None

    def caption(self) -> str:
        """``"LGAM · tench · 0.93"`` (or ``"LGAM · unavailable: reason"``)."""
        if not self.ok:
            return f"{self.label} · unavailable: {self.error}"
        return f"{self.label} · {self.target_class} · {self.score:.2f}"


@dataclass
class ImageComparison:
    """All models on one image: ``image`` (RGB, as given) and ``results`` in model order."""

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
# CAM maths


def _supports_fast_path(model: nn.Module) -> bool:
    pool = getattr(model, "avgpool", None)
    return (
        hasattr(model, "forward_features") and hasattr(model, "forward_head")
        and isinstance(getattr(model, "fc", None), nn.Linear)
        and isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))
    )


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Conv2d | None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features):
        return fuse_conv_bn_eval(conv, bn)
    return None


def inference_copy(model: nn.Module, channels_last: bool = True, fold_bn: bool = False
                   ) -> nn.Module:
    """A frozen eval-mode copy of ``model`` for the no-backward path, ``channels_last`` (oneDNN's
    preferred layout: ~15-20% faster ResNet18 forwards on a 2-core CPU). With ``fold_bn`` every
    ``convN``/``bnN`` pair (ResNet stem and BasicBlocks) and every ``Sequential(Conv2d,
    BatchNorm2d)`` (downsample) has the BatchNorm folded into the convolution; measured only ~3%
    faster here and it moves CAMs by ~1e-5, so it is off by default. Attention modules are left
    as they are."""
    import copy

    m = copy.deepcopy(model).eval()
    for mod in list(m.modules()) if fold_bn else []:
        for i in (1, 2, 3):
            conv, bn = getattr(mod, f"conv{i}", None), getattr(mod, f"bn{i}", None)
            fused = _fold(conv, bn) if conv is not None and bn is not None else None
            if fused is not None:
                setattr(mod, f"conv{i}", fused)
                setattr(mod, f"bn{i}", nn.Identity())
        if isinstance(mod, nn.Sequential) and len(mod) == 2:
            fused = _fold(mod[0], mod[1])
            if fused is not None:
                mod[0], mod[1] = fused, nn.Identity()
    for prm in m.parameters():
        prm.requires_grad_(False)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _scale(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's normalisation for one target layer: per image min-max, cv2 resize to
    ``(W, H)``, then min-max again (its ``aggregate_multi_layers`` step)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(cams.astype(np.float32), size))


def fast_gradcam(
    model: nn.Module, x: Tensor, targets: Tensor | None = None
) -> tuple[Tensor, np.ndarray]:
    """Grad-CAM on ``model.layer4``'s output without a backward pass.

    x: ``(B, 3, H, W)``; targets: ``(B,)`` class indices or ``None`` (each image's top-1).
    Returns ``(probs (B, K) float32 on x's device, cams (B, H, W) float32 numpy in [0, 1])``.
    Equal to ``GradCAM(model, [model.layer4[-1]])(x, targets)`` up to float rounding.
    """
    with torch.inference_mode():
        feats = model.forward_features(x)  # (B, C, h, w)
        logits = model.forward_head(feats)  # (B, K)
        probs = torch.softmax(logits.float(), dim=1)
        tgt = probs.argmax(1) if targets is None else targets.to(probs.device)
        h, w = feats.shape[-2:]
        weights = model.fc.weight[tgt].float() / (h * w)  # (B, C): d logit_t / d A_c(i, j)
        cam = torch.einsum("bc,bchw->bhw", weights, feats.float()).clamp_min_(0)
        cam_np = cam.cpu().numpy()
    return probs, _scale(cam_np, (x.shape[-1], x.shape[-2]))


def _method_class(method: str):
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "hirescam": pgc.HiResCAM,
        "scorecam": pgc.ScoreCAM,
    }[method]


def library_cam(model: nn.Module, x: Tensor, targets: Sequence[int], method: str) -> np.ndarray:
    """pytorch-grad-cam's ``method`` on ``model.layer4[-1]`` in float32: ``(B, H, W)`` in [0, 1].

    Weights must be frozen (``requires_grad=False``) - the input carries the gradient. The caller
    holds the model's lock; the CAM object's hooks are released on exit, also on errors.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _method_class(method)
    xin = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad(), cls(model=model, target_layers=[model.layer4[-1]]) as cam:
        if method == "scorecam":
            cam.batch_size = 64
        out = cam(input_tensor=xin, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# the engine


class CamEngine:
    """Several classifiers side by side: ``compare(images, target, method)``.

    ``models`` maps name -> ``nn.Module`` (available) or ``str`` (the reason it is unavailable).
    ``entries`` (optional, name -> manifest entry) give each model's ``input_size``, ``mean``,
    ``std`` and ``metrics``; ``classes`` are the class names, shared by all models.
    ``fast_copies``: run the Grad-CAM fast path on :func:`inference_copy` of each model
    (channels_last); the models themselves serve the pytorch-grad-cam methods. Default: on for
    CUDA, off for the CPU (there it is ~15% faster but moves LGAM's CAMs by up to ~2e-3, and the
    app should give exactly what ``lgam evaluate`` computes).
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
    ) -> None:
        try:
            self.device = resolve_device(device)
        except ValueError as e:
            raise CamError(str(e)) from e
        self.classes = list(classes)
        self.setup_message = setup_message
        if fast_copies is None:
            fast_copies = self.device.type == "cuda"
        labels = dict(APP_MODELS, **(labels or {}))
        self._slots: list[_Slot] = []
        for name, m in models.items():
            entry = dict((entries or {}).get(name) or {})
            label = labels.get(name, name)
            if isinstance(m, nn.Module):
                m = m.float().to(self.device).eval()
                for p in m.parameters():
                    p.requires_grad_(False)
                out = getattr(getattr(m, "fc", None), "out_features", len(self.classes))
                if out != len(self.classes):
                    self._slots.append(_Slot(name, label, None, (
                        f"it predicts {out} classes, the app has {len(self.classes)}"), entry))
                    continue
                fast = inference_copy(m) if fast_copies and _supports_fast_path(m) else None
                self._slots.append(_Slot(name, label, m, None, entry, fast))
            else:
                self._slots.append(_Slot(name, label, None, str(m), entry))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(
        cls,
        directory: str | Path,
        names: Sequence[str] | Mapping[str, str] = APP_MODELS,
        *,
        device: str | torch.device | None = None,
    ) -> "CamEngine":
        """Load ``names`` from ``directory``'s ``manifest.json``. A missing or corrupt model
        becomes unavailable (with the reason); the others load. With no manifest at all every
        model is unavailable and :attr:`setup_message` says how to get checkpoints."""
        from .checkpoints import CheckpointError, load_checkpoint, load_manifest

        directory = Path(directory)
        labels = dict(names) if isinstance(names, Mapping) else {}
        names = list(names)
        if not (directory / "manifest.json").is_file():
            msg = no_checkpoints_message(directory)
            return cls({n: "no checkpoint" for n in names}, [], device=device, labels=labels,
                       setup_message=msg)
        try:
            manifest = load_manifest(directory)
        except Exception as e:  # noqa: BLE001 - corrupt manifest: say so, do not crash
            msg = f"The checkpoint manifest in '{directory}' cannot be read: {e}"
            return cls({n: "manifest unreadable" for n in names}, [], device=device,
                       labels=labels, setup_message=msg)
        entries = manifest.get("models", {})
        models: dict[str, nn.Module | str] = {}
        classes: list[str] | None = None
        for n in names:
            if n not in entries:
                models[n] = "not in the checkpoint manifest"
                continue
            try:
                model, entry = load_checkpoint(directory, n, map_location="cpu")
            except CheckpointError as e:
                models[n] = f"checkpoint error: {e}"
                continue
            except Exception as e:  # noqa: BLE001 - any broken file: this tile only
                models[n] = f"cannot load: {type(e).__name__}: {e}"
                continue
            entries[n] = entry
            if classes is None:
                classes = list(entry.get("classes") or [])
            if list(entry.get("classes") or []) != classes:
                models[n] = "its class list differs from the other models'"
                continue
            models[n] = model
        msg = None
        if not any(isinstance(m, nn.Module) for m in models.values()):
            msg = "No model could be loaded. " + no_checkpoints_message(directory)
        return cls(models, classes or [], device=device, labels=labels, entries=entries,
                   setup_message=msg)

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

    def model_table(self) -> list[dict[str, Any]]:
        """One row per model: label, name, status, params, GMACs (224), the input size it is fed,
        val top-1 error (%) at that size and at 224 px, CPU latency (ms) - from the manifest where
        present."""
        rows = []
        for s in self._slots:
            met = dict(s.entry.get("metrics") or {})
            params = met.get("params")
            if params is None and s.model is not None:
                params = sum(p.numel() for p in s.model.parameters())
            rows.append({
                "model": s.label, "name": s.name,
                "status": "ok" if s.model is not None else f"unavailable: {s.error}",
                "params_m": None if params is None else round(params / 1e6, 3),
                "gmacs_224": met.get("gmacs_224"),
                "input_size": s.pre_key()[0],
                "val_top1_err": met.get(f"val_top1_err_{s.pre_key()[0]}"),
                "val_top1_err_224": met.get("val_top1_err_224"),
                "cpu_latency_ms_224": met.get("cpu_latency_ms_224"),
            })
        return rows

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

    def compare(
        self,
        images: Image.Image | Sequence[Image.Image],
        target: int | str | None = None,
        method: str = "gradcam",
        *,
        models: Sequence[str] | None = None,
    ) -> list[ImageComparison]:
        """Run every (or the named) available model on ``images``.

        target: ``None`` = each model's own top-1, or one class (index or name) for all models.
        method: one of :data:`METHODS`. Returns one :class:`ImageComparison` per image; a model
        that is unavailable or fails has ``error`` set while the others carry on.
        """
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if not images:
            raise CamError("no images given")
        if method not in METHODS:
            raise CamError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
        if not self.available:
            raise CamError(self.setup_message or "no model is available")
        tgt = self.resolve_target(target)
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        slots = self._slots if models is None else [self._slot(n) for n in models]

        batches: dict[tuple, Tensor] = {}  # preprocess once per (size, mean, std)
        per_image: list[list[ModelResult]] = [[] for _ in images]
        for s in slots:
            if s.model is None:
                for res in per_image:
                    res.append(ModelResult(s.name, s.label, error=s.error))
                continue
            key = s.pre_key()
            if key not in batches:
                batches[key] = self.preprocess(images, *key)
            try:
                out = self._run_model(s, batches[key], tgt, method)
            except Exception as e:  # noqa: BLE001 - one model failing must not stop the others
                out = [ModelResult(s.name, s.label, error=f"{type(e).__name__}: {e}")
                       for _ in images]
            for res, r in zip(per_image, out):
                res.append(r)
        return [ImageComparison(im, res, method, str(self.device))
                for im, res in zip(images, per_image)]

    def _run_model(self, s: _Slot, x: Tensor, target: int | None, method: str) -> list[ModelResult]:
        model = s.model
        assert model is not None
        B = x.shape[0]
        with s.lock:
            t0 = time.perf_counter()
            targets = None if target is None else torch.full((B,), target, dtype=torch.long)
            if method == "gradcam" and _supports_fast_path(model):
                fx = x.contiguous(memory_format=torch.channels_last) if s.fast is not None else x
                probs, cams = fast_gradcam(s.fast if s.fast is not None else model, fx, targets)
                tgt = probs.argmax(1) if targets is None else targets
            else:
                with torch.inference_mode():
                    probs = torch.softmax(model(x).float(), dim=1)
                tgt = probs.argmax(1) if targets is None else targets
                cams = library_cam(model, x, tgt.tolist(), method)
            probs_np = probs.cpu().numpy()
            tgt_list = [int(t) for t in tgt.tolist()]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = (time.perf_counter() - t0) * 1000 / B
        out = []
        k = min(5, probs_np.shape[1])
        for i in range(B):
            p = probs_np[i]
            top = np.argsort(-p, kind="stable")[:k]
            t = tgt_list[i]
            out.append(ModelResult(
                s.name, s.label, probs=p, top5=[(self._cls(j), float(p[j])) for j in top],
                target=t, target_class=self._cls(t), score=float(p[t]), cam=cams[i],
                time_ms=dt,
            ))
        return out

    def _cls(self, i: int) -> str:
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)


# --------------------------------------------------------------------------------------------
# drawing


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Heatmap of ``cam`` (``(h, w)`` in [0, 1], resized to the image) blended over ``image``:
    ``(1 - alpha) * image + alpha * colormap(cam)``. Returns an RGB image of ``image``'s size."""
    import cv2
    from matplotlib import colormaps

    if not 0.0 <= float(alpha) <= 1.0:
        raise CamError(f"overlay opacity must be in [0, 1], got {alpha}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    c = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
    if c.shape != (h, w):
        c = np.clip(cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    heat = colormaps[cmap](c)[..., :3].astype(np.float32)
    out = (1.0 - alpha) * rgb + alpha * heat
    return Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), "RGB")
