"""The LGAM module: its weights, and the choice between the op and the equations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_batch, check_divisible, check_input, check_positive_int
from .._gates import GateRecorder
from . import ops  # noqa: F401  (registers torch.ops.lgam.*)
from .dispatch import fused_kernels_enabled
from .equations import group_scales, lgam_equations
from .kernels import PARAMS, STATS


def _getter(paths: list[str]):
    """A function of a group's module giving the tensors at ``paths`` in order, each submodule
    on the way looked up once (``nn.Module`` attribute access costs ~0.5 us: this is per call)."""
    parents = sorted({p.rpartition(".")[0] for p in paths})
    leaves = [(parents.index(head), leaf) for head, _, leaf in (p.rpartition(".") for p in paths)]

    def get(group: nn.Module) -> list[Tensor]:
        found = []
        for path in parents:
            m = group
            for name in path.split("."):
                m = getattr(m, name)
            found.append(m)
        return [getattr(found[i], leaf) for i, leaf in leaves]
    return get


_TENSORS = _getter([path for path, _ in (*PARAMS.values(), *STATS.values())])  # a group's tensors, in order


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
            ``G=32, r=2`` reproduces the paper's parameter counts.
        reduction: ``r``; the hidden width of each group's MLP is ``max(1, C' // r)`` (the
            project's design notes: a group narrower than ``r`` keeps one hidden unit).

    On CPU maps where LGAM's C++ kernels build it runs the op ``torch.ops.lgam.lgam``
    (:mod:`.ops`), eager or compiled alike; elsewhere the same equations as plain tensor ops
    (:mod:`.equations`). :func:`~lgam.attention.lgam.lgam_reference` is the paper's loop, the
    tests' oracle: read it first.
    """

    gate_description = "M_spat = sigmoid(ReLU(sum over channels of A')), eqs (5)-(6)"
    #: ``forward`` takes a residual block's identity and returns the block's output
    fuses_residual = True

    def __init__(self, channels: int, groups: int = 4, reduction: int = 16) -> None:
        super().__init__()
        check_divisible(channels, groups, "LGAM")
        width = channels // groups
        hidden = max(1, width // check_positive_int("reduction", reduction))  # h = max(1, C'/r)
        self.channels, self.groups, self.reduction = channels, groups, reduction
        self.channel_attention = nn.ModuleList(ChannelAttention(width, hidden) for _ in range(groups))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, reduction={self.reduction}"

    def group_scales(self, pooled: Tensor) -> Tensor:
        """The group scales ``1 + M_k`` ``(B, G, C')`` from the pooled groups ``(B, G, C')``."""
        return group_scales(self.channel_attention, pooled)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``A (B, C, H, W) -> A''``; with ``residual`` (a residual block's identity, ``A``'s
        shape) the block's output ``ReLU(A'' + residual)``, in the same pass where the op runs."""
        check_input(x, self.channels, "LGAM")
        check_batch(x, self.training, "LGAM")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"LGAM: residual {tuple(residual.shape)} must match the input {tuple(x.shape)}")
        if fused_kernels_enabled(self, x):
            out, s, scales = self._forward_op(x, residual, *self._group_tensors())
        else:
            out, s, scales = lgam_equations(self.channel_attention, x)
            out = out if residual is None else torch.relu(out + residual)
        if self.record_gates:
            channel = {} if self.training else {"channel": (scales.detach() - 1)}  # eq (2)'s M, (B, C)
            self._record(spatial=torch.sigmoid(F.relu(s.detach())).view(x.shape[0], 1, *x.shape[2:]),
                         **channel)  # eq (6)
        return out

    def _forward_op(self, x: Tensor, residual: Tensor | None, params: list[Tensor],
                    stats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        bn = self.channel_attention[0].bn
        if self.training:
            for a in self.channel_attention:
                a.bn.num_batches_tracked.add_(1)
        out, s, scales, *_, new_stats = torch.ops.lgam.lgam(x, residual, params, stats, self.groups,
                                                            self.training, bn.eps, bn.momentum or 0.0)
        with torch.no_grad():
            for old, new in zip(stats, new_stats):  # BatchNorm's running statistics, moved (train mode)
                old.copy_(new)
        return out, s, scales

    def _group_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """The groups' learned tensors and running statistics, group by group, in the order of
        :data:`.kernels.PARAMS` and :data:`.kernels.STATS` (the op's ``params``, ``stats``)."""
        groups = [_TENSORS(a) for a in self.channel_attention]
        return [t for g in groups for t in g[:len(PARAMS)]], [t for g in groups for t in g[len(PARAMS):]]

    def kernels_apply(self, x: Tensor, work: torch.dtype) -> bool:
        """Whether the op can take this module's weights for ``x``: weights in the work dtype
        ``work`` on the CPU (the op checks every tensor, and raises where one differs), BatchNorms
        alike, tracking statistics and in the module's mode, and in train mode a batch of at
        least two (else the equations run, or raise, as torch's ops do)."""
        bns = [a.bn for a in self.channel_attention]
        first = bns[0]
        if any(bn.running_mean is None or (bn.eps, bn.momentum, bn.training) != (first.eps, first.momentum, self.training)
               for bn in bns):
            return False
        if self.training and (first.momentum is None or x.shape[0] < 2):
            return False
        return first.weight is not None and first.weight.dtype == work and first.weight.device.type == "cpu"
