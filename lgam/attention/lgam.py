"""LGAM: the Lightweight Group-wise Attention Module (Zhang, Li, Yang, 2020), eqs (1)-(7).

Read :func:`lgam_reference` first: it is these equations transcribed line by line (and the tests'
oracle); :class:`LGAM` computes the same thing fast. Input ``A (B, C, H, W)`` is split into ``G``
groups ``x_k`` of ``C' = C/G`` channels; the hidden width is ``h = C' // r``.

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

The paper states neither ``G`` nor ``r``: ``G=4, r=16`` is the default; ``G=32, r=2`` is the only
setting that reproduces every "+0.03M" of the paper's parameter tables (``lgam_g32`` models). As
written, the ladder scales group ``k`` by at least ``1.5**(k-1)``: with ``G=32`` activations grow by
~1e6 per module at initialisation (a fresh ``resnet18_lgam_g32`` overflows float32 in eval mode
until its BatchNorm statistics are those of real activations); with ``G=4`` by ~4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_divisible, check_reduction, is_channels_last
from ._gates import GateRecorder

__all__ = ["LGAM", "ChannelAttention", "lgam_reference"]


class ChannelAttention(nn.Module):
    """``F_chan``'s weights for one group: pooled ``s (B, C')`` -> ``M (B, C')``, eq (2).

    ``M = sigmoid(ReLU(BN(MLP(s))))`` with ``MLP = Linear(C', h) -> ReLU -> Linear(h, C')``.
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width)
        )
        self.bn = nn.BatchNorm1d(width)

    def forward(self, s: Tensor) -> Tensor:
        return torch.sigmoid(F.relu(self.bn(self.mlp(s))))  # eq (2)


class LGAM(GateRecorder):
    """Lightweight Group-wise Attention Module. Input and output ``(B, C, H, W)``.

    Args:
        channels: ``C``, the number of input channels.
        groups: ``G``; ``C`` must be divisible by it. The paper does not state it: the default
            ``G=4`` keeps activations bounded (the ladder scales group ``k`` by ``>=1.5**(k-1)``);
            ``G=32, r=2`` reproduces the paper's parameter counts (see the module docstring).
        reduction: ``r``; the hidden width of each group's MLP is ``C' // r``.

    The ladder (4) is sequential across groups, but GAP is linear and ``M_k`` is constant over
    positions, so the recurrence runs on pooled ``(B, C')`` vectors and the full-resolution output
    is a per-sample mixing of channels, ``A' = A T``, computed as matrix products (no loop over
    full-size tensors; see ``forward``). :func:`lgam_reference` is the direct transcription used
    as the test oracle: read it first.
    """

    gate_description = "M_spat = sigmoid(ReLU(sum over channels of A')), eqs (5)-(6)"

    def __init__(self, channels: int, groups: int = 4, reduction: int = 16) -> None:
        super().__init__()
        check_divisible(channels, groups, "LGAM")
        width = channels // groups
        hidden = check_reduction(width, reduction, "LGAM", what="channels per group C/G")
        self.channels, self.groups, self.reduction = channels, groups, reduction
        self.channel_attention = nn.ModuleList(
            ChannelAttention(width, hidden) for _ in range(groups)
        )
        # a constant, not a weight: follows .to(device) but stays out of the state_dict
        self.register_buffer("ladder", ladder_matrix(groups, width), persistent=False)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, reduction={self.reduction}"

    def group_scales(self, pooled: Tensor) -> Tensor:
        """Per-group channel scales ``1 + M_k`` from the pooled groups ``GAP(x_k)``.

        ``pooled`` is ``(B, G, C')``; returns ``(B, G, C')``. Runs the ladder on pooled vectors:
        ``GAP(x_k + y_{k-1}) = GAP(x_k) + (1 + M_{k-1}) * GAP(x_{k-1} + y_{k-2})``.
        """
        scales = []
        s = pooled[:, 0]
        for k, attention in enumerate(self.channel_attention):
            if k:
                s = pooled[:, k] + scales[-1] * s  # GAP of the ladder input x_k + y_{k-1}, eq (4)
            scales.append(1 + attention(s))  # eq (3): M * x + x = (1 + M) * x
        return torch.stack(scales, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"LGAM expects (B, {self.channels}, H, W) input, got {tuple(x.shape)}"
            )
        b, c = x.shape[:2]
        work = _work_dtype(x.dtype)
        pooled = SpatialMean.apply(x, work).view(b, self.groups, -1)  # eq (1), per group
        with torch.autocast(x.device.type, enabled=False):  # their products reach 1.5**G: no bf16
            weights = self.channel_attention[0].bn.weight.dtype  # float32 unless .bfloat16()/.half()
            # eqs (2)-(4) on pooled vectors: the group scales 1 + M_k
            group_scale = self.group_scales(pooled.to(weights)).to(work)
        # Ladder (4) unrolled: y_k = (1 + M_k)(x_k + y_{k-1}) = P_k * sum_{j<=k} x_j / P_{j-1}, with
        # P_k = (1 + M_1) ... (1 + M_k), P_0 = 1 (kept in float32 or float64: they grow like
        # 1.5**k). In matrix form A' = A T over channels, T = diag(1/P_{k-1}) L diag(P_k),
        # L = self.ladder (0/1).
        p = torch.cumprod(group_scale, dim=1)  # (B, G, C')
        p_prev = torch.cat([torch.ones_like(p[:, :1]), p[:, :-1]], dim=1).view(b, c)
        p = p.view(b, c)
        h, w = x.shape[2:]
        if h * w >= c:  # T per sample, with a last column T 1 for eq (5)'s channel sum
            t = (1 / p_prev)[:, :, None] * self.ladder.to(work) * p[:, None, :]
            out, m_spat = MixAndGate.apply(x, torch.cat([t, t.sum(2, keepdim=True)], 2))
            self._record(spatial=m_spat)
            return out
        # few positions (the last stages): scale, then one product with the constant L
        q = x * (1 / p_prev).view(b, c, 1, 1).to(x.dtype)
        y = channel_matmul(q, self.ladder.to(x.dtype)) * p.view(b, c, 1, 1).to(x.dtype)  # A'
        ones = torch.ones(c, 1, dtype=x.dtype, device=x.device)
        m_spat = torch.sigmoid(F.relu(channel_matmul(y, ones)))  # eqs (5), (6): sum over channels
        self._record(spatial=m_spat)
        return torch.addcmul(x, y, m_spat.to(y.dtype)).to(x.dtype)  # eq (7): A' M_spat + A


class MixAndGate(torch.autograd.Function):
    """Eqs (5)-(7) from a per-sample channel mixing: ``forward(A (B, C, H, W), T (B, C, C+1))
    -> (A'', M_spat)`` (``M_spat (B, 1, H, W)`` returned for inspection, not differentiable).

    ``[A' | S] = A T`` (one batched matrix product: ``A'`` and the channel sum ``S`` of eq (5)),
    ``M_spat = sigmoid(ReLU(S))`` (eq (6)), ``A'' = A' M_spat + A`` (eq (7)), in ``A``'s dtype and
    memory format. The backward is two more products (``dA = dZ T^T + dA''``, ``dT = A^T dZ``) and
    two passes over ``dA''``, where autograd over the same ops takes about twice as many passes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        c = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            z = _channel_bmm(x, t.to(x.dtype))
            y, s = z[:, :c], z[:, c:]
            m = torch.sigmoid(F.relu(s.to(t.dtype)))  # eq (6), in float32 or float64
            ctx.save_for_backward(x, t, z, m)
            ctx.mark_non_differentiable(m)
            return torch.addcmul(x, y, m.to(x.dtype)), m  # eq (7)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_m: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, t, z, m = ctx.saved_tensors
        c = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            y, s = z[:, :c], z[:, c:]
            d_m = (grad * y).sum(dim=1, keepdim=True).to(m.dtype)  # (a dtype= argument would copy)
            d_z = torch.empty_like(z)
            torch.mul(grad, m.to(grad.dtype), out=d_z[:, :c])  # through A' M_spat
            d_z[:, c:] = d_m * m * (1 - m) * (s > 0)  # through sigmoid(ReLU(S))
            d_x = _channel_bmm(d_z, t.to(x.dtype).transpose(1, 2), add=grad)  # + identity path
            d_t = torch.bmm(x.flatten(2), d_z.flatten(2).transpose(1, 2))  # sum over positions
            return d_x, d_t.to(t.dtype)


def _channel_bmm(x: Tensor, t: Tensor, add: Tensor | None = None) -> Tensor:
    """``(B, C, H, W)`` times per-sample ``(B, C, K)`` over channels -> ``(B, K, H, W)`` (plus
    ``add``, in the same product), as one batched product in ``x``'s memory format."""
    b, c, h, w = x.shape
    if is_channels_last(x):
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if add is None:
            out = torch.bmm(rows, t)
        else:
            add = add.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, h * w, -1)
            out = torch.baddbmm(add, rows, t)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)
    cols = x.reshape(b, c, h * w)
    if add is None:
        return torch.bmm(t.transpose(1, 2), cols).view(b, -1, h, w)
    return torch.baddbmm(add.reshape(b, -1, h * w), t.transpose(1, 2), cols).view(b, -1, h, w)


class SpatialMean(torch.autograd.Function):
    """``(B, C, H, W) -> (B, C)`` mean over positions, returned in ``dtype``; its gradient is handed back
    as a broadcast view, not a materialised full-size tensor (autograd's mean backward writes
    one and converts it: two full-size passes saved per module)."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.dtype = x.shape, x.dtype
        with torch.autocast(x.device.type, enabled=False):  # 16-bit inputs: reduced in float32
            return x.mean(dim=(2, 3)).to(dtype)  # inside the kernel, without a float32 copy

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        b, c, h, w = ctx.shape
        return (grad / (h * w)).to(ctx.dtype)[:, :, None, None].expand(b, c, h, w), None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the group scales and their products: float32 for 16-bit inputs, else the input's
    own (a float64 module computes in float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def ladder_matrix(groups: int, width: int) -> Tensor:
    """``(C, C)`` with ``C = groups * width``: entry ``(j*width + i, k*width + i)`` is 1 for
    ``j <= k``, else 0, so ``x @ L`` gives every group the sum of itself and the groups before."""
    return torch.kron(torch.ones(groups, groups).triu(), torch.eye(width))


def channel_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``(B, C, H, W) @ (C, K) -> (B, K, H, W)`` over the channel dimension (a 1x1 convolution
    without bias), as one matrix product in ``x``'s memory format (channels_last stays so)."""
    b, c, h, w = x.shape
    if is_channels_last(x):
        return torch.matmul(x.permute(0, 2, 3, 1), weight).permute(0, 3, 1, 2)
    return torch.matmul(weight.t(), x.reshape(b, c, h * w)).view(b, -1, h, w)


def lgam_reference(
    module: LGAM, x: Tensor, return_ladder: bool = False
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Direct, loop-per-group transcription of eqs (1)-(7) with ``module``'s weights (the oracle).

    ``x`` is ``(B, C, H, W)``. With ``return_ladder`` also returns the group outputs ``y_k``,
    each ``(B, C/G, H, W)``.
    """
    ys: list[Tensor] = []
    for k, x_k in enumerate(x.chunk(module.groups, dim=1)):
        z = x_k if k == 0 else x_k + ys[-1]  # eq (4)
        s = z.mean(dim=(2, 3))  # eq (1)
        m = module.channel_attention[k](s)  # eq (2)
        ys.append(m[..., None, None] * z + z)  # eq (3)
    a1 = torch.cat(ys, dim=1)
    c = a1.sum(dim=1, keepdim=True)  # eq (5)
    out = a1 * torch.sigmoid(F.relu(c)) + x  # eqs (6), (7)
    return (out, ys) if return_ladder else out
