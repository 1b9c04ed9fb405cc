"""ResNet18/34 (He et al., 2016) with an attention slot, after torchvision's ``resnet.py``.

SE, SGE, CBAM and LGAM sit inside every ``BasicBlock`` after ``bn2``, before the identity add
(``placement="block"``); BAM sits on the outputs of ``layer1``-``layer3`` (``placement="stage"``).
``stem="imagenet"``: 7x7/2 conv + 3x3/2 max-pool; ``stem="cifar"``: 3x3/1 conv, no max-pool.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..attention import create_attention, residual_tail
from ..attention._checks import check_positive_int
from ..errors import UsageError

__all__ = ["AttentionBackbone", "BasicBlock", "ResNet", "check_stem", "check_placement"]

STEMS = ("imagenet", "cifar")
PLACEMENTS = ("block", "stage")


def check_stem(stem: str) -> str:
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    return stem


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return placement


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` as an int >= 0; 0 is timm's headless model (no classifier)."""
    return check_positive_int("num_classes", num_classes, minimum=0)


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0; then
    each module's own ``reset_parameters`` where it declares ``init_after_backbone`` (CBAM's spatial
    gate, whose BN starts at 0 in its official code)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    for m in model.modules():
        if getattr(m, "init_after_backbone", False):
            m.reset_parameters()


def make_stem(stem: str, out_channels: int) -> tuple[nn.Conv2d, nn.Module]:
    """``(conv1, maxpool)``: 7x7/2 conv + 3x3/2 max-pool (``imagenet``) or 3x3/1 conv (``cifar``)."""
    if check_stem(stem) == "imagenet":
        return nn.Conv2d(3, out_channels, 7, 2, padding=3, bias=False), nn.MaxPool2d(3, 2, padding=1)
    return nn.Conv2d(3, out_channels, 3, 1, padding=1, bias=False), nn.Identity()


def make_stages(
    widths: Sequence[int], depth: int, in_channels: int, block: Callable[[int, int, int], nn.Module]
) -> list[nn.Sequential]:
    """One ``nn.Sequential`` of ``depth`` blocks per entry of ``widths`` (the CIFAR-style WRN and
    ResNeXt stages). ``block(in_channels, stage, stride)`` builds one block; the first block of
    every stage but the first has stride 2."""
    stages = []
    for i, width in enumerate(widths):
        blocks = []
        for j in range(depth):
            blocks.append(block(in_channels, i, 2 if (i > 0 and j == 0) else 1))
            in_channels = width
        stages.append(nn.Sequential(*blocks))
    return stages


def skip_gain(enabled: bool) -> nn.Parameter | None:
    """SkipInit's scalar ``alpha`` (De & Smith, 2020) for the end of a residual branch, after its
    attention module, initialised to 0: the block starts as the identity while the branch, its
    attention module included, sees its normal input (unlike :func:`zero_init_residual`, whose
    zero BN scale feeds the attention module zeros). ``None`` when not ``enabled``."""
    return nn.Parameter(torch.zeros(())) if enabled else None


class AttentionBackbone(nn.Module):
    """Shared skeleton: stem -> ``layer1..layer4`` -> global average pool -> ``fc``.

    With ``placement="stage"`` an attention module follows each of the given stages
    (``stage_attention[i]`` after ``layer{i+1}``; BAM's placement). ``model.layer4`` is always the
    last feature map before pooling (the Grad-CAM target).
    """

    def _init_stage_attention(
        self, attention: str | None, placement: str, channels: list[int], kw: dict | None
    ) -> None:
        self.stage_attention: nn.ModuleList | None = None
        if check_placement(placement) == "stage" and attention is not None:
            modules = [create_attention(attention, c, **(kw or {})) for c in channels]
            self.stage_attention = nn.ModuleList(modules + [nn.Identity()] * (4 - len(modules)))

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def cam_target_layer(self) -> nn.Module:
        """The module whose output is the last feature map, ``forward_features``' result: the
        Grad-CAM target layer (pytorch-grad-cam's ``target_layers=[...]``)."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``layer4`` output ``(B, C, h, w)``."""
        x = self.forward_stem(x)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if self.stage_attention is not None:
                x = self.stage_attention[i](x)
        return x

    #: WRN's official code starts its classifier's bias at 0
    zero_head_bias: bool = False

    def _init_head(self, num_features: int, num_classes: int) -> None:
        """``fc``: a linear classifier, or ``nn.Identity`` for ``num_classes=0`` (timm's headless
        model: ``forward`` returns the pooled ``(B, num_features)`` features)."""
        self.num_features, self.num_classes = num_features, num_classes
        self.fc = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()
        if num_classes and self.zero_head_bias:
            nn.init.zeros_(self.fc.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier, ``fc`` (timm's name for it)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none), freshly initialised, on the model's
        device and dtype, as timm's ``reset_classifier``; ``model_kwargs`` follows, so the model
        still rebuilds and saves as what it now is. ``global_pool``: timm's argument; these models
        pool by average only (``None`` or ``"avg"``); for the unpooled ``(B, C, h, w)`` features,
        call ``forward_features``."""
        if global_pool not in (None, "avg"):
            raise UsageError(f"global_pool must be None or 'avg' (the average pool these models have), "
                             f"got {global_pool!r}: forward_features(x) gives the unpooled (B, C, h, w) features")
        num_classes = check_num_classes(num_classes)
        ref = next(self.parameters())
        self._init_head(self.num_features, num_classes)
        self.fc.to(device=ref.device, dtype=ref.dtype)
        if isinstance(getattr(self, "model_kwargs", None), dict):
            self.model_kwargs["num_classes"] = num_classes

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, C, h, w)`` features -> ``(B, num_classes)`` logits; ``pre_logits=True``: the pooled
        ``(B, num_features)`` features the classifier takes."""
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``attention`` acts on the residual branch after ``bn2``; with ``skip_init``
    the branch ends in a zero-initialised scalar gain (:func:`skip_gain`). ``(B, C, H, W)``."""

    expansion = 1
    residual_bn = "bn2"  # the branch's last BN (see zero_init_residual)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attention = create_attention(attention, planes, **(attention_kwargs or {}))
        self.downsample = downsample
        self.skip_gain = skip_gain(skip_init)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return residual_tail(self.attention, self.bn2(self.conv2(out)), identity, self.skip_gain)


class ResNet(AttentionBackbone):
    """ResNet with BasicBlocks. Input ``(B, 3, H, W)``, output logits ``(B, num_classes)``.

    Attributes follow torchvision (``conv1 bn1 relu maxpool layer1..layer4 avgpool fc``), so
    ``model.layer4`` is the Grad-CAM target and torchvision-style code works unchanged.
    """

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 1000,
        stem: str = "imagenet",
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        placement: str = "block",
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        self.skip_init = skip_init
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        self.inplanes = 64
        self.conv1, self.maxpool = make_stem(stem, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        block_att = attention if check_placement(placement) == "block" else None
        kw = attention_kwargs
        self.layer1 = self._make_layer(64, layers[0], 1, block_att, kw)
        self.layer2 = self._make_layer(128, layers[1], 2, block_att, kw)
        self.layer3 = self._make_layer(256, layers[2], 2, block_att, kw)
        self.layer4 = self._make_layer(512, layers[3], 2, block_att, kw)
        self._init_stage_attention(attention, placement, [64, 128, 256], kw)  # not after layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._init_head(512 * BasicBlock.expansion, num_classes)
        init_weights(self)

    def _make_layer(
        self, planes: int, blocks: int, stride: int, attention: str | None, kw: dict | None
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, attention, kw, self.skip_init)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, 1, None, attention, kw, self.skip_init) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def cam_target_layer(self) -> nn.Module:
        return self.layer4[-1]
