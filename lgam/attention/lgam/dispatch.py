"""Which path :class:`~lgam.attention.lgam.LGAM` takes: the op (C++ kernels) or the equations.

The one switch is :func:`set_fused_kernels` (start value from ``LGAM_FUSED=0/1``): ``None``
(auto) takes the op for CPU maps in bfloat16, float32 or float64 where the kernels build,
``True`` the same but a build failure is an error, ``False`` never. The choice depends on the
module and its input only, never on whether the code is being compiled: eager and
``torch.compile`` run the same op.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from .equations import work_dtype
from .kernels import KERNEL_DTYPES, kernel_missing

if TYPE_CHECKING:
    from .module import LGAM

__all__ = ["fused_kernels", "fused_kernels_enabled", "fused_kernels_setting", "set_fused_kernels"]


def _env_setting(value: str) -> bool | None:
    """``LGAM_FUSED``: 0 (the equations), 1 (the kernels, or an error where they cannot build),
    unset or empty (auto); anything else is ignored, with a warning, rather than read as auto
    without a word."""
    value = value.strip().lower()
    if value not in ("", "0", "1"):
        warnings.warn(f"LGAM_FUSED={value!r} is not 0 or 1: ignored (the kernels where they build)",
                      stacklevel=2)
    return {"0": False, "1": True}.get(value)


_setting: bool | None = _env_setting(os.environ.get("LGAM_FUSED", ""))


@torch.compiler.assume_constant_result
def _kernels_missing() -> str:
    """Why the kernels are not here ("" if they are); a constant to ``torch.compile``."""
    return kernel_missing() or ""


def fused_kernels_enabled(module: LGAM, x: Tensor) -> bool:
    """Whether ``module`` takes the op (its C++ kernels) for input ``x``. Raises where the
    kernels are forced on and cannot be built."""
    if _setting is False or x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    why = _kernels_missing()
    if why:
        if _setting:
            raise RuntimeError(f"LGAM's fused kernels are on (set_fused_kernels(True) or LGAM_FUSED=1) "
                               f"but cannot run here: {why}")
        return False
    return module.kernels_apply(x, work_dtype(x.dtype))


def set_fused_kernels(enabled: bool | None) -> None:
    """Where LGAM runs its C++ kernels: ``None`` (auto; the default) where they build, ``True``
    the same with a build failure raised, ``False`` never (the plain tensor ops instead)."""
    global _setting
    if enabled not in (True, False, None):
        raise ValueError(f"set_fused_kernels takes True, False or None (auto), got {enabled!r}")
    _setting = enabled


@contextlib.contextmanager
def fused_kernels(enabled: bool | None) -> Iterator[None]:
    """:func:`set_fused_kernels` inside a ``with`` block, the previous setting restored after it."""
    before = _setting
    set_fused_kernels(enabled)
    try:
        yield
    finally:
        set_fused_kernels(before)


def fused_kernels_setting(device: torch.device | str = "cpu") -> str:
    """The setting on ``device`` in words, for run records: ``"on"``, ``"off"``, ``"auto"`` or
    ``"auto (eager here: <why>)"``."""
    if _setting is not None:
        return "on" if _setting else "off"
    why = kernel_missing() if torch.device(device).type == "cpu" else f"no LGAM kernels for {torch.device(device).type}"
    return f"auto (eager here: {why})" if why else "auto"
