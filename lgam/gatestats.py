"""``lgam gates``: how the attention modules' own gates behave on real images, per stage.

For every model, stage and kind of gate (``channel``: SE's and CBAM's per-channel gates;
``spatial``: CBAM's, SGE's, BAM's and LGAM's maps, SGE's the mean of its groups' maps; ``groups``:
SGE's per-group maps, the gates it multiplies by: their signs differ from group to group, so
their mean can be nearly constant where they are not), over the val images (the whole image
resized to the model's input size, as in evaluation), from one forward pass per batch
(:func:`lgam.attention.capture_gates`); every module of a stage counts:

- ``mean``: the mean gate;
- ``img_std``: how much a gate varies *across images* (the std over images of each gate unit, a
  channel or a position, averaged over the units): a gate that does not depend on the image is a
  constant scale, which the convolutions could have learnt without it;
- ``dead``: the share of units whose across-image std is below 0.01 (:data:`DEAD_STD`);
- ``at_half``: the share of values at exactly 0.5 (LGAM's ``M_spat = sigmoid(ReLU(S))`` is 0.5
  wherever the channel sum ``S <= 0``, eq (6)); ``open`` / ``closed``: at or above 0.99 / at or
  below 0.01 (saturated, :data:`SATURATED`).

Below the gates, every model's residual branches (plain ResNet18's too, as the reference), per
block in forward order (:func:`branch_statistics`): the RMS of the branch a block adds against the
RMS of its identity path, and its attention module's output RMS against its input's. A branch far
above its identity makes the block less of a residual one; a module whose output is many times its
input amplifies what the convolutions feed it (LGAM's ladder, eq (4), multiplies by at least 1).

    lgam gates --checkpoints checkpoints --data ../shared/data/imagenet20 --limit 500
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._fileio import write_text
from ._format import DASH, format_or_dash
from .attention import capture_gates, fuses_residual, stage_of
from .checkpoints import load_checkpoint, load_manifest
from .cli import positive_int
from .data import DecodedSplit, load_split, resize_normalize
from .models import FIGURE5_MODELS
from .models.branch_init import residual_bns

__all__ = ["GATE_KINDS", "DEAD_STD", "SATURATED", "BRANCH_RMS", "gate_statistics", "format_gate_table",
           "branch_statistics", "format_branch_table", "configure_parser", "main"]

#: the gates reported, in the table's order
GATE_KINDS = ("channel", "spatial", "groups")
#: a gate at or above this is "open", at or below 1 - this "closed"
SATURATED = 0.99
#: a gate unit whose std across images is below this is "dead" (a constant)
DEAD_STD = 0.01
#: what :func:`branch_statistics` measures per residual block, as RMS over all values
BRANCH_RMS = ("identity", "attention_in", "attention_out", "branch")


class _Moments:
    """Running per-unit sums over images of one module's gate, plus the value counters."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | float = 0.0
        self.sq: Tensor | float = 0.0
        self.counts = torch.zeros(3, dtype=torch.float64)  # at 0.5, open, closed

    def add(self, g: Tensor) -> None:
        g = g.double().flatten(1)  # (B, units)
        self.n += g.shape[0]
        self.sum = self.sum + g.sum(0)
        self.sq = self.sq + g.square().sum(0)
        self.counts += torch.stack([(g == 0.5).sum(), (g >= SATURATED).sum(), (g <= 1 - SATURATED).sum()])

    def unit_std(self) -> Tensor:
        """(units,) std over the images (population)."""
        mean = self.sum / self.n
        return (self.sq / self.n - mean.square()).clamp_min(0).sqrt()


@torch.no_grad()
def gate_statistics(model: nn.Module, split: DecodedSplit, size: int, mean: Sequence[float],
                    std: Sequence[float], batch_size: int = 64) -> dict[int, dict[str, dict[str, float]]]:
    """``{stage: {kind: {"mean", "img_std", "dead", "at_half", "open", "closed", "modules"}}}``
    over ``split``'s images (``kind`` in :data:`GATE_KINDS`; fractions of all values, ``dead`` of
    all units); ``{}`` for a model without gates."""
    model.eval()
    moments: dict[tuple[str, str], _Moments] = {}  # (module, kind)
    for i in range(0, len(split), batch_size):
        x = resize_normalize(split.images[i:i + batch_size], size, mean, std)
        with capture_gates(model) as captured:
            model(x)
        for name, gates in captured.items():
            for kind in GATE_KINDS:
                if kind in gates:
                    moments.setdefault((name, kind), _Moments()).add(gates[kind])
    grouped: dict[int, dict[str, list[_Moments]]] = {}
    for (name, kind), m in moments.items():
        grouped.setdefault(stage_of(name) or 0, {}).setdefault(kind, []).append(m)
    return {stage: {kind: _summary(kinds[kind]) for kind in GATE_KINDS if kind in kinds}
            for stage, kinds in sorted(grouped.items())}


def _summary(modules: list[_Moments]) -> dict[str, float]:
    """One stage's statistics of one kind of gate, pooled over its modules."""
    unit_std = torch.cat([m.unit_std() for m in modules])
    values = sum(m.n * m.sum.numel() for m in modules)
    total = sum(float(m.sum.sum()) for m in modules)
    counts = sum(m.counts for m in modules)
    return {"mean": total / values, "img_std": float(unit_std.mean()),
            "dead": float((unit_std < DEAD_STD).double().mean()),
            "at_half": float(counts[0] / values), "open": float(counts[1] / values),
            "closed": float(counts[2] / values), "modules": len(modules)}


def format_gate_table(stats: dict[str, dict[int, dict[str, dict[str, float]]]], images: int) -> str:
    """Markdown: one row per model, stage and kind of gate, shares in %."""
    lines = ["| model | stage | gate | modules | mean | std across images | dead (%) | at 0.5 (%) "
             f"| ≥ {SATURATED} (%) | ≤ {1 - SATURATED:.2f} (%) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, stages in stats.items():
        if not stages:
            lines.append(f"| {name} | — | — | 0 | — | — | — | — | — | — |")
        for stage, kinds in stages.items():
            for kind, s in kinds.items():
                lines.append(
                    f"| {name} | {stage} | {kind} | {s['modules']} | {s['mean']:.3f} | {s['img_std']:.3f} | "
                    f"{100 * s['dead']:.1f} | {100 * s['at_half']:.1f} | {100 * s['open']:.1f} | "
                    f"{100 * s['closed']:.1f} |")
    lines.append(f"\nVal images: {images}, each resized whole to the model's input size. Dead: a gate "
                 f"unit (channel, position or group position) whose std across the images is below "
                 f"{DEAD_STD}.")
    return "\n".join(lines)


@torch.no_grad()
def branch_statistics(model: nn.Module, split: DecodedSplit, size: int, mean: Sequence[float],
                      std: Sequence[float], batch_size: int = 64) -> dict[str, dict[str, float]]:
    """``{block: {"identity", "attention_in", "attention_out", "branch"}}`` (:data:`BRANCH_RMS`)
    for every residual block that names its branch's last BN (``residual_bn``), in forward order,
    over ``split``'s images: the RMS of the identity path (after its downsample), of the attention
    module's input (that BN's output) and output, and of the branch the block adds (the module's
    output, times SkipInit's gain if the block has one); all four are ``(B, C, H, W)`` of one
    shape. ``{}`` for a model without such blocks (pre-activation blocks, e.g. WRN's)."""
    model.eval()
    sums: dict[str, Tensor] = {}  # block -> sums of squares of BRANCH_RMS, then the value count
    names = {m: n for n, m in model.named_modules()}
    handles = [h for block, _ in residual_bns(model) for h in _branch_hooks(names[block], block, sums)]
    try:
        for i in range(0, len(split), batch_size):
            model(resize_normalize(split.images[i:i + batch_size], size, mean, std))
    finally:
        for h in handles:
            h.remove()
    return {name: dict(zip(BRANCH_RMS, (s[:-1] / s[-1]).sqrt().tolist())) for name, s in sums.items()}


def _branch_hooks(name: str, block: nn.Module, sums: dict[str, Tensor]) -> list[Any]:
    """Forward hooks adding one block's sums of squares to ``sums[name]``."""
    def add(i: int, t: Tensor) -> None:
        s = sums.setdefault(name, torch.zeros(len(BRANCH_RMS) + 1, dtype=torch.float64))
        s[i] += t.double().square().sum()
        if i == 0:
            s[-1] += t.numel()

    def module_io(x: Tensor, out: Tensor) -> None:
        add(1, x)
        add(2, out)
        gain = getattr(block, "skip_gain", None)
        add(3, out if gain is None else out * gain)

    if fuses_residual(block.attention):
        # its forward returns the block's output ReLU(A'' + identity): run it again on its own
        # (a direct .forward call bypasses the hooks) for the branch A''
        attention = block.attention.register_forward_pre_hook(
            lambda m, args: module_io(args[0], m.forward(args[0])))
    else:
        attention = block.attention.register_forward_hook(lambda _m, args, out: module_io(args[0], out))
    if block.downsample is None:
        identity = block.register_forward_pre_hook(lambda _m, args: add(0, args[0]))
    else:
        identity = block.downsample.register_forward_hook(lambda _m, _args, out: add(0, out))
    return [identity, attention]


def format_branch_table(stats: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per model, two ratios per block in forward order."""
    blocks = next((list(b) for b in stats.values() if b), [])
    lines = [f"Blocks in forward order: {', '.join(blocks) or '—'}.\n",
             "| model | branch / identity RMS per block | attention module out / in RMS per block |",
             "|---|---|---|"]
    for name, per_block in stats.items():
        lines.append(f"| {name} | {_ratios(per_block, 'branch', 'identity')} "
                     f"| {_ratios(per_block, 'attention_out', 'attention_in')} |")
    return "\n".join(lines)


def _ratios(per_block: dict[str, dict[str, float]], num: str, den: str) -> str:
    return " / ".join(format_or_dash(b[num] / b[den] if b[den] else None, ".2f")
                      for b in per_block.values()) or DASH


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", default="checkpoints", help="folder with manifest.json")
    p.add_argument("--data", required=True, help="val data (as lgam evaluate --data)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="models (default: the models of Figure 5 in the manifest; plain ResNet18 in "
                        "the branch table only)")
    p.add_argument("--limit", type=positive_int, default=500, help="val images, spread over the classes")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", type=Path, help="also write the Markdown tables to this file")


def main(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.checkpoints)["models"]
    names = args.models or [n for n in FIGURE5_MODELS if n in manifest]
    split = load_split(args.data, "val", limit=args.limit)
    gates: dict[str, Any] = {}
    branches: dict[str, Any] = {}
    for name in names:
        model, entry = load_checkpoint(args.checkpoints, name)
        view = (split, int(entry["input_size"]), entry["mean"], entry["std"], args.batch_size)
        if args.models or name != "resnet18":  # plain has no gates: only its branches, the reference
            gates[name] = gate_statistics(model, *view)
        branches[name] = branch_statistics(model, *view)
    text = (format_gate_table(gates, len(split)) + "\n\nResidual branches (same images):\n\n"
            + format_branch_table(branches))
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.gatestats"))
