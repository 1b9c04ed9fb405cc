"""Recording the gates an attention module computes in its own forward (no hooks, no recompute).

Every attention module derives from :class:`GateRecorder`; while its ``record_gates`` flag is set,
its forward keeps detached references to the gating tensors it has just computed:

- ``"spatial"``: ``(B, 1, H, W)`` in [0, 1], where it gates positions (LGAM eq (6), CBAM's spatial
  gate, SGE's gates averaged over groups, BAM's gate averaged over channels);
- ``"channel"``: ``(B, C)`` in [0, 1] (SE, CBAM's channel gate);
- ``"groups"``: SGE's per-group maps ``(B, G, H, W)``; ``"spatial_logits"``: BAM's ``Ms``.

:func:`capture_gates` sets the flags for one block of code and collects what was recorded.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import UsageError

__all__ = ["GateRecorder", "capture_gates", "attention_gates", "stage_of", "stage_gate"]


class GateRecorder(nn.Module):
    """Base of the attention modules: ``_record(name=tensor, ...)`` from ``forward``."""

    #: where the module goes in a backbone: ``"block"`` (every residual block, before the identity
    #: add) or ``"stage"`` (after stages 1..n-1); see :func:`lgam.attention.attention_placement`
    placement: str = "block"
    #: what its recorded ``spatial`` gate is, in one line (``""``: it records no spatial gate)
    gate_description: str = ""
    record_gates: bool = False
    last_gates: dict[str, Tensor] | None = None

    def _record(self, **gates: Tensor) -> None:
        if self.record_gates:
            self.last_gates = {k: v.detach() for k, v in gates.items()}


@contextmanager
def capture_gates(model: nn.Module) -> Iterator[dict[str, dict[str, Tensor]]]:
    """Inside the ``with`` block every attention module of ``model`` records the gates of its
    forward; on leaving it the yielded dict maps module names (``"layer4.1.attention"``) to their
    last gates, and recording is as it was before (off, or an enclosing capture's, which then also
    sees what this block recorded). Costs nothing beyond keeping those references."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, GateRecorder)}
    before = {name: (m.record_gates, m.last_gates) for name, m in modules.items()}
    for m in modules.values():
        m.record_gates, m.last_gates = True, None
    captured: dict[str, dict[str, Tensor]] = {}
    try:
        yield captured
    finally:
        for name, m in modules.items():
            if m.last_gates is not None:
                captured[name] = m.last_gates
            recording, earlier = before[name]
            m.record_gates = recording
            m.last_gates = (m.last_gates if m.last_gates is not None else earlier) if recording else None


def stage_of(module_name: str) -> int | None:
    """The ResNet stage (1-4) a module belongs to, from its name: ``layer3.1.attention`` -> 3,
    ``stage_attention.0`` (BAM, after ``layer1``) -> 1; ``None`` if the name says nothing."""
    match = re.match(r"(?:.*\.)?layer(\d+)\.", module_name)
    if match:
        return int(match.group(1))
    match = re.match(r"(?:.*\.)?stage_attention\.(\d+)$", module_name)
    return int(match.group(1)) + 1 if match else None


@torch.no_grad()
def attention_gates(model: nn.Module, x: Tensor) -> dict[int, dict[str, dict[str, Tensor]]]:
    """The gates of every attention module of ``model`` for the batch ``x (B, 3, H, W)``, from one
    forward pass, grouped by stage: ``{stage: {module name: {"spatial": (B, 1, h, w), ...}}}``
    (modules in network order; see the module docstring for the keys). The model must be in eval
    mode (:class:`~lgam.errors.UsageError` otherwise: in train mode the pass would use, and update,
    BatchNorm's batch statistics)."""
    if model.training:
        raise UsageError("the model is in training mode: call model.eval() first (in training mode "
                         "the gates would use, and update, the batch's BatchNorm statistics)")
    with capture_gates(model) as captured:
        model(x)
    stages: dict[int, dict[str, dict[str, Tensor]]] = {}
    for name, gates in captured.items():
        stages.setdefault(stage_of(name) or 0, {})[name] = gates
    return dict(sorted(stages.items()))


def stage_gate(captured: dict[str, dict[str, Tensor]], stage: int | None = None
               ) -> tuple[str, Tensor] | None:
    """``(module name, spatial gate (B, 1, h, w))`` of the last module in ``stage`` that records
    a spatial gate (``stage=None``: the last stage that has one), from :func:`capture_gates`'s
    dict; ``None`` when there is none (SE, a plain network, BAM after the last stage)."""
    found = [(stage_of(name) or 0, name, g["spatial"]) for name, g in captured.items()
             if "spatial" in g]
    if stage is not None:
        found = [f for f in found if f[0] == stage]
    if not found:
        return None
    last = max(f[0] for f in found)
    _, name, gate = [f for f in found if f[0] == last][-1]  # network order: the stage's last
    return name, gate
