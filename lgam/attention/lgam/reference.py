"""The paper's eqs (1)-(7) transcribed line by line, a loop over the groups: the tests' oracle."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .module import LGAM


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
