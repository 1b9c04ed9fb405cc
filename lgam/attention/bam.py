"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_batch, check_input, check_positive_int, check_reduction
from ._gates import GateRecorder

__all__ = ["BAM", "BAMChannelGate", "BAMSpatialGate"]


class BAMChannelGate(nn.Module):
    """``Mc``: GAP -> Linear(C, C/r) -> BN -> ReLU -> Linear(C/r, C); ``(B, C, 1, 1)`` logits."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        return self.mlp(x.mean(dim=(2, 3))).view(b, c, 1, 1)


class BAMSpatialGate(nn.Module):
    """``Ms``: 1x1 reduce -> 2 x (3x3 conv, dilation d) -> 1x1 to one channel; ``(B, 1, H, W)``."""

    def __init__(self, channels: int, hidden: int, dilation: int = 4, num_convs: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        ]
        for _ in range(num_convs):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BAM(GateRecorder):
    """``F + F * sigmoid(Mc(F) + Ms(F))``. Input and output ``(B, C, H, W)``.

    The branches are the official code's (Jongchan/attention-module): BatchNorm inside each, none
    at their outputs (the paper's equations end both in a BN), and PyTorch's default bias init
    (the official code zeroes the biases). ``combine="sum"`` (the default) adds them as the
    paper's equation does; the official code multiplies ``Mc * Ms`` instead, available as
    ``combine="product"``. So the default is neither source exactly: the official branches under
    the paper's combination.
    """

    placement = "stage"  # the BAM paper puts it at the bottlenecks between stages
    gate_description = "sigmoid(Mc + Ms) averaged over channels"

    def __init__(
        self, channels: int, reduction: int = 16, dilation: int = 4, combine: str = "sum"
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        check_positive_int("dilation", dilation)
        if combine not in ("sum", "product"):
            raise ValueError(f"BAM: combine must be 'sum' or 'product', got {combine!r}")
        hidden = check_reduction(channels, reduction, "BAM")
        self.combine = combine
        self.channel_gate = BAMChannelGate(channels, hidden)
        self.spatial_gate = BAMSpatialGate(channels, hidden, dilation)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.channels, "BAM")
        check_batch(x, self.training, "BAM")
        mc, ms = self.channel_gate(x), self.spatial_gate(x)
        gate = torch.sigmoid(mc + ms if self.combine == "sum" else mc * ms)  # (B, C, H, W)
        if self.record_gates:
            self._record(spatial=gate.mean(dim=1, keepdim=True), spatial_logits=ms)
        return x + x * gate
