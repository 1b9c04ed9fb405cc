"""LGAM's fused path: eqs (1)-(7) with one pass over the map each way, not one per op.

The eager path (:class:`~lgam.attention.lgam.MixAndGate`) needs a pass over the map per op: the
GAP, the mixing product, ``S``, the gate and the output each read or write a full-size tensor. Per
position, though, eqs (4)-(7) need only that position's ``C`` values. The fused path has two forms
of the same arithmetic:

- on the CPU, :func:`lgam_kernel`: LGAM's C++ kernels (:mod:`._lgam_kernel`, built on first use
  with the system's C++ compiler): the GAP, eqs (2)-(3) on the pooled vectors in one call, then
  ``S``, the gate and ``A''`` in one read and one write of the map, and the backward in one more;
  given a residual block's identity the block's tail ``ReLU(A'' + identity)`` is done in the same
  pass;
- inside a ``torch.compile`` of a model, :func:`lgam_fused`: the same steps as plain tensor ops
  (the ladder unrolled over the groups, the map viewed as rows ``(B, HW, G, C')`` for
  channels_last input or ``(B, G, C', HW)``), which Inductor fuses on any device.

:class:`~lgam.attention.lgam.LGAM` takes it where it applies (:func:`set_fused_kernels`).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._checks import is_channels_last
from ._lgam_kernel import KERNEL_DTYPES, MixAndGateKernel, SpatialMeanKernel, kernel_missing, scales_kernel

if TYPE_CHECKING:
    from .lgam import LGAM

__all__ = ["fused_kernels", "fused_kernels_enabled", "fused_kernels_setting", "lgam_fused",
           "lgam_kernel", "set_fused_kernels"]


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


def lgam_fused(module: LGAM, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``module``'s eqs (1)-(7) on ``x (B, C, H, W)`` -> ``(A'' (B, C, H, W), S (B, 1, H, W))``,
    ``A''`` in ``x``'s memory format (with a residual block's identity ``residual``: the block's
    output ``ReLU(A'' + residual)``), ``S`` eq (5)'s channel sum (``M_spat = sigmoid(ReLU(S))``);
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
    return out if residual is None else torch.relu(out + residual), s.view(b, 1, h, w)


def lgam_kernel(module: LGAM, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`lgam_fused` in LGAM's CPU kernels (:mod:`._lgam_kernel`): the GAP, eqs (2)-(3) on the
    pooled vectors (the module's own ops where the kernel does not take its weights), then eqs
    (4)-(7) and the block's tail in one pass over the map (and one back)."""
    b, c, h, w = x.shape
    g = module.groups
    work = work_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        pooled, x = SpatialMeanKernel.apply(x, work)  # eq (1), per group; x: a view of itself
        found = scales_kernel(module, pooled)  # eqs (2)-(4) in one kernel call

        if found is not None:
            scales, *weights = found
        else:
            param = module.channel_attention[0].bn.weight.dtype
            scales = module.group_scales(pooled.view(b, g, c // g).to(param)).to(work)  # eqs (2)-(4)
            with torch.no_grad():  # the kernel's backward gives the scales' gradient itself
                weights = [t.reshape(b, c) for t in ladder_weights(scales)]
        out, s = MixAndGateKernel.apply(x, residual, scales, *weights, g)
    return out, s.view(b, 1, h, w)


class _Fused:
    """Whether :class:`LGAM` takes the fused path (one per process)."""

    def __init__(self) -> None:
        env = os.environ.get("LGAM_FUSED", "").strip().lower()
        self.setting: bool | None = {"0": False, "1": True}.get(env)  # None: auto
        self.warned = False

    def applies(self, module: LGAM, x: Tensor) -> bool:
        if self.setting is False or torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        if torch.compiler.is_compiling():  # inside a compiled model: plain ops, inlined
            return True
        return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and self.kernels_ready()

    def kernels_ready(self) -> bool:
        """Whether the CPU kernels are built and loaded (building them on the first call); where
        they cannot be, an error when the fused path is forced on, else one warning (none where
        there is simply no compiler)."""
        why = kernel_missing()
        if why is None:
            return True
        if self.setting is True:
            raise RuntimeError(f"LGAM's fused kernels are on (set_fused_kernels(True) or LGAM_FUSED=1) "
                               f"but cannot be built here: {why}")
        if not self.warned and not why.startswith("no C++ compiler"):
            self.warned = True
            warnings.warn(f"LGAM: its CPU kernels cannot be built here ({why}); using the eager path "
                          "(set_fused_kernels(False) silences this)", stacklevel=4)
        return False

    def run(self, module: LGAM, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return lgam_fused(module, x, residual)
        return lgam_kernel(module, x, residual)


FUSED = _Fused()


def set_fused_kernels(enabled: bool | None) -> None:
    """Where LGAM takes its fused path (:mod:`lgam.attention._lgam_fused`): ``None`` (the default;
    env ``LGAM_FUSED=0/1`` sets the start value) for CPU input in bfloat16, float32 or float64
    where the kernels build (a C++ compiler; about two seconds, once per machine) and inside a
    ``torch.compile`` of the model, the eager path elsewhere; ``True`` the same, but an error
    where the kernels cannot be built; ``False`` never."""
    if enabled not in (True, False, None):
        raise ValueError(f"set_fused_kernels takes True, False or None (auto), got {enabled!r}")
    FUSED.setting = enabled


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
    why = kernel_missing()
    return f"auto (eager here: {why})" if why else "auto"


def fused_kernels_enabled(module: LGAM, x: Tensor) -> bool:
    """Whether ``module`` would take the fused path for input ``x`` now."""
    return FUSED.applies(module, x)
