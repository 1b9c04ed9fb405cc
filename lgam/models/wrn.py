"""Wide ResNet (Zagoruyko and Komodakis, 2016): WRN-depth-k with pre-activation blocks.

The attention module sits on the residual branch after its last conv, before the identity add.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attention import create_attention
from .resnet import (
    AttentionBackbone, check_num_classes, check_placement, init_weights, make_stages, make_stem, skip_gain,
)

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with attention before the add. ``(B, C, H, W)``."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        dropout: float = 0.0,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.attention = create_attention(attention, planes, **(attention_kwargs or {}))
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )
        self.skip_gain = skip_gain(skip_init)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        out = self.attention(out)
        return out + identity if self.skip_gain is None else torch.addcmul(identity, out, self.skip_gain)


class WideResNet(AttentionBackbone):
    """WRN-``depth``-``widen``. Input ``(B, 3, H, W)``, output ``(B, num_classes)``.

    ``layer1..layer3`` hold the three groups (widths ``16k, 32k, 64k``); ``layer4`` is the final
    BN-ReLU so that ``model.layer4`` is, as in the ResNets, the last feature map before pooling.
    """

    zero_head_bias = True

    def __init__(
        self,
        depth: int = 16,
        widen: int = 10,
        num_classes: int = 100,
        stem: str = "cifar",
        dropout: float = 0.0,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        placement: str = "block",
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1, self.maxpool = make_stem(stem, 16)  # pre-activation: no BN-ReLU here
        block_att = attention if check_placement(placement) == "block" else None
        self.layer1, self.layer2, self.layer3 = make_stages(
            widths, n, 16, lambda cin, i, stride: WideBasicBlock(
                cin, widths[i], stride, dropout, block_att, attention_kwargs, skip_init))
        self._init_stage_attention(attention, placement, widths[:2], attention_kwargs)
        self.layer4 = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._init_head(widths[-1], num_classes)
        init_weights(self)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.conv1(x))

    def cam_target_layer(self) -> nn.Module:
        return self.layer4  # the final BN-ReLU
