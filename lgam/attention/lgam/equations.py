"""LGAM's eqs (1)-(7) as plain tensor ops: the readable definition, differentiated by autograd.

This is what :class:`~lgam.attention.lgam.LGAM` runs wherever its kernels do not (another device,
``set_fused_kernels(False)``, a float16 map) and what :mod:`.ops` runs in C++. Two rewrites of
the paper's loop (:func:`~lgam.attention.lgam.reference.lgam_reference`) make it fast:

- GAP is linear and ``M_k`` constant over positions, so the ladder (4) runs on pooled ``(B, C')``
  vectors: ``GAP(z_k) = GAP(x_k) + (1 + M_{k-1}) GAP(z_{k-1})`` (:func:`group_scales`);
- unrolled, ``y_k = P_k sum_{j<=k} x_j / P_{j-1}`` with ``P_k = (1 + M_1) ... (1 + M_k)``, and eq
  (5)'s channel sum is ``S = sum_j x_j v_j`` with ``v_j = sum_{k>=j} P_k / P_{j-1}``
  (:func:`ladder_weights`): per position, eqs (4)-(7) need that position's ``C`` values only
  (:func:`mix_and_gate`).

The group scales, their products and the pooled vectors are float32 for 16-bit maps (float64
for float64): the products reach ``1.5**G``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the pooled vectors, group scales and ladder weights for a map in ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def group_scales(attention: Sequence[Callable[[Tensor], Tensor]], pooled: Tensor) -> Tensor:
    """The group scales ``1 + M_k`` ``(B, G, C')`` from the pooled groups ``GAP(x_k)``
    ``(B, G, C')``, ``attention[k]`` being group ``k``'s eq (2). The ladder runs in ``pooled``'s
    dtype; each gate in its weights' (a module converted to 16 bits ran the ladder in 16 bits)."""
    scales: list[Tensor] = []
    s = pooled[:, 0]
    for k, gate in enumerate(attention):
        if k:
            s = pooled[:, k] + scales[-1] * s  # GAP of the ladder input x_k + y_{k-1}, eq (4)
        m = gate(s.to(_dtype_of(gate, s.dtype))).to(s.dtype)
        scales.append(1 + m)  # eq (3): M * z + z = (1 + M) z
    return torch.stack(scales, dim=1)


def _dtype_of(gate: Callable[[Tensor], Tensor], default: torch.dtype) -> torch.dtype:
    """The dtype of ``gate``'s weights (``default`` for a function or a module without any)."""
    params = gate.parameters() if isinstance(gate, torch.nn.Module) else iter(())
    return next((p.dtype for p in params if p.is_floating_point()), default)


def ladder_weights(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the group scales ``(B, G, C')``: ``P_k``, ``Q_k = 1 / P_{k-1}`` (``P_0 = 1``) and
    ``v_j = sum_{k>=j} P_k / P_{j-1}``, each ``(B, G, C')``. Products, not ``torch.cumprod``:
    its backward asks the host whether a value is zero (a device sync per module)."""
    p = [scales[:, 0]]
    for k in range(1, scales.shape[1]):
        p.append(p[-1] * scales[:, k])
    q = [torch.ones_like(p[0])] + [1 / pk for pk in p[:-1]]
    v, tail = [], torch.zeros_like(p[0])
    for k in reversed(range(len(p))):
        tail = tail + p[k]
        v.append(tail * q[k])
    return torch.stack(p, 1), torch.stack(q, 1), torch.stack(v[::-1], 1)


def mix_and_gate(x: Tensor, p: Tensor, q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs (4)-(7) on the map ``x (B, C, H, W)`` with :func:`ladder_weights` ``(B, G, C')`` ->
    ``(A''`` in ``x``'s dtype and memory format, ``S (B, 1, H, W)`` in the scales' dtype)."""
    b, c, h, w = x.shape
    a = x.unflatten(1, (p.shape[1], -1)).flatten(3)  # (B, G, C', HW): a view in either layout
    s = (a * v[..., None]).sum((1, 2))  # eq (5): S = sum_c A'_c = sum_j x_j v_j, (B, HW)
    m = torch.sigmoid(F.relu(s))[:, None, None]  # eq (6)
    y = (a * q[..., None]).cumsum(1) * p[..., None]  # eq (4): y_k = P_k sum_{j<=k} x_j / P_{j-1}
    out = torch.addcmul(a, y, m).to(x.dtype)  # eq (7): A'' = A' M_spat + A
    return out.flatten(1, 2).unflatten(2, (h, w)), s.view(b, 1, h, w)


def lgam_equations(attention: Sequence[Callable[[Tensor], Tensor]], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs (1)-(7) with group gates ``attention`` on ``x (B, C, H, W)``: ``(A'', S (B, 1, H, W),
    the group scales 1 + M_k (B, C))``."""
    b, c = x.shape[:2]
    groups = len(attention)
    work = work_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # no bf16 products of 1.5**G
        pooled = x.mean((2, 3), dtype=work).view(b, groups, c // groups)  # eq (1), per group
        scales = group_scales(attention, pooled)  # eqs (2)-(4)
        out, s = mix_and_gate(x, *ladder_weights(scales))
    return out, s, scales.view(b, c)
