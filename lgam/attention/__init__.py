"""Attention modules, one file each, and a small registry keyed by short names."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from ._gates import GateRecorder, attention_gates, capture_gates, stage_gate, stage_of
from .bam import BAM
from .cbam import CBAM
from .lgam import LGAM, fused_kernels, fused_kernels_enabled, fused_kernels_setting, lgam_reference, set_fused_kernels
from .se import SE
from .sge import SGE

__all__ = ["BAM", "CBAM", "LGAM", "SE", "SGE", "ATTENTION", "attention_placement", "create_attention",
           "fuses_residual", "residual_tail",
           "lgam_reference", "fused_kernels", "fused_kernels_enabled", "fused_kernels_setting",
           "set_fused_kernels",
           "GateRecorder", "attention_gates", "capture_gates", "stage_gate", "stage_of"]

#: short name -> constructor taking ``channels`` (the names used in model names, e.g. ``resnet18_se``)
ATTENTION: dict[str, Callable[[int], nn.Module]] = {
    "se": SE,
    "sge": SGE,
    "cbam": CBAM,
    "bam": BAM,
    "lgam": LGAM,
    "lgam_g32": partial(LGAM, groups=32, reduction=2),
}


def create_attention(name: str | None, channels: int, **kwargs) -> nn.Module:
    """Build attention module ``name`` for ``channels`` channels; ``None`` gives ``nn.Identity``."""
    if name is None:
        return nn.Identity()
    try:
        factory = ATTENTION[name]
    except KeyError:
        raise ValueError(
            f"unknown attention {name!r}; choose one of {sorted(ATTENTION)} or None"
        ) from None
    return factory(channels, **kwargs)


def fuses_residual(attention: nn.Module) -> bool:
    """Whether ``attention(x, residual=identity)`` returns a residual block's output
    ``ReLU(attention(x) + identity)`` itself (LGAM, which then does it in the same pass over the
    map where its op runs)."""
    return getattr(attention, "fuses_residual", False)


def residual_tail(attention: nn.Module, x: Tensor, identity: Tensor, gain: Tensor | None = None) -> Tensor:
    """A residual block's output from its branch ``x`` and ``identity``, both ``(B, C, H, W)``:
    ``ReLU(attention(x) + identity)``, by the module itself where it :func:`fuses_residual`; with a
    scalar ``gain`` (SkipInit's alpha, De & Smith 2020) ``ReLU(gain * attention(x) + identity)``."""
    if gain is not None:
        return torch.relu_(torch.addcmul(identity, attention(x), gain))
    if fuses_residual(attention):
        return attention(x, residual=identity)
    return torch.relu_(attention(x) + identity)


def attention_placement(name: str) -> str:
    """Where attention ``name`` goes in a backbone: ``"block"`` or ``"stage"`` (the module class's
    ``placement``)."""
    factory = ATTENTION[name]
    return getattr(factory, "func", factory).placement
