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
from ._lgam_fused import FUSED, work_dtype

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
    is a per-sample mixing of channels, ``A' = A T``: one batched matrix product where a map has
    at least as many positions as channels (:class:`MixAndGate`), a running sum over the groups
    where it has fewer (:class:`LadderAndGate`), each with a hand-written backward: the eager
    path. On the CPU where LGAM's C++ kernels build (a C++ compiler), on CUDA where Triton is
    installed, and inside a ``torch.compile`` of the model, it takes the fused path instead: eqs
    (4)-(7) per position, one pass over the map after the GAP's, one back (``_lgam_fused``;
    :func:`~lgam.attention.set_fused_kernels`). The group scales, their products and the pooled
    vectors are float32 for 16-bit input (float64 for float64). :func:`lgam_reference` is the
    direct transcription used as the test oracle: read it first.
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
        # (G, G, 1) 0/1 mask of j <= k (group k sums the groups j up to itself); a constant, not
        # a weight: follows .to(device) but stays out of the state_dict
        self.register_buffer("ladder_mask", torch.ones(groups, groups).triu()[:, :, None],
                             persistent=False)

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

    #: ``forward`` takes a residual block's identity and returns the block's output (see
    #: :func:`~lgam.attention.fuses_residual`)
    fuses_residual = True

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``A (B, C, H, W) -> A''``; with ``residual`` (a residual block's identity, ``A``'s
        shape) the block's output ``ReLU(A'' + residual)``, in the same pass where the module
        runs fused."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"LGAM expects (B, {self.channels}, H, W) input, got {tuple(x.shape)}"
            )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"LGAM: residual {tuple(residual.shape)} must match the input {tuple(x.shape)}")
        if not FUSED.applies(self, x):  # see _lgam_fused
            out, m_spat = self.forward_eager(x)
            if self.record_gates:
                self._record(spatial=m_spat, **self._channel_gates(x))
            return out if residual is None else torch.relu_(out + residual)
        out, s = FUSED.run(self, x, residual)
        if self.record_gates:
            self._record(spatial=torch.sigmoid(F.relu(s.detach())), **self._channel_gates(x))  # eq (6)
        return out

    @torch.no_grad()
    def _channel_gates(self, x: Tensor) -> dict[str, Tensor]:
        """``{"channel": M (B, C)}``, the groups' eq-(2) gates side by side, for gate recording in
        eval mode (recomputed from the pooled input: cheap; in train mode it would move BN's
        running statistics a second time, so nothing is recorded there)."""
        if self.training:
            return {}
        pooled = x.to(work_dtype(x.dtype)).mean(dim=(2, 3)).view(x.shape[0], self.groups, -1)
        with torch.autocast(x.device.type, enabled=False):
            return {"channel": (self.group_scales(pooled) - 1).flatten(1)}

    def forward_eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Eqs (1)-(7) in eager mode: ``x (B, C, H, W) -> (A'', M_spat (B, 1, H, W))``."""
        b, c = x.shape[:2]
        work = work_dtype(x.dtype)
        pooled = SpatialMean.apply(x, work).view(b, self.groups, -1)  # eq (1), per group
        with torch.autocast(x.device.type, enabled=False):  # their products reach 1.5**G: no bf16
            weights = self.channel_attention[0].bn.weight.dtype  # float32 unless .bfloat16()/.half()
            # eqs (2)-(4) on pooled vectors: the group scales 1 + M_k
            group_scale = self.group_scales(pooled.to(weights)).to(work)
        # Ladder (4) unrolled: y_k = (1 + M_k)(x_k + y_{k-1}) = P_k * sum_{j<=k} x_j / P_{j-1}, with
        # P_k = (1 + M_1) ... (1 + M_k), P_0 = 1 (kept in float32 or float64: they grow like
        # 1.5**k). In matrix form A' = A T over channels, T[j C' + i, k C' + i] = P_k / P_{j-1}.
        p = GroupProducts.apply(group_scale)  # (B, G, C')
        p_prev = torch.cat([torch.ones_like(p[:, :1]), p[:, :-1]], dim=1)
        if x.shape[2] * x.shape[3] >= c:  # A' and S as products per sample with T
            # T's non-zeros, the ratios R[j, k] = P_k / P_{j-1} for j <= k: (B, G, G, C')
            ratios = p[:, None] / p_prev[:, :, None] * self.ladder_mask.to(p.dtype)
            return MixAndGate.apply(x, ratios)
        return LadderAndGate.apply(x, p_prev, p)  # few positions: the ladder on the map itself


class MixAndGate(torch.autograd.Function):
    """Eqs (5)-(7) from the ladder as a per-sample channel mixing: ``forward(A (B, C, H, W),
    R (B, G, G, C')) -> (A'', M_spat)`` (``M_spat (B, 1, H, W)`` returned for inspection, not
    differentiable).

    ``R[b, j, k, i] = P_k / P_{j-1}`` (0 for ``j > k``) are the non-zeros of the mixing matrix
    ``T (B, C, C)``: ``T[j C' + i, k C' + i] = R[j, k, i]``, so that ``A' = A T`` (one batched
    product), and eq (5)'s channel sum is ``S = A v`` with ``v = T 1`` (a second, narrow one, in
    two parts for 16-bit ``A``: :func:`mixing_weights`). Then ``M_spat = sigmoid(ReLU(S))``
    (eq (6)) and ``A'' = A' M_spat + A`` (eq (7)), in ``A``'s dtype and memory format.

    Backward: with ``dY = dA'' M_spat + dS`` (``dS`` broadcast over channels), ``v = T 1`` folds
    the channel sum's gradient into the same two products as ``A'``'s: ``dA = dA'' + dY T^T``, and
    the entries ``R`` occupies in ``A^T dY`` are ``dR`` (``dT + dv 1^T`` there).
    """

    @staticmethod
    def forward(ctx, x: Tensor, ratios: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            t, v = mixing_weights(ratios, x.dtype)
            a, dim = _as_matrix(x)
            y = _times(a, t, dim)  # A' = A T
            s = _times(a, v, dim).sum(dim, keepdim=True, dtype=ratios.dtype)  # eq (5): S = A v
            m = torch.sigmoid(F.relu(s))  # eq (6), in float32 or float64
            m_x = m.to(x.dtype)
            out = torch.empty_like(x, memory_format=_memory_format(x))
            torch.addcmul(a, y, m_x, out=_as_matrix(out)[0])  # eq (7)
            if any(ctx.needs_input_grad):
                ctx.save_for_backward(x, y, m_x, _gate_derivative(s, m), t)
                ctx.groups = ratios.shape[1]
            ctx.mark_non_differentiable(m)
            b, _, h, w = x.shape
            return out, m.view(b, 1, h, w)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_m: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, y, m, d_gate, t = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            a, dim = _as_matrix(x)
            g = _as_matrix(grad.contiguous(memory_format=_memory_format(x)))[0]
            d_s = torch.linalg.vecdot(g, y, dim=dim).unsqueeze(dim) * d_gate  # through eq (6)
            d_y = torch.mul(g, m).add_(d_s.to(g.dtype))  # through eq (7), and eq (5) as 1^T
            d_x = torch.empty_like(x, memory_format=_memory_format(x))
            if dim == 2:  # (B, HW, C) rows
                torch.baddbmm(g, d_y, t.transpose(1, 2), out=_as_matrix(d_x)[0])
                d_t = torch.bmm(a.transpose(1, 2), d_y)  # sums over positions
            else:  # (B, C, HW) columns
                torch.baddbmm(g, t, d_y, out=_as_matrix(d_x)[0])
                d_t = torch.bmm(a, d_y.transpose(1, 2))
            return d_x, _ratio_entries(d_t, ctx.groups).to(d_gate.dtype)


class LadderAndGate(torch.autograd.Function):
    """Eqs (4)-(7) on the map itself, for maps with fewer positions than channels:
    ``forward(A (B, C, H, W), P_prev (B, G, C'), P (B, G, C')) -> (A'', M_spat)`` (``M_spat``
    ``(B, 1, H, W)``, not differentiable).

    ``U_k = sum_{j<=k} A_j / P_{j-1}`` (a running sum over the groups, in place), ``A' = P U``,
    ``S`` = the sum of ``A'`` over channels (eq (5)), ``M_spat = sigmoid(ReLU(S))`` (eq (6)),
    ``A'' = A' M_spat + A`` (eq (7)). Computed in float32 (float64 for float64 input) on rows
    ``(B, HW, G, C')``: a few passes over a small map, where a matrix product would cost ``C``
    multiply-adds per element. The backward runs the same steps in reverse (the running sum
    backwards).
    """

    @staticmethod
    def forward(ctx, x: Tensor, p_prev: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        b, _, h, w = x.shape
        channels_last = is_channels_last(x)
        with torch.autocast(x.device.type, enabled=False):
            rows = _group_rows(x, p.shape[1]).to(p.dtype)  # (B, HW, G, C'), float32 or float64
            u = rows / p_prev[:, None]
            for k in range(1, u.shape[2]):
                u[:, :, k] += u[:, :, k - 1]  # eq (4), unrolled: sum over j <= k of x_j / P_{j-1}
            y = u * p[:, None]  # A'
            s = y.sum(dim=(2, 3))  # eq (5): (B, HW)
            m = torch.sigmoid(F.relu(s))  # eq (6)
            out = torch.addcmul(rows, y, m[:, :, None, None]).to(x.dtype)  # eq (7)
            if any(ctx.needs_input_grad):
                ctx.save_for_backward(rows, u, y, m, _gate_derivative(s, m), p_prev, p)
                ctx.shape, ctx.dtype, ctx.channels_last = x.shape, x.dtype, channels_last
            ctx.mark_non_differentiable(m)
            return _from_rows(out, x.shape, channels_last), m.view(b, 1, h, w)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_m: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        rows, u, y, m, d_gate, p_prev, p = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = _group_rows(grad, p.shape[1]).to(p.dtype)
            d_s = (g * y).sum(dim=(2, 3)) * d_gate  # through sigmoid(ReLU(S))
            d_y = torch.addcmul(d_s[:, :, None, None], g, m[:, :, None, None])  # + through A' M
            d_p = (d_y * u).sum(dim=1)
            d_u = d_y.mul_(p[:, None])
            for k in range(d_u.shape[2] - 2, -1, -1):
                d_u[:, :, k] += d_u[:, :, k + 1]  # the running sum, backwards
            d_p_prev = -(d_u * rows).sum(dim=1) / p_prev.square()
            d_x = torch.addcdiv(g, d_u, p_prev[:, None]).to(ctx.dtype)  # identity + ladder paths
            return _from_rows(d_x, ctx.shape, ctx.channels_last), d_p_prev, d_p


class GroupProducts(torch.autograd.Function):
    """``P_k = (1 + M_1) ... (1 + M_k)``: the cumulative product over the groups of the scales
    ``(B, G, C')``, with a backward that never waits on the host.

    The scales are at least 1.5 (``M >= 0.5``: eq (2)'s ``sigmoid(ReLU(.))``), never zero, so
    ``dL/d(1 + M_j) = sum_{k >= j} dL/dP_k * P_k / (1 + M_j)``. ``torch.cumprod``'s own backward
    first asks the host whether the input holds a zero: a device sync per module, which a CUDA
    graph cannot capture.
    """

    @staticmethod
    def forward(ctx, scales: Tensor) -> Tensor:  # type: ignore[override]
        p = torch.cumprod(scales, dim=1)
        ctx.save_for_backward(scales, p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        scales, p = ctx.saved_tensors
        return (grad * p).flip(1).cumsum(1).flip(1) / scales  # the sum over k >= j


def _gate_derivative(s: Tensor, m: Tensor) -> Tensor:
    """``dM/dS`` of eq (6), ``M = sigmoid(ReLU(S))``: ``M (1 - M)`` where ``S > 0``, else 0."""
    return m * (1 - m) * (s > 0)


def _group_rows(x: Tensor, groups: int) -> Tensor:
    """``(B, C, H, W) -> (B, HW, G, C')``: a view for channels_last input, else a copy."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, groups, c // groups)


def _from_rows(rows: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """The inverse of :func:`_group_rows`: ``(B, C, H, W)``, channels_last or contiguous."""
    b, c, h, w = shape
    x = rows.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def mixing_weights(ratios: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The mixing matrix ``T (B, C, C)`` and ``v = T 1`` as ``(B, C, 2)``, in ``dtype``, from the
    ladder ratios ``R (B, G, G, C')``: ``T[j C' + i, k C' + i] = R[j, k, i]``, zero elsewhere;
    ``v``'s columns are ``v`` rounded to ``dtype`` and its rounding error (zero for float32/64).

    ``S = A v`` sums ``C`` terms that cancel, and eq (6) is steepest where ``S`` is near 0: ``v``
    rounded to bf16 (2**-9) would move ``M_spat`` by ~1 %; ``v_hi + v_lo`` keeps it to ~2**-17.
    ``T`` itself is rounded: each output sums at most ``G`` terms, to ``dtype``'s precision.
    """
    b, g, _, width = ratios.shape
    c = g * width
    t = ratios.new_zeros(b, c, c, dtype=dtype)
    _ratio_entries(t, g).copy_(ratios)
    v = ratios.sum(2).view(b, c, 1)
    hi = v.to(dtype)
    return t, torch.cat([hi, (v - hi.to(v.dtype)).to(dtype)], dim=2)


def _times(a: Tensor, t: Tensor, dim: int) -> Tensor:
    """``A T`` per sample for ``A`` as :func:`_as_matrix` gives it: ``(B, HW, C) @ (B, C, K)``
    for ``dim == 2``, else ``(B, C, K)^T @ (B, C, HW)``, in the same orientation."""
    return torch.bmm(a, t) if dim == 2 else torch.bmm(t.transpose(1, 2), a)


def _ratio_entries(t: Tensor, groups: int) -> Tensor:
    """The view ``(B, G, G, C')`` of ``R``'s places in ``T (B, C, C)``."""
    blocks = t.unflatten(1, (groups, -1)).unflatten(3, (groups, -1))  # (B, G, C', G, C')
    return blocks.diagonal(dim1=2, dim2=4)


def _as_matrix(x: Tensor) -> tuple[Tensor, int]:
    """``(B, C, H, W)`` as a matrix per sample and the dim of its channels: the view
    ``(B, HW, C)``, 2, for channels_last input; ``(B, C, HW)``, 1, otherwise."""
    b, c, h, w = x.shape
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c), 2
    return x.reshape(b, c, h * w), 1


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


class SpatialMean(torch.autograd.Function):
    """``(B, C, H, W) -> (B, C)`` mean over positions, returned in ``dtype``; its gradient is handed back
    as a broadcast view, not a materialised full-size tensor (autograd's mean backward writes
    one and converts it: two full-size passes saved per module).

    16-bit input is summed by two products with a vector of ones, ``hi`` and ``lo`` (the sum
    minus ``hi``, computed before rounding): float32-accurate (~2**-17), where a 16-bit sum
    rounds by 2**-9, which the ladder amplifies (up to 10% of a G=32 module's output), and a
    float32 sum first converts the whole map.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.dtype = x.shape, x.dtype
        b, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            if dtype == x.dtype:  # float32, float64: summed as they are
                return x.sum(dim=(2, 3)) / (h * w)
            a, dim = _as_matrix(x)
            ones = x.new_ones(b, 1, h * w) if dim == 2 else x.new_ones(b, h * w, 1)
            pair = (ones, a) if dim == 2 else (a, ones)
            hi = torch.bmm(*pair)
            lo = torch.baddbmm(hi, *pair, beta=-1)  # the sum minus hi, rounded once
            return (hi.to(dtype) + lo.to(dtype)).view(b, c) / (h * w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        b, c, h, w = ctx.shape
        return (grad / (h * w)).to(ctx.dtype)[:, :, None, None].expand(b, c, h, w), None


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
