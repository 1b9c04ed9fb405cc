"""Training recipes: the typed :class:`Recipe`, the presets ``paper``/``fast``/``cpu``, ``--set
key=value`` overrides, and the per-step and per-epoch schedules a recipe defines.

``paper`` is the paper's ImageNet-20 recipe as we read its §3.2 (90 epochs, batch 64, lr 0.1 divided by 10 every 30
epochs); ``fast`` and ``cpu`` are ours (warm-up + cosine, label smoothing; ``cpu`` adds progressive
resizing 96 -> 128 px). :func:`lr_at` gives the learning rate of each optimisation step,
:func:`train_size_at` the crop size of each epoch, :func:`param_groups` the optimiser's weight-decay
groups. A bad preset, field or value raises :class:`TrainError` (a ``ValueError``) naming the
valid choices.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .errors import LgamError

__all__ = ["Recipe", "RECIPES", "TrainError", "make_recipe", "lr_at", "train_size_at", "param_groups"]


class TrainError(LgamError, ValueError):
    """A training setting that cannot be used: a bad recipe override, a batch that does not split
    over the processes, a ``--resume`` with settings other than those the run was trained with."""


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run besides the data, the models and the seed.

    ``lr`` is the peak learning rate for ``batch_size`` (the global batch under DDP), which each
    process feeds as ``accum_steps`` micro-batches with accumulated gradients (BatchNorm sees a
    micro-batch, as it sees one process's share under DDP).
    ``schedule="step"`` multiplies it by ``gamma`` every ``step_epochs`` epochs; ``"cosine"``
    decays it per step to 0 after a linear warm-up of ``warmup_epochs``. ``bf16`` (autocast) and
    ``channels_last`` apply where bf16 is native (:func:`lgam.device.bf16_native`: GPUs of compute
    capability 8.0+, CPUs with AVX512-BF16/AMX). ``train_size_start`` (0: off)
    starts the crops at that size and grows them linearly to ``train_size``, reached
    ``size_hold_epochs`` before the end (:func:`train_size_at`). ``bn_bias_decay=False`` exempts
    BatchNorm weights and all biases from weight decay. How the residual branches start (at most
    one of four): ``zero_init_residual`` starts every residual block as the identity by zeroing
    its branch's last BN scale (:func:`lgam.models.zero_init_residual`: an in-branch attention module then starts from a zero input); ``skip_init`` does it with a
    zero-initialised scalar gain after the attention module instead (SkipInit: the models are built
    with ``skip_init=True``, :func:`lgam.models.resnet.skip_gain`).
    ``residual_bn_scale`` sets that BN's initial scale to another value instead (1: the standard
    init; a small value starts every branch, attention module included, from a small non-zero
    input; :func:`lgam.models.init_residual_bn`); ``branch_rms`` (0: off) sets it per branch, from
    a batch of training images, so that every branch's output *after its attention module* starts
    at that RMS whatever the module does to its input's scale (LSUV-style,
    :func:`lgam.models.match_branch_rms`). ``skip_gain_lr`` scales the learning rate of SkipInit's
    gains (LGAM's branch is 6-10x its input, so at the full rate its gain's steps diverge,
    measured; 0.1 trains every module).
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    step_epochs: int
    gamma: float
    warmup_epochs: float
    label_smoothing: float
    train_size: int
    crop_scale_min: float
    bf16: bool
    channels_last: bool
    accum_steps: int
    train_size_start: int = 0
    size_hold_epochs: int = 0
    bn_bias_decay: bool = True
    zero_init_residual: bool = False
    skip_init: bool = False
    skip_gain_lr: float = 1.0
    residual_bn_scale: float = 1.0
    branch_rms: float = 0.0

    @property
    def branch_inits(self) -> list[str]:
        """The fields that are on among those that set how the residual branches start (at most
        one: :meth:`__post_init__` refuses more)."""
        return [name for name, on in (("zero_init_residual", self.zero_init_residual), ("skip_init", self.skip_init),
                                      ("residual_bn_scale", self.residual_bn_scale != 1.0),
                                      ("branch_rms", self.branch_rms != 0.0)) if on]

    def __post_init__(self) -> None:
        if self.schedule not in ("step", "cosine"):
            raise TrainError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        for name in ("epochs", "batch_size", "step_epochs", "train_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.crop_scale_min <= 1:
            raise TrainError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.train_size_start < 0 or self.size_hold_epochs < 0:
            raise TrainError("train_size_start and size_hold_epochs must be >= 0")
        inits = self.branch_inits
        if len(inits) > 1:
            raise TrainError(f"{' and '.join(inits)} each set how the residual branches start: choose one")
        if self.branch_rms < 0:
            raise TrainError(f"branch_rms must be >= 0 (0: off), got {self.branch_rms}")
        if self.residual_bn_scale < 0:
            raise TrainError(f"residual_bn_scale must be >= 0, got {self.residual_bn_scale}")
        if self.skip_gain_lr <= 0:
            raise TrainError(f"skip_gain_lr must be > 0, got {self.skip_gain_lr}")
        if self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise TrainError("warmup_epochs must be >= 0 and label_smoothing in [0, 1)")


RECIPES: dict[str, Recipe] = {
    # the paper's ImageNet-20 recipe (train crops at 160 px, the stored size)
    "paper": Recipe(epochs=90, batch_size=64, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                    schedule="step", step_epochs=30, gamma=0.1, warmup_epochs=0.0, label_smoothing=0.0,
                    train_size=160, crop_scale_min=0.08, bf16=False, channels_last=False, accum_steps=1),
    # all six ResNet18 variants on ImageNet-20 within ~20 minutes of one H100: large batch,
    # warm-up + cosine, label smoothing, milder crops for the short schedule, bf16 + channels_last
    "fast": Recipe(epochs=16, batch_size=256, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-5,
                   schedule="cosine", step_epochs=30, gamma=0.1, warmup_epochs=2.0, label_smoothing=0.1,
                   train_size=160, crop_scale_min=0.25, bf16=True, channels_last=True, accum_steps=1),
    # each ResNet18 variant on ImageNet-20 in about an hour of a 2-core CPU with native bf16 (1-2 h
    # measured with other work beside it: docs/training.md)
    # (AVX512-BF16): progressive resizing 96 -> 128 px (FFCV), evaluated at a larger size (FixRes),
    # label smoothing, no decay on BN/bias; every residual branch starts with its output after the
    # attention module at RMS 0.5 (branch_rms, LSUV-style): the same start whatever the module does
    # to its input's scale (chosen by a screen with SE as positive control:
    # docs/results/recipe-screen.md)
    "cpu": Recipe(epochs=20, batch_size=128, lr=0.25, momentum=0.9, nesterov=True, weight_decay=5e-5,
                  schedule="cosine", step_epochs=30, gamma=0.1, warmup_epochs=1.0, label_smoothing=0.1,
                  train_size=128, crop_scale_min=0.25, bf16=True, channels_last=True, accum_steps=1,
                  train_size_start=96, size_hold_epochs=4, bn_bias_decay=False, branch_rms=0.5),
}


def _convert(field: dataclasses.Field, text: str) -> Any:
    """``text`` as a value of ``field``'s type (bool, int, float or str)."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise TrainError(f"{field.name} needs true/false, got {text!r}")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def make_recipe(name: str, overrides: Sequence[str] = (), epochs: int | None = None) -> Recipe:
    """Preset ``name`` with ``key=value`` ``overrides`` (converted to each field's type) and then
    ``epochs`` applied. Raises :class:`TrainError` naming the valid presets or fields."""
    if name not in RECIPES:
        raise TrainError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise TrainError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            changes[key] = _convert(fields[key], value)
        except ValueError as e:
            raise TrainError(f"--set {item!r}: {e}") from e
    if epochs is not None:
        changes["epochs"] = epochs
    return dataclasses.replace(RECIPES[name], **changes)


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimisation step ``step`` (0-based, counted over the whole run):
    1) linear warm-up to ``lr`` over ``warmup_epochs``; then 2) ``step``: times ``gamma`` every
    ``step_epochs`` epochs, or 3) ``cosine``: half a cosine from ``lr`` to 0 at the last step."""
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** (step // steps_per_epoch // recipe.step_epochs)
    total = recipe.epochs * steps_per_epoch
    t = (step - warmup) / max(1, total - warmup)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def train_size_at(recipe: Recipe, epoch: int) -> int:
    """Crop size for epoch ``epoch`` (0-based): ``train_size``, or with ``train_size_start`` a
    linear ramp from it (first epoch) to ``train_size`` (epoch ``epochs - size_hold_epochs - 1``
    onwards), rounded to a multiple of 16 (oneDNN's and cuDNN's fastest shapes)."""
    if not recipe.train_size_start:
        return recipe.train_size
    last_ramp = recipe.epochs - recipe.size_hold_epochs - 1
    t = 1.0 if last_ramp <= 0 else min(1.0, epoch / last_ramp)
    size = recipe.train_size_start + t * (recipe.train_size - recipe.train_size_start)
    return max(16, int(round(size / 16)) * 16)


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that ``bn_bias_decay=False`` exempts from weight decay: normalisation
    weights and biases (every parameter with fewer than 2 dimensions: BN's, SkipInit's gains) and
    those a module names in its ``no_weight_decay`` attribute (SGE's per-group affine of a
    normalised score, BN's role there, shaped ``(1, G, 1, 1)``)."""
    ids = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        for name in getattr(module, "no_weight_decay", ()):
            ids.add(id(getattr(module, name)))
    return ids


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one, or with ``bn_bias_decay=False`` a second group
    without decay (:func:`no_decay_parameters`); with ``skip_init`` a last group of SkipInit's
    gains (no decay, ``lr_scale = skip_gain_lr``: the trainer sets each group's rate to the
    schedule's times its ``lr_scale``)."""
    gains = {id(m.skip_gain) for m in model.modules() if getattr(m, "skip_gain", None) is not None}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in gains]
    if recipe.bn_bias_decay:
        groups = [{"params": params, "weight_decay": recipe.weight_decay}]
    else:
        free = no_decay_parameters(model)
        groups = [{"params": [p for p in params if id(p) not in free], "weight_decay": recipe.weight_decay},
                  {"params": [p for p in params if id(p) in free], "weight_decay": 0.0}]
    if gains:
        groups.append({"params": [p for p in model.parameters() if id(p) in gains], "weight_decay": 0.0,
                       "lr_scale": recipe.skip_gain_lr})
    return groups
