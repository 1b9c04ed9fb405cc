"""SGE: Spatial Group-wise Enhance (Li, Hu, Yang, 2019)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_divisible

__all__ = ["SGE"]


class SGE(nn.Module):
    """Per group: similarity of each position to the group's mean feature, normalised over
    positions, per-group affine (``gamma`` init 0, ``beta`` init 1), sigmoid, scale.

    Input and output ``(B, C, H, W)``; ``C`` must be divisible by ``groups``.
    """

    def __init__(self, channels: int, groups: int = 64, eps: float = 1e-5) -> None:
        super().__init__()
        check_divisible(channels, groups, "SGE")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))  # gamma
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))  # beta

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        xg = x.reshape(b * self.groups, c // self.groups, h, w)
        t = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(dim=1).view(b, self.groups, h * w)
        t = t - t.mean(dim=2, keepdim=True)
        # Unbiased std as in the reference code; with a single position it would be NaN, so the
        # (then zero) deviation is divided by eps instead.
        std = t.std(dim=2, keepdim=True, correction=1 if h * w > 1 else 0)
        t = (t / (std + self.eps)).view(b, self.groups, h, w)
        gate = torch.sigmoid(t * self.weight + self.bias)
        return (xg * gate.view(b * self.groups, 1, h, w)).view(b, c, h, w)
