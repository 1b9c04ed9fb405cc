"""SE: Squeeze-and-Excitation (Hu, Shen, Sun, CVPR 2018)."""
from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_input, check_positive_int, check_reduction
from ._gates import GateRecorder

__all__ = ["SE"]


class SE(GateRecorder):
    """Channel gate ``x * sigmoid(W2 ReLU(W1 GAP(x)))``. Input and output ``(B, C, H, W)``.

    ``W1: C -> C/r``, ``W2: C/r -> C``, no biases (the ports whose counts the LGAM paper matches).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        hidden = check_reduction(channels, reduction, "SE")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.channels, "SE")
        b, c = x.shape[:2]
        w = self.fc(self.pool(x).view(b, c))  # squeeze, then excitation
        self._record(channel=w)
        return x * w.view(b, c, 1, 1)
