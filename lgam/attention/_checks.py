"""Argument checks shared by the attention modules: one clear ``ValueError`` per mistake."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_divisible(channels: int, groups: int, module: str) -> None:
    check_positive_int("channels", channels)
    check_positive_int("groups", groups)
    if channels % groups:
        raise ValueError(
            f"{module}: channels={channels} is not divisible by groups={groups}; "
            f"pick groups from the divisors of {channels} (e.g. {_divisors_hint(channels)})"
        )


def check_reduction(width: int, reduction: int, module: str, what: str = "channels") -> int:
    """Return the hidden width ``width // reduction``; raise if ``reduction`` exceeds ``width``."""
    check_positive_int("reduction", reduction)
    if reduction > width:
        raise ValueError(
            f"{module}: reduction={reduction} is larger than the width it reduces "
            f"({what}={width}); use reduction <= {width}"
        )
    return width // reduction


def _divisors_hint(n: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(str(d) for d in divs[:8]) + (", ..." if len(divs) > 8 else "")


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x (B, C, H, W)`` is laid out channels_last (and not also plain contiguous, as
    tensors with C == 1 or H == W == 1 are): the modules then compute in that layout."""
    import torch

    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
