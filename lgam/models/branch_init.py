"""How each residual branch starts: the scale of its last BatchNorm (``residual_bn``: BasicBlock's
``bn2``, ResNeXtBottleneck's ``bn3``; the attention module sits right after it).

- :func:`init_residual_bn`: one value for every branch (0: :func:`zero_init_residual`);
- :func:`match_branch_rms`: per branch, from a batch of images, so that every branch's output
  *after its attention module* starts at the same RMS whatever the module does to its input's scale
  (SE's and SGE's gates halve it at init, CBAM's quarter it, LGAM's ladder multiplies it ~4x):
  the data-dependent initialisation of LSUV (Mishkin & Matas, 2016) applied to the branch's last
  BN. SkipInit's gains are :func:`lgam.models.resnet.skip_gain`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UsageError

__all__ = ["init_residual_bn", "match_branch_rms", "residual_bns", "zero_init_residual"]


def residual_bns(model: nn.Module) -> list[tuple[nn.Module, nn.BatchNorm2d]]:
    """``(block, its branch's last BN)`` for every residual block of ``model`` that names one, in
    forward order (pre-activation blocks, e.g. WRN's, name none)."""
    return [(m, getattr(m, type(m).residual_bn)) for m in model.modules() if getattr(type(m), "residual_bn", None)]


def init_residual_bn(model: nn.Module, scale: float) -> int:
    """Set the scale (``weight``) of the last BatchNorm of every residual branch whose block names
    one (``residual_bn``: BasicBlock's ``bn2``, ResNeXtBottleneck's ``bn3``) to ``scale``: each
    branch, and the attention module after that BN, then starts from ``scale`` times its standard
    output (0: :func:`zero_init_residual`). Returns the number of BNs set."""
    found = residual_bns(model)
    for _, bn in found:
        nn.init.constant_(bn.weight, scale)
    return len(found)


def zero_init_residual(model: nn.Module) -> int:
    """Zero the last BN scale of every residual branch (:func:`init_residual_bn` with 0): each block
    then starts as the identity (Goyal et al., 2017; torchvision's ``zero_init_residual``). The
    attention module after that BN then starts from a zero input. Returns the number of BNs zeroed.

    Why it matters here: LGAM scales its groups by at least ``1.5**(k-1)`` (eq (4)) and its output
    by ``M_spat >= 0.5`` (eq (6)); from the standard init the gradient grows through every module
    on the way back (measured: gradient norm ~1,600 at init for resnet18_lgam vs ~4 for resnet18,
    and training at the ``cpu`` recipe's lr 0.25 stalls at chance), while from identity blocks it
    trains like the plain network."""
    return init_residual_bn(model, 0.0)


def _check_measurable(measured: dict[int, float]) -> None:
    """A branch whose output is 0 cannot be rescaled to an RMS (its last BN's weight stayed 0, and
    the function returned RMS 0 as if matched)."""
    dead = [i for i, v in sorted(measured.items()) if not v > 1e-12]
    if dead:
        raise UsageError(f"residual branches {dead} output 0 (their last BN's weight is 0, as "
                         "zero_init_residual leaves it): there is no scale to match; match the branch "
                         "RMS instead of zero_init_residual, not after it")


@torch.no_grad()
def match_branch_rms(model: nn.Module, images: Tensor, rms: float, steps: int = 3) -> list[float]:
    """Rescale each residual branch's last BN so that the branch's output after its attention
    module has RMS ``rms`` on ``images`` ``(B, 3, H, W)`` (normalised model input), with train-mode
    BN statistics as in the first training step. Returns each branch's output RMS measured after
    the last of ``steps`` rescalings, in forward order.

    A block's attention module is measured on its own (its ``forward(bn_out)``, without the
    identity, bypassing hooks); LGAM's output is not linear in its input's scale (its spatial
    gate, eqs (5)-(6)), so each step rescales by the ratio still missing. The model's mode and
    every buffer (the BN running statistics, the attention modules' BNs included) are restored:
    only the scales of the branches' last BNs change. A branch that outputs 0 (its last BN's weight zeroed, as
    :func:`zero_init_residual` leaves it) has no scale to match: :class:`~lgam.errors.UsageError`."""
    blocks = residual_bns(model)
    measured: dict[int, float] = {}

    def hook(i: int, attention: nn.Module):
        def measure(_module: nn.Module, args: tuple) -> None:
            measured[i] = float(attention.forward(args[0]).float().square().mean().sqrt())
        return measure

    handles = [block.attention.register_forward_pre_hook(hook(i, block.attention))
               for i, (block, _) in enumerate(blocks)]
    buffers = [(b, b.clone()) for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        for step in range(steps + 1):
            measured.clear()
            model(images)
            if step == 0:
                _check_measurable(measured)
            if step < steps:
                for i, (_, bn) in enumerate(blocks):
                    bn.weight.mul_(rms / measured[i])
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
        model.train(was_training)
    return [measured[i] for i in range(len(blocks))]
