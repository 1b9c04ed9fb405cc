"""Class-activation maps of one model: the fast Grad-CAM, pytorch-grad-cam's other methods, and
the heatmap overlay. :mod:`lgam.engine` runs them over several models at once.

**Fast Grad-CAM.** The Grad-CAM target is the last feature map (``model.forward_features``, the
output of ``model.cam_target_layer()``), which is followed only by a global average pool and
``fc``. The gradient of logit ``t`` with respect to that map is ``fc.weight[t] / (h*w)`` at every
position, so Grad-CAM's channel weights need no backward pass:
``CAM = ReLU(sum_c fc.weight[t, c] / (h*w) * A_c)`` from one forward pass, normalised and resized
exactly as pytorch-grad-cam does (:func:`pytorch_grad_cam.utils.image.scale_cam_image`). The tests
check it equals pytorch-grad-cam's ``GradCAM`` to 1e-5.

Other methods (``gradcam++ xgradcam layercam eigencam scorecam hirescam``) run pytorch-grad-cam in
float32 on ``model.cam_target_layer()``, one CAM object per call (its hooks are always released;
its exceptions are raised, not printed and swallowed as its ``with`` block does with an
IndexError). pytorch-grad-cam objects keep activations on themselves: callers serialise calls
per model (the engine holds a lock per model).
"""
from __future__ import annotations

import copy
import functools
import operator
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .errors import LgamError

__all__ = ["CMAP", "METHODS", "METHOD_LABELS", "SLOW_METHODS", "CLASS_AGNOSTIC", "CamError", "check_method",
           "fast_gradcam", "library_cam", "overlay", "inference_copy", "supports_fast_path", "colormap_lut"]

#: CAM method names (``gradcam`` uses the no-backward fast path)
METHODS: tuple[str, ...] = (
    "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam", "scorecam",
)
#: each method's name as its paper writes it
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
    "eigencam": "EigenCAM", "hirescam": "HiResCAM", "scorecam": "Score-CAM",
}
#: methods that run one forward pass per channel of the last feature map: minutes a model on a CPU
SLOW_METHODS = frozenset({"scorecam"})
#: methods whose map does not depend on the class (EigenCAM: the features' first principal
#: component); a caption must not say the map explains a class
CLASS_AGNOSTIC = frozenset({"eigencam"})


#: the heatmaps' matplotlib colormap (0 blue, 1 red), as pytorch-grad-cam's
CMAP = "jet"

#: class indices, one per image: a ``(B,)`` integer tensor or array, or a sequence of ints
Targets = Union[Tensor, np.ndarray, Sequence[int]]


class CamError(LgamError, ValueError):
    """A bad CAM request (unknown method or class, no images, opacity out of range); the message
    is for the user."""


def check_method(method: str) -> None:
    """:class:`CamError` unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise CamError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")


def supports_fast_path(model: nn.Module) -> bool:
    """Whether ``model`` is ``forward_head(forward_features(x))`` with a global average pool and
    one ``nn.Linear`` as its head (the condition of :func:`fast_gradcam`)."""
    pool = getattr(model, "avgpool", None)
    return (
        hasattr(model, "forward_features") and hasattr(model, "forward_head")
        and isinstance(getattr(model, "fc", None), nn.Linear)
        and isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))
    )


def inference_copy(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A frozen eval-mode copy of ``model``, ``channels_last`` by default for the no-backward path
    (oneDNN's and cuDNN's preferred layout; the engine uses it on CUDA); ``model`` is untouched."""
    m = copy.deepcopy(model).eval()
    for prm in m.parameters():
        prm.requires_grad_(False)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _scale(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's normalisation for one target layer: per image min-max, cv2 resize to
    ``(W, H)``, then min-max again (its ``aggregate_multi_layers`` step)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(cams.astype(np.float32), size))


def _target_list(targets: Targets) -> list[int]:
    """``targets`` as a list of ints: a tensor or array of any shape with one index per image, or
    a sequence of ints (NumPy's and 0-d tensors included); floats and booleans (a mask passed by
    mistake) are refused, not read as numbers."""
    if isinstance(targets, Tensor):
        integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    elif isinstance(targets, np.ndarray):
        integer = targets.dtype.kind in "iu"
    else:
        try:
            if any(isinstance(t, (bool, np.bool_)) for t in targets):
                raise TypeError
            return [operator.index(t) for t in targets]
        except TypeError:
            raise CamError(f"targets must be class indices, one per image, got {targets!r}") from None
    if not integer:
        raise CamError(f"targets must be integer class indices, got {targets.dtype} values")
    return [int(t) for t in targets.reshape(-1).tolist()]


def _check_targets(targets: Sequence[int], batch: int, num_classes: int | None) -> None:
    """One class index per image, each in ``0..K-1`` (pytorch-grad-cam swallows the IndexError of a
    class out of range, and a negative index would silently pick a class from the end)."""
    if len(targets) != batch:
        raise CamError(f"got {len(targets)} targets for {batch} images: give one class index per image")
    bad = [int(t) for t in targets if int(t) < 0 or (num_classes is not None and int(t) >= num_classes)]
    if bad:
        top = "" if num_classes is None else f"..{num_classes - 1}"
        raise CamError(f"class index {bad[0]} is out of range 0{top}")


#: modules whose output depends on their train/eval mode
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _check_eval(model: nn.Module) -> None:
    """The model and every BatchNorm and dropout in eval mode: a BatchNorm left in training mode
    under an eval-mode model would use, and update, the batch's statistics."""
    training = [name or "the model" for name, m in model.named_modules()
                if m.training and (m is model or isinstance(m, _MODE_DEPENDENT))]
    if training:
        raise CamError(f"{training[0]} is in training mode: call model.eval() first (a CAM in training "
                       "mode would use, and update, the batch's BatchNorm statistics, and drop units)")


def _check_images(x: Tensor, model: nn.Module | None = None) -> None:
    """:class:`CamError` unless ``x`` is a non-empty ``(B, C, H, W)`` floating-point batch (in
    ``model``'s dtype where given, outside autocast)."""
    if not isinstance(x, Tensor):
        raise CamError(f"images must be a (B, 3, H, W) float tensor, got {type(x).__name__}: "
                       "lgam.data.preprocess([pil_image, ...], size) makes one from PIL images")
    if not x.is_floating_point():
        raise CamError(f"images must be normalised floats, got {x.dtype}: lgam.data.resize_normalize "
                       "turns a uint8 (B, 3, H, W) batch into them")
    if model is not None and not torch.is_autocast_enabled(x.device.type):
        dtype = next(model.parameters()).dtype
        if x.dtype != dtype:
            raise CamError(f"the images are {x.dtype} and the model {dtype}: pass x.to({dtype}) (or "
                           "model.float() for float32)")
    if x.ndim != 4:
        raise CamError(f"images must be a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise CamError("no images: the batch is empty")


def fast_gradcam(
    model: nn.Module, x: Tensor, targets: Targets | None = None
) -> tuple[Tensor, np.ndarray]:
    """Grad-CAM on the last feature map (``model.forward_features``) without a backward pass.

    x: ``(B, 3, H, W)``; targets: ``(B,)`` class indices (a tensor, array or list) or ``None``
    (each image's top-1); the model in eval mode (:class:`CamError` otherwise, as for a target out
    of range).
    Returns ``(probs (B, K) float32 on x's device, cams (B, H, W) float32 numpy in [0, 1])``.
    Equal to ``GradCAM(model, [model.cam_target_layer()])(x, targets)`` up to float rounding.
    """
    _check_eval(model)
    _check_classifier(model)
    _check_images(x, model)
    if not supports_fast_path(model):
        raise CamError("fast_gradcam needs forward_features, then a global average pool and one nn.Linear "
                       "(fc); library_cam runs pytorch-grad-cam on other classifiers")
    if targets is not None:
        targets = _target_list(targets)
        _check_targets(targets, x.shape[0], model.fc.out_features)
    with torch.inference_mode():
        feats = model.forward_features(x)  # (B, C, h, w)
        logits = model.forward_head(feats)  # (B, K)
        probs = torch.softmax(logits.float(), dim=1)
        tgt = probs.argmax(1) if targets is None else torch.tensor(targets, device=probs.device)
        h, w = feats.shape[-2:]
        weights = model.fc.weight[tgt].float() / (h * w)  # (B, C): d logit_t / d A_c(i, j)
        with torch.autocast(x.device.type, enabled=False):  # the map in float32 under autocast too
            cam = torch.einsum("bc,bchw->bhw", weights, feats.float()).clamp_min_(0)
        cam_np = cam.cpu().numpy()
    _check_finite(probs, model)
    return probs.clone(), _scale(cam_np, (x.shape[-1], x.shape[-2]))  # a normal tensor, not an inference one


def _check_finite(probs: Tensor, model: nn.Module) -> None:
    """:class:`CamError` where the class scores are NaN or infinite (a map of them is NaN too)."""
    if not torch.isfinite(probs).all():
        dtype = next(model.parameters()).dtype
        hint = (" (float16 overflows past 65,504: an untrained or unnormalised network's activations "
                "reach that; use bfloat16 or float32)" if dtype == torch.float16 else "")
        raise CamError(f"the model's class scores are not finite (NaN or inf) in {dtype}{hint}")


def _method_class(method: str):
    import pytorch_grad_cam as pgc

    check_method(method)
    return {
        "gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "hirescam": pgc.HiResCAM,
        "scorecam": pgc.ScoreCAM,
    }[method]


def library_cam(model: nn.Module, x: Tensor, targets: Targets | None = None,
                method: str = "gradcam") -> np.ndarray:
    """pytorch-grad-cam's ``method`` on ``model.cam_target_layer()`` (the last feature map) in
    float32: ``(B, H, W)`` in [0, 1]. x: ``(B, 3, H, W)``; targets: one class index per image, or
    ``None`` (each image's top-1, as pytorch-grad-cam chooses it).

    The model must be float32 with frozen weights (``requires_grad=False``: the input carries the
    gradient, and no ``.grad`` of the caller's is touched; :func:`inference_copy` makes such a
    twin), and this cannot run under ``torch.inference_mode``: :class:`CamError` says so, as for
    a target out of range. Every module's train/eval mode is restored (pytorch-grad-cam sets eval).
    The caller holds the model's lock; the CAM object's hooks are released on exit, also on errors.
    """
    cls = _method_class(method)
    _check_images(x)
    _check_library_model(model)
    if torch.is_autocast_enabled(x.device.type):
        raise CamError("pytorch-grad-cam's methods run in float32: call them outside torch.autocast")
    _check_classifier(model)
    fc = getattr(model, "fc", None)
    if targets is not None:
        targets = _target_list(targets)
        _check_targets(targets, x.shape[0], fc.out_features if isinstance(fc, nn.Linear) else None)
    modes = [(m, m.training) for m in model.modules()]
    cam = None
    try:  # its constructor already sets eval mode and registers hooks
        cam = cls(model=model, target_layers=[model.cam_target_layer()])
        # the input carries the gradient of the methods that take one (the weights are frozen);
        # the others (ScoreCAM, EigenCAM) would only keep the first pass's graph alive
        xin = x.detach().float().clone().requires_grad_(cam.uses_gradients)
        tgts = None if targets is None else [_Target(t) for t in targets]
        with torch.enable_grad():
            if method == "scorecam":
                out = _score_cam(cam, xin, tgts)
            else:
                out = cam(input_tensor=xin, targets=tgts)
    finally:  # not cam's own ``with``: its __exit__ prints and swallows any IndexError
        if cam is not None:
            cam.activations_and_grads.release()
        for m, training in modes:
            m.training = training
    return np.asarray(out, dtype=np.float32)


def _score_cam(cam, x: Tensor, targets: list | None) -> np.ndarray:
    """ScoreCAM one image at a time: pytorch-grad-cam masks the whole batch at once, ``(B, C, 3,
    H, W)`` float32 inputs and ``(B, C, H, W)`` masks (6 images of 224 px through ResNet18's 512
    channels: 2.5 GB), so memory grows with the batch; per image it stays at 0.4 GB. ``(B, H, W)``."""
    cam.batch_size = 64  # masked copies per forward pass
    return np.concatenate([
        cam(input_tensor=x[i:i + 1], targets=None if targets is None else targets[i:i + 1])
        for i in range(x.shape[0])])


class _Target:
    """pytorch-grad-cam's ``ClassifierOutputTarget`` that checks the class against the logits'
    width (a head other than one ``nn.Linear`` gives no class count before the forward pass)."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        k = model_output.shape[-1]
        if self.category >= k:
            raise CamError(f"class index {self.category} is out of range 0..{k - 1}")
        return model_output[..., self.category]


def _check_classifier(model: nn.Module) -> None:
    if getattr(model, "num_classes", None) == 0:
        raise CamError("the model has no classifier (num_classes=0): a CAM explains a class score; "
                       "model.reset_classifier(K) gives it one")


def _check_library_model(model: nn.Module) -> None:
    if torch.is_inference_mode_enabled():
        raise CamError("pytorch-grad-cam's methods need gradients: call them outside torch.inference_mode()")
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        raise CamError("freeze the model's weights first (lgam.cam.inference_copy(model) makes a frozen "
                       "twin): the CAM's backward would overwrite their .grad")
    if any(p.dtype != torch.float32 for p in params):
        raise CamError("pytorch-grad-cam's methods run in float32: pass model.float()")


# --------------------------------------------------------------------------------------------
# drawing


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5, cmap: str = CMAP) -> Image.Image:
    """Heatmap of ``cam`` (``(h, w)`` in [0, 1], resized to the image) blended over ``image``:
    ``(1 - alpha) * image + alpha * colormap(cam)`` in 8-bit colour. Returns an RGB image of
    ``image``'s size."""
    import cv2

    if not 0.0 <= float(alpha) <= 1.0:
        raise CamError(f"overlay opacity must be in [0, 1], got {alpha}")
    if not isinstance(image, Image.Image):
        raise CamError(f"overlay draws on a PIL image, got {type(image).__name__}: "
                       "PIL.Image.fromarray(uint8 (H, W, 3) array) makes one")
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    c = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    if c.ndim == 3 and c.shape[0] == 1:  # one image's map as fast_gradcam returns a batch of one
        c = c[0]
    if c.ndim != 2 or 0 in c.shape:
        raise CamError(f"overlay needs one (h, w) map, got shape {c.shape} (index a batch: cams[i])")
    if c.shape != (h, w):
        c = cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR)
    lut = colormap_lut(cmap)
    heat = lut[np.clip(c * len(lut), 0, len(lut) - 1).astype(np.intp)]  # matplotlib's binning
    return Image.fromarray(cv2.addWeighted(rgb, 1.0 - float(alpha), heat, float(alpha), 0.0), "RGB")


@functools.lru_cache(maxsize=8)
def colormap_lut(cmap: str = CMAP) -> np.ndarray:
    """Matplotlib colormap ``cmap`` as its ``(N, 3)`` uint8 colour table, looked up once (calling
    the colormap per tile and blending in float32 was 8 ms of a 448-px tile; this is ~1 ms)."""
    from matplotlib import colormaps

    if cmap not in colormaps:
        raise CamError(f"unknown colormap {cmap!r}: a matplotlib colormap name such as 'jet', 'turbo' or "
                       "'viridis'")
    table = colormaps[cmap]
    return np.rint(table(np.arange(table.N))[:, :3] * 255).astype(np.uint8)
