"""LGAM's fused path: eqs (1)-(7) as plain tensor ops for ``torch.compile`` to fuse.

The eager path (:class:`~lgam.attention.lgam.MixAndGate`) needs a pass over the map per op: the
GAP, the mixing product, ``S``, the gate and the output each read or write a full-size tensor. Per
position, though, eqs (4)-(7) need only that position's ``C`` values: with the ladder unrolled over
the groups, Inductor compiles them into two loops over the map after the GAP's read (``S``: one
read; ``A''``: one read, one write), and recomputes them in the backward
(``torch.utils.checkpoint``) instead of storing float32 intermediates. ``C' = C/G``; the map is
viewed as rows ``(B, HW, G, C')`` (channels_last input) or ``(B, G, C', HW)`` (contiguous input).

:class:`~lgam.attention.lgam.LGAM` takes this path where Inductor can build kernels
(:func:`set_fused_kernels`); :func:`lgam_fused` is the uncompiled formulation (an outer
``torch.compile`` of a whole model inlines it).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sysconfig
import threading
import warnings
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._checks import is_channels_last

if TYPE_CHECKING:
    from .lgam import LGAM

__all__ = ["compiler_missing", "fused_kernels", "fused_kernels_enabled", "fused_kernels_setting",
           "lgam_fused", "set_fused_kernels"]

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


def mix_and_gate(a: Tensor, p: Tensor, inv_prev: Tensor, v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Eqs (4)-(7) per position on the map ``A`` grouped along ``dim``: rows ``(B, HW, G, C')``
    (``dim=2``) or ``(B, G, C', HW)`` (``dim=1``), with :func:`ladder_weights` ``(B, G, C')``
    -> ``A''`` in ``A``'s layout and dtype, and eq (5)'s ``S`` (``(B, HW, 1)`` or ``(B, 1, HW)``);
    computed in ``v``'s dtype. ``M_spat`` is left to the caller, which needs it only to record it."""
    # 16-bit A meets float32 weights and is promoted inside the loops: no converted copy to store
    s = (a * _spread(v, dim)).sum((dim, dim + 1), keepdim=True).squeeze(dim)  # eq (5): A v = sum of A'
    m = torch.sigmoid(F.relu(s))  # eq (6)
    p, inv_prev = _spread(p, dim), _spread(inv_prev, dim)
    out, u = [], None
    for k in range(a.shape[dim]):
        x_k = a.select(dim, k)
        term = x_k * inv_prev.select(dim, k)
        u = term if u is None else u + term  # eq (4) unrolled: y_k = P_k sum_{j<=k} x_j / P_{j-1}
        out.append(torch.addcmul(x_k, u * p.select(dim, k), m).to(a.dtype))  # eq (7)
    return torch.stack(out, dim), s


def _spread(t: Tensor, dim: int) -> Tensor:
    """Per-sample weights ``(B, G, C')`` broadcast over the positions of a map grouped along ``dim``."""
    return t[:, None] if dim == 2 else t[..., None]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the group scales, their products and the pooled vectors: float32 for 16-bit
    input, else the input's own (a float64 module computes in float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lgam_fused(module: LGAM, x: Tensor) -> tuple[Tensor, Tensor]:
    """``module``'s eqs (1)-(7) on ``x (B, C, H, W)`` -> ``(A'' (B, C, H, W), S (B, 1, H, W))``,
    ``A''`` in ``x``'s memory format, ``S`` eq (5)'s channel sum (``M_spat = sigmoid(ReLU(S))``);
    float32 arithmetic for 16-bit ``x`` (float64 for float64)."""
    b, c, h, w = x.shape
    g = module.groups
    work = work_dtype(x.dtype)
    rows = is_channels_last(x)
    with torch.autocast(x.device.type, enabled=False):
        a = x.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g) if rows else x.reshape(b, g, c // g, h * w)
        pooled = a.mean(1 if rows else 3, dtype=work)  # eq (1), per group: (B, G, C')
        weights = module.channel_attention[0].bn.weight.dtype
        scales = module.group_scales(pooled.to(weights)).to(work)  # eqs (2)-(4) on pooled vectors
        out, s = checkpoint(mix_and_gate, a, *ladder_weights(scales), 2 if rows else 1, use_reentrant=False)
    out = out.view(b, h, w, c).permute(0, 3, 1, 2) if rows else out.view(b, c, h, w)
    return out, s.view(b, 1, h, w)


@functools.cache
def compiler_missing() -> str | None:
    """Why ``torch.compile`` cannot build CPU kernels here (no working C++ compiler, no Python
    headers for its bindings), or None."""
    include = sysconfig.get_paths().get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers (Python.h) in {include!r}"
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
        if self.setting is False or torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        if self.setting is True:
            return True
        if torch.compiler.is_compiling():  # inside a compiled model: plain ops, inlined
            return module.groups <= AUTO_MAX_GROUPS
        return (x.device.type == "cpu" and module.groups <= AUTO_MAX_GROUPS and self.broken is None
                and compiler_missing() is None)

    def run(self, module: LGAM, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """:func:`lgam_fused`, compiled; None where compiling failed in auto mode (warned once)."""
        if torch.compiler.is_compiling():
            return lgam_fused(module, x)
        try:
            fn = self.compiled()
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return fn(module, x)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if self.setting is True:
                raise
            cause = getattr(e, "inner_exception", None) or e
            self.broken = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
            warnings.warn(f"LGAM: torch.compile cannot build the fused kernels here ({self.broken}); "
                          "using the eager path (set_fused_kernels(False) silences this)", stacklevel=3)
            return None

    def compiled(self) -> Callable:
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(lgam_fused, dynamic=False)
            return self._compiled


FUSED = _Fused()


def set_fused_kernels(enabled: bool | None) -> None:
    """Run LGAM compiled (:mod:`lgam.attention._lgam_fused`): ``True`` always, ``False`` never, ``None`` (the default; env ``LGAM_FUSED=0/1`` sets the start value)
    on the CPU for ``G <= 8`` where ``torch.compile`` builds its kernels (a C++ compiler), falling
    back to the eager path with one warning where it cannot. Each new input shape, dtype and
    train/eval mode compiles once (seconds; about a minute for ``G = 32``)."""
    if enabled not in (True, False, None):
        raise ValueError(f"set_fused_kernels takes True, False or None (auto), got {enabled!r}")
    FUSED.setting = enabled
    FUSED.broken = None


@contextlib.contextmanager
def fused_kernels(enabled: bool | None) -> Iterator[None]:
    """:func:`set_fused_kernels` inside a ``with`` block, the previous setting restored after it."""
    before = FUSED.setting
    set_fused_kernels(enabled)
    try:
        yield
    finally:
        FUSED.setting = before


def fused_kernels_setting() -> str:
    """The setting in words, for run records: ``"on"``, ``"off"``, ``"auto"`` or ``"auto (eager
    here: <why>)"``."""
    if FUSED.setting is not None:
        return "on" if FUSED.setting else "off"
    why = FUSED.broken or compiler_missing()
    return f"auto (eager here: {why})" if why else "auto"


def fused_kernels_enabled(module: LGAM, x: Tensor) -> bool:
    """Whether ``module`` would take the fused path for input ``x`` now."""
    return FUSED.applies(module, x)
