"""LGAM's fused path: eqs (1)-(7) as plain tensor ops on channels_last rows, for ``torch.compile``.

The eager path (:class:`~lgam.attention.lgam.MixAndGate`) needs a pass over the map per op: the
GAP, the mixing product, ``S``, the gate and the output each read or write a full-size tensor. Per
position, though, eqs (4)-(7) need only that position's ``C`` values: with the ladder unrolled over
the groups, Inductor compiles them into one loop over the map (one read, one write) after the GAP's
(one read), and recomputes them in the backward (``torch.utils.checkpoint``) instead of storing
float32 intermediates. ``C' = C/G``; rows are ``(B, HW, G, C')``, a view of channels_last input.

:class:`~lgam.attention.lgam.LGAM` takes this path for channels_last input where Inductor can build
kernels (:func:`set_fused_kernels`); :func:`lgam_fused` is the uncompiled formulation (an outer
``torch.compile`` of a whole model inlines it).
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._checks import is_channels_last

if TYPE_CHECKING:
    from .lgam import LGAM

__all__ = ["compiler_missing", "fused_kernels_enabled", "lgam_fused", "set_fused_kernels"]

#: recompilations allowed for the compiled path: one graph per (shape, dtype, G, train/eval, grad)
RECOMPILE_LIMIT = 64
#: the most groups auto mode compiles: the unrolled ladder of G=32 takes ~1 min per shape to build
AUTO_MAX_GROUPS = 8


def ladder_weights(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the group scales ``1 + M_k`` ``(B, G, C')``: ``P_k = (1 + M_1) ... (1 + M_k)``,
    ``1 / P_{k-1}`` (``P_0 = 1``) and ``v_j = sum_{k >= j} P_k / P_{j-1}``, each ``(B, G, C')``.

    ``v`` weighs the input in eq (5): ``S = sum_c A'_c = sum_j A_j v_j`` (the ladder unrolled).
    """
    p = [scales[:, 0]]
    for k in range(1, scales.shape[1]):
        p.append(p[-1] * scales[:, k])
    inv_prev = [torch.ones_like(p[0])] + [1 / q for q in p[:-1]]
    v, tail = [], None
    for k in reversed(range(len(p))):
        tail = p[k] if tail is None else tail + p[k]
        v.append(tail * inv_prev[k])
    return torch.stack(p, 1), torch.stack(inv_prev, 1), torch.stack(v[::-1], 1)


def mix_and_gate(rows: Tensor, p: Tensor, inv_prev: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs (4)-(7) per position: rows ``A (B, HW, G, C')`` and :func:`ladder_weights` ->
    ``(A'' (B, HW, G, C')`` in ``A``'s dtype, ``M_spat (B, HW, 1)``), computed in ``v``'s dtype."""
    x = rows.to(v.dtype)
    s = (x * v[:, None]).sum((2, 3))  # eq (5): S = sum over channels of A'
    m = torch.sigmoid(F.relu(s))[:, :, None]  # eq (6)
    out, u = [], None
    for k in range(rows.shape[2]):
        term = x[:, :, k] * inv_prev[:, None, k]
        u = term if u is None else u + term  # eq (4) unrolled: y_k = P_k sum_{j<=k} x_j / P_{j-1}
        out.append(torch.addcmul(x[:, :, k], u * p[:, None, k], m).to(rows.dtype))  # eq (7)
    return torch.stack(out, 2), m


def lgam_fused(module: LGAM, x: Tensor) -> tuple[Tensor, Tensor]:
    """``module``'s eqs (1)-(7) on ``x (B, C, H, W)`` -> ``(A'' (B, C, H, W), M_spat (B, 1, H, W))``,
    ``A''`` channels_last; float32 arithmetic for 16-bit ``x`` (float64 for float64)."""
    b, c, h, w = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, module.groups, c // module.groups)
        pooled = rows.mean(1, dtype=work)  # eq (1), per group: (B, G, C')
        weights = module.channel_attention[0].bn.weight.dtype
        scales = module.group_scales(pooled.to(weights)).to(work)  # eqs (2)-(4) on pooled vectors
        out, m = checkpoint(mix_and_gate, rows, *ladder_weights(scales), use_reentrant=False)
    return out.view(b, h, w, c).permute(0, 3, 1, 2), m.view(b, 1, h, w)


@functools.cache
def compiler_missing() -> str | None:
    """Why ``torch.compile`` cannot build CPU kernels here (no working C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - any failure means no fused kernels, said why
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


class _Fused:
    """Whether and how :class:`LGAM` runs :func:`lgam_fused` compiled (one per process)."""

    def __init__(self) -> None:
        env = os.environ.get("LGAM_FUSED", "").strip().lower()
        self.setting: bool | None = {"0": False, "1": True}.get(env)  # None: auto
        self.broken: str | None = None  # why compiling failed here (auto mode then stays eager)
        self._compiled: Callable | None = None
        self._lock = threading.Lock()

    def applies(self, module: LGAM, x: Tensor) -> bool:
        if self.setting is False or not is_channels_last(x):
            return False
        if torch.compiler.is_compiling():
            return True  # inside a compiled model: plain ops, inlined
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        if self.setting is True:
            return True
        return (x.device.type == "cpu" and module.groups <= AUTO_MAX_GROUPS and self.broken is None
                and compiler_missing() is None)

    def run(self, module: LGAM, x: Tensor) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return lgam_fused(module, x)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self.compiled()(module, x)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if self.setting is True:
                raise
            cause = getattr(e, "inner_exception", None) or e
            self.broken = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
            warnings.warn(f"LGAM: torch.compile cannot build the fused kernels here ({self.broken}); "
                          "using the eager path (set_fused_kernels(False) silences this)", stacklevel=3)
            return module.forward_eager(x)

    def compiled(self) -> Callable:
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(lgam_fused, dynamic=False)
            return self._compiled


FUSED = _Fused()


def set_fused_kernels(enabled: bool | None) -> None:
    """Run LGAM compiled (:mod:`lgam.attention._lgam_fused`) for channels_last input: ``True``
    always, ``False`` never, ``None`` (the default; env ``LGAM_FUSED=0/1`` sets the start value)
    on the CPU for ``G <= 8`` where ``torch.compile`` builds its kernels (a C++ compiler), falling
    back to the eager path with one warning where it cannot. Each new input shape, dtype and
    train/eval mode compiles once (seconds; about a minute for ``G = 32``)."""
    if enabled not in (True, False, None):
        raise ValueError(f"set_fused_kernels takes True, False or None (auto), got {enabled!r}")
    FUSED.setting = enabled
    FUSED.broken = None


def fused_kernels_enabled(module: LGAM, x: Tensor) -> bool:
    """Whether ``module`` would take the fused path for input ``x`` now."""
    return FUSED.applies(module, x)
