"""Argument checks shared by the attention modules: one clear ``ValueError`` per mistake."""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    """``value`` as an ``int`` (NumPy's integers too, as ``nn.Linear`` takes them); a bool, a
    float or a value below ``minimum`` is a ``ValueError``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return number


def check_input(x: Tensor, channels: int, module: str) -> None:
    """A ``ValueError`` naming the expected shape unless ``x`` is ``(B, channels, H, W)``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{module} expects (B, {channels}, H, W) input, got {tuple(x.shape)}")


def check_batch(x: Tensor, training: bool, module: str) -> None:
    """A ``ValueError`` for one image in train mode, for the modules whose BatchNorm1d normalises
    pooled vectors over the batch (torch's own message names neither the module nor the fix)."""
    if training and x.shape[0] == 1:  # none is fine: an empty batch gives an empty batch
        raise ValueError(f"{module} in train mode needs at least 2 images a batch (its BatchNorm1d "
                         "normalises pooled vectors over the batch): call .eval() for one image")


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
