"""LGAM: the Lightweight Group-wise Attention Module (Zhang, Li, Yang, 2020), eqs (1)-(7).

Input ``A (B, C, H, W)`` is split into ``G`` groups ``x_k`` of ``C' = C/G`` channels; the hidden
width is ``h = max(1, C' // r)``.

=====  ==========================================================================================
eq.    what it computes
=====  ==========================================================================================
(1)    ``s = GAP(z_k)``, ``(B, C')``: the group's input pooled over positions
(2)    ``M = sigmoid(ReLU(BN(MLP(s))))``, ``MLP = Linear(C', h) -> ReLU -> Linear(h, C')``, one MLP
       and one ``BatchNorm1d`` per group
(3)    ``F(z_k) = M * z_k + z_k = (1 + M) z_k``
(4)    the ladder: ``z_1 = x_1``, ``z_k = x_k + y_{k-1}``; ``y_k = F(z_k)``; ``A' = [y_1 ... y_G]``
(5)    ``S = sum over the C channels of A'``, ``(B, 1, H, W)``: a sum as written, not a mean
(6)    ``M_spat = sigmoid(ReLU(S))``: 0.5 wherever ``S <= 0``
(7)    ``A'' = A' * M_spat + A``
=====  ==========================================================================================

One file per idea: :mod:`.reference` (the loop above, the tests' oracle: read it first),
:mod:`.equations` (the same as plain tensor ops, fast), :mod:`.module` (the weights),
:mod:`.ops` (``torch.ops.lgam.lgam`` and its backward: the C++ kernels as registered ops),
:mod:`.kernels` (building them and the one checked call into them), :mod:`.dispatch` (the switch).

The paper states neither ``G`` nor ``r``: ``G=4, r=16`` is the default; ``G=32, r=2`` is the only
setting that reproduces every "+0.03M" of the paper's parameter tables (``lgam_g32`` models). As
written, the ladder scales group ``k`` by at least ``1.5**(k-1)``: with ``G=32`` activations grow by
~1e6 per module at initialisation; with ``G=4`` by ~4.
"""
from .dispatch import fused_kernels, fused_kernels_enabled, fused_kernels_setting, set_fused_kernels
from .module import LGAM, ChannelAttention
from .reference import lgam_reference

__all__ = ["LGAM", "ChannelAttention", "lgam_reference", "fused_kernels", "fused_kernels_enabled",
           "fused_kernels_setting", "set_fused_kernels"]
