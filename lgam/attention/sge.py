"""SGE: Spatial Group-wise Enhance (Li, Hu, Yang, 2019)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_divisible, check_input, is_channels_last
from ._gates import GateRecorder

__all__ = ["SGE", "sge_reference"]


class SGE(GateRecorder):
    """Per group: similarity of each position to the group's mean feature, normalised over
    positions, per-group affine (``gamma`` init 0, ``beta`` init 1), sigmoid, scale.

    Input and output ``(B, C, H, W)``; ``C`` must be divisible by ``groups``. The forward and a
    hand-written backward (:class:`SGEGate`) touch each full-size tensor a few times, where
    autograd over the same ops made ~35 full-size passes; :func:`sge_reference` is the direct
    transcription of the paper's formula that the tests hold it to.
    """

    gate_description = "sigmoid(normalised x . GAP(x)) averaged over the groups"
    #: gamma and beta are a per-group affine of a normalised score, BatchNorm's role: the official
    #: code (implus/PytorchInsight) decays them exactly as it decays BN's scale and shift, so a
    #: recipe that exempts BN (``bn_bias_decay=False``) exempts them too (lgam.recipes.param_groups)
    no_weight_decay = ("weight", "bias")

    def __init__(self, channels: int, groups: int = 64, eps: float = 1e-5) -> None:
        super().__init__()
        check_divisible(channels, groups, "SGE")
        if not eps > 0:  # a constant group's std is 0: 0 / (0 + eps) must not be 0 / 0
            raise ValueError(f"SGE: eps must be positive, got {eps}")
        self.channels, self.groups, self.eps = int(channels), groups, eps
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))  # gamma
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))  # beta

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.channels, "SGE")
        out, gate = SGEGate.apply(x, self.weight, self.bias, self.groups, self.eps)
        if self.record_gates:  # the grouped view's gates as (B, G, H, W)
            b, _, h, w = x.shape
            groups = (gate.reshape(b, h, w, -1).permute(0, 3, 1, 2) if is_channels_last(x)  # as SGEGate chose
                      else gate.reshape(b, -1, h, w))
            self._record(spatial=groups.mean(dim=1, keepdim=True), groups=groups)
        return out


def _grouped(x: Tensor, groups: int, channels_last: bool) -> Tensor:
    """``x (B, C, H, W)`` viewed as ``(B, HW, G, C/G)`` if ``channels_last`` else
    ``(B, G, C/G, HW)``: no copy when that is ``x``'s memory format."""
    b, c, h, w = x.shape
    if channels_last:
        return x.permute(0, 2, 3, 1).reshape(b, h * w, groups, c // groups)
    return x.reshape(b, groups, c // groups, h * w)


def _ungrouped(v: Tensor, like: Tensor, channels_last: bool) -> Tensor:
    """Inverse of :func:`_grouped`: back to ``like``'s shape."""
    b, c, h, w = like.shape
    if channels_last:
        return v.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return v.reshape(b, c, h, w)


class SGEGate(torch.autograd.Function):
    """``forward(x (B, C, H, W), gamma (1, G, 1, 1), beta (1, G, 1, 1), G, eps) -> (out, gate)``
    (``gate``: the sigmoid below, in the grouped view's layout, not differentiable). With ``v`` the
    group's features at position ``i`` and ``mu`` their mean over positions::

        t_i = v_i . mu,   t^_i = (t_i - mean t) / (std t + eps),   out_i = v_i sigmoid(gamma t^_i + beta)

    (unbiased std; a single position gives std 0). Computed in the input's dtype and memory
    format, with fused multiply-adds; the statistics of ``t`` (one value per position and group,
    a C/G-th of the input) in float32: in float16 ``1 / eps`` is inf (NaN where a group's ``t`` is
    constant) and a variance past 65,504 is inf (every gate ``sigmoid(beta)``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:  # type: ignore[override]
        cl = is_channels_last(x)
        pos, grp, chan = (1, 2, 3) if cl else (3, 1, 2)  # dimensions of the grouped view
        with torch.autocast(x.device.type, enabled=False):
            v = _grouped(x, groups, cl)
            n = v.shape[pos]
            correction = 1 if n > 1 else 0
            mu = v.mean(dim=pos, keepdim=True)
            stat = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64
            t = (v * mu).sum(dim=chan, keepdim=True, dtype=stat)
            var, mean = torch.var_mean(t, dim=pos, keepdim=True, correction=correction)
            sd = var.sqrt()
            r = 1 / (sd + eps)
            t_hat = (t - mean) * r
            shape = [1, 1, 1, 1]
            shape[grp] = groups
            a = torch.addcmul(bias.to(stat).view(shape), t_hat, weight.to(stat).view(shape))
            s = torch.sigmoid(a).to(x.dtype)
            ctx.save_for_backward(x, weight, mu, t_hat, s, sd)
            ctx.layout = (groups, eps, cl, pos, grp, chan, n - correction, shape)
            ctx.mark_non_differentiable(s)
            return _ungrouped(v * s, x, cl), s

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_gate: Tensor | None):  # type: ignore[override]
        x, weight, mu, t_hat, s, sd = ctx.saved_tensors
        groups, eps, cl, pos, grp, chan, dof, shape = ctx.layout
        with torch.autocast(x.device.type, enabled=False):
            v, g = _grouped(x, groups, cl), _grouped(grad.to(x.dtype), groups, cl)
            # out = v s, s = sigmoid(a), a = gamma t^ + beta
            # the per-position, per-group terms in float32 (or float64), as in the forward pass
            stat = t_hat.dtype
            d_a = torch.ops.aten.sigmoid_backward((g * v).sum(dim=chan, keepdim=True, dtype=stat), s.to(stat))
            reduce = [d for d in range(4) if d != grp]
            d_gamma = (d_a * t_hat).sum(dim=reduce).view_as(weight).to(weight.dtype)
            d_beta = d_a.sum(dim=reduce).view_as(weight).to(weight.dtype)
            u = d_a * weight.to(stat).view(shape)  # d/dt^
            # t^ = (t - mean) r, r = 1 / (sd + eps), sd = sqrt(sum (t - mean)^2 / dof):
            # d/dt = (u - mean u) r - t^ sum(u t^) / (dof sd)
            r = 1 / (sd + eps)
            spread = torch.where(sd > 0, (u * t_hat).sum(dim=pos, keepdim=True)
                                 / (dof * sd.clamp_min(torch.finfo(sd.dtype).tiny)), 0.0)
            d_t = torch.addcmul(torch.addcmul(-u.mean(dim=pos, keepdim=True) * r, u, r), t_hat, -spread)
            d_t = d_t.to(x.dtype)  # the full-size terms in the input's dtype
            # t_i = v_i . mu, mu = mean v
            d_mu = ((d_t * v).sum(dim=pos, keepdim=True, dtype=stat) / v.shape[pos]).to(x.dtype)
            d_x = torch.addcmul(torch.addcmul(d_mu, g, s), d_t, mu)
            return _ungrouped(d_x, x, cl), d_gamma, d_beta, None, None


def sge_reference(module: SGE, x: Tensor) -> Tensor:
    """Direct transcription of SGE's formula with ``module``'s parameters (the test oracle)."""
    b, c, h, w = x.shape
    xg = x.reshape(b * module.groups, c // module.groups, h, w)
    t = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(dim=1).view(b, module.groups, h * w)
    t = t - t.mean(dim=2, keepdim=True)
    std = t.std(dim=2, keepdim=True, correction=1 if h * w > 1 else 0)
    t = (t / (std + module.eps)).view(b, module.groups, h, w)
    gate = torch.sigmoid(t * module.weight + module.bias)
    return (xg * gate.view(b * module.groups, 1, h, w)).view(b, c, h, w)
