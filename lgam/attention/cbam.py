"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon, ECCV 2018), as its official
code builds it (github.com/Jongchan/attention-module): the spatial gate's 7x7 conv is followed by a
BatchNorm (momentum 0.01) whose scale starts at 0, so every spatial gate starts at a uniform 0.5.
The shared MLP has no biases (the official one has; without them ResNet18's count is the LGAM
paper's Table 4 figure, 11.27M on ImageNet-20, where the biases would make it 11.28M)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_input, check_positive_int, check_reduction
from ._gates import GateRecorder

__all__ = ["CBAM", "CBAMChannelGate", "CBAMSpatialGate"]


class CBAMChannelGate(nn.Module):
    """``sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))`` with one shared bias-free MLP; ``(B, C, 1, 1)``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = check_reduction(channels, reduction, "CBAM")
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        logits = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return torch.sigmoid(logits).view(b, c, 1, 1)


class CBAMSpatialGate(nn.Module):
    """``sigmoid(BN(conv7x7([max_c(x), mean_c(x)])))``, a ``(B, 1, H, W)`` map (conv without bias).

    ``bn=True`` is the official code's gate: BatchNorm2d(1, momentum=0.01) with scale and shift 0
    at initialisation (:meth:`reset_parameters`, which a backbone's init must not undo).
    ``bn=False`` is the gate as the paper's text describes it (how this library built CBAM before).
    """

    init_after_backbone = True  # a backbone's init (BN weight 1) would undo reset_parameters

    def __init__(self, kernel_size: int = 7, bn: bool = True) -> None:
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"CBAM: kernel_size must be odd to keep H x W, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if bn else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.bn is not None:
            nn.init.zeros_(self.bn.weight)  # the official init: every gate starts at sigmoid(0)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        logits = self.conv(pooled)
        return torch.sigmoid(logits if self.bn is None else self.bn(logits))


class CBAM(GateRecorder):
    """Channel gate then spatial gate, applied in sequence. Input and output ``(B, C, H, W)``."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, spatial_bn: bool = True) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.channel_gate = CBAMChannelGate(channels, reduction)
        self.spatial_gate = CBAMSpatialGate(kernel_size, bn=spatial_bn)
        conv = f"conv{kernel_size}x{kernel_size}([max_c, mean_c])"
        self.gate_description = (f"sigmoid({f'BN({conv})' if spatial_bn else conv}) of the "
                                 "channel-gated input")

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.channels, "CBAM")
        b, _, h, w = x.shape
        if self.training and self.spatial_gate.bn is not None and b * h * w == 1:
            raise ValueError("CBAM in train mode needs more than one value for its spatial BatchNorm: "
                             "one image of 1 x 1 positions has one; call .eval() or pass 2 images or more")
        channel = self.channel_gate(x)
        x = x * channel
        spatial = self.spatial_gate(x)
        self._record(spatial=spatial, channel=channel.flatten(1))
        return x * spatial
