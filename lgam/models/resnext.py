"""ResNeXt-29 for CIFAR (Xie et al., 2017): three stages of three bottleneck blocks.

``cardinality x base_width`` (e.g. 32x4d) sets the grouped 3x3 conv's width in the first stage
(``cardinality * base_width``, doubled each stage); block outputs are 256, 512, 1024 channels.
The attention module sits after ``bn3``, before the identity add.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..attention import create_attention, residual_tail
from .resnet import (
    AttentionBackbone, check_num_classes, check_placement, conv1x1, init_weights, make_stages,
    make_stem, skip_gain,
)

__all__ = ["ResNeXtBottleneck", "ResNeXt"]


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> grouped 3x3 -> 1x1 expand, attention after ``bn3``. ``(B, C, H, W)``."""

    residual_bn = "bn3"  # the branch's last BN (see zero_init_residual)

    def __init__(
        self,
        inplanes: int,
        width: int,
        outplanes: int,
        cardinality: int,
        stride: int = 1,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.attention = create_attention(attention, outplanes, **(attention_kwargs or {}))
        self.downsample = None
        if stride != 1 or inplanes != outplanes:
            self.downsample = nn.Sequential(
                conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes)
            )
        self.skip_gain = skip_gain(skip_init)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return residual_tail(self.attention, self.bn3(self.conv3(out)), identity, self.skip_gain)


class ResNeXt(AttentionBackbone):
    """ResNeXt-``depth`` (``cardinality x base_width d``). ``(B, 3, H, W)`` -> ``(B, num_classes)``.

    ``layer1..layer3`` are the three stages; ``layer4`` is an identity kept so that, as in the
    ResNets, ``model.layer4`` is the last feature map before pooling.
    """

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 32,
        base_width: int = 4,
        num_classes: int = 100,
        stem: str = "cifar",
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        placement: str = "block",
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if (depth - 2) % 9 or depth < 11:
            raise ValueError(f"ResNeXt depth must be 9n+2 with n >= 1 (11, 20, 29, ...), got {depth}")
        n = (depth - 2) // 9
        self.conv1, self.maxpool = make_stem(stem, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        block_att = attention if check_placement(placement) == "block" else None
        outs = (256, 512, 1024)
        self.layer1, self.layer2, self.layer3 = make_stages(
            outs, n, 64, lambda cin, i, stride: ResNeXtBottleneck(
                cin, cardinality * base_width * 2**i, outs[i], cardinality, stride, block_att,
                attention_kwargs, skip_init))
        self._init_stage_attention(attention, placement, list(outs[:2]), attention_kwargs)
        self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._init_head(outs[-1], num_classes)
        init_weights(self)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def cam_target_layer(self) -> nn.Module:
        return self.layer3[-1]  # layer4 is an identity
