"""``lgam gates``: how the attention modules' own spatial gates behave on real images, per stage.

For every model and stage, over the val images (the whole image resized to the model's input size,
as in evaluation): the mean gate, the fraction of positions at exactly 0.5 (LGAM's
``M_spat = sigmoid(ReLU(S))`` is 0.5 wherever the channel sum ``S <= 0``, eq (6)), the fraction
above 0.99 and below 0.01 (a near-binary mask), from one forward pass per batch
(:func:`lgam.attention.capture_gates`). Every module of a stage counts.

    lgam gates --checkpoints checkpoints --data ../shared/data/imagenet20 --limit 500
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .attention import capture_gates, stage_of
from .checkpoints import load_checkpoint, load_manifest
from .data import DecodedSplit, load_split, resize_normalize
from .models import FIGURE5_MODELS

__all__ = ["gate_statistics", "format_gate_table", "configure_parser", "main"]

#: a gate at or above this is "open", at or below 1 - this "closed"
SATURATED = 0.99


@torch.no_grad()
def gate_statistics(model: nn.Module, split: DecodedSplit, size: int, mean: Sequence[float],
                    std: Sequence[float], batch_size: int = 64) -> dict[int, dict[str, float]]:
    """``{stage: {"mean", "at_half", "open", "closed", "modules"}}`` over ``split``'s images
    (fractions of all gate positions of the stage's modules); ``{}`` for a model without spatial
    gates."""
    model.eval()
    sums: dict[int, Tensor] = {}  # stage -> [count, sum, at 0.5, > 0.99, < 0.01]
    modules: dict[int, set[str]] = {}
    for i in range(0, len(split), batch_size):
        x = resize_normalize(split.images[i:i + batch_size], size, mean, std)
        with capture_gates(model) as captured:
            model(x)
        for name, gates in captured.items():
            if "spatial" not in gates:
                continue
            g = gates["spatial"].double()
            stage = stage_of(name) or 0
            row = torch.stack([torch.tensor(float(g.numel()), dtype=torch.float64), g.sum(),
                               (g == 0.5).sum(), (g >= SATURATED).sum(), (g <= 1 - SATURATED).sum()])
            sums[stage] = sums.get(stage, 0) + row
            modules.setdefault(stage, set()).add(name)
    return {stage: {"mean": float(s[1] / s[0]), "at_half": float(s[2] / s[0]),
                    "open": float(s[3] / s[0]), "closed": float(s[4] / s[0]),
                    "modules": len(modules[stage])}
            for stage, s in sorted(sums.items())}


def format_gate_table(stats: dict[str, dict[int, dict[str, float]]], images: int) -> str:
    """Markdown: one row per model and stage, fractions in %."""
    lines = ["| model | stage | modules | mean gate | at 0.5 (%) | > 0.99 (%) | < 0.01 (%) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, stages in stats.items():
        if not stages:
            lines.append(f"| {name} | — | 0 | — | — | — | — |")
        for stage, s in stages.items():
            lines.append(
                f"| {name} | {stage} | {s['modules']} | {s['mean']:.3f} | "
                f"{100 * s['at_half']:.1f} | {100 * s['open']:.1f} | "
                f"{100 * s['closed']:.1f} |")
    lines.append(f"\nVal images: {images}, each resized whole to the model's input size.")
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", default="checkpoints", help="folder with manifest.json")
    p.add_argument("--data", required=True, help="val data (as lgam evaluate --data)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="models (default: the attention models of Figure 5 in the manifest)")
    p.add_argument("--limit", type=int, default=500, help="val images, spread over the classes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")


def main(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.checkpoints)["models"]
    names = args.models or [n for n in FIGURE5_MODELS if n in manifest and n != "resnet18"]
    split = load_split(args.data, "val", limit=args.limit)
    stats: dict[str, Any] = {}
    for name in names:
        model, entry = load_checkpoint(args.checkpoints, name)
        stats[name] = gate_statistics(model, split, int(entry["input_size"]), entry["mean"],
                                      entry["std"], args.batch_size)
    table = format_gate_table(stats, len(split))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.gatestats"))
