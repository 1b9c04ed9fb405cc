"""Summarise short recipe-screening runs (issue 22): train loss per epoch of every model beside
plain ResNet18's on the same batches, val error at the last epoch, and the across-image std of the
gates of each attention model (``lgam gates``' statistics on the run's current weights).

Each ARM is an ``lgam train --out`` folder in which ``resnet18`` and attention models were trained
side by side (same seed, same batches), e.g. with ``--stop-after 4``:

    python scripts/screen_recipes.py ~/.cache/lgam-runs/screen/skipinit-s0 ~/.cache/lgam-runs/screen/zero-s0 \
        --data ../shared/data/imagenet20 --out docs/results/recipe-screen.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lgam.data import IMAGENET_MEAN, IMAGENET_STD, load_split
from lgam.evaluate import load_run_model
from lgam.gatestats import gate_statistics
from lgam.runstate import CONFIG, LOG


def arm_label(config: dict) -> str:
    r = config["recipe"]
    scale, rms = r.get("residual_bn_scale", 1.0), r.get("branch_rms", 0.0)
    init = ("skip_init" if r.get("skip_init") else "zero_init_residual" if r["zero_init_residual"]
            else f"residual_bn_scale={scale:g}" if scale != 1.0 else f"branch_rms={rms:g}" if rms
            else "standard init")
    return f"{init}, seed {config['seed']}"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / LOG).read_text().splitlines()]


def last_val(run: Path) -> float | None:
    vals = [json.loads(line).get("val_top1_err") for line in (run / LOG).read_text().splitlines()]
    vals = [v for v in vals if v is not None]
    return vals[-1] if vals else None


def gate_std(run: Path, split, size: int) -> str:
    """``stage: std`` of the most varying gate kind per stage, e.g. ``1: .05 2: .09 ...``."""
    stats = gate_statistics(load_run_model(run), split, size, IMAGENET_MEAN, IMAGENET_STD)
    return " ".join(f"{stage}: {max(k['img_std'] for k in kinds.values()):.3f}"
                    for stage, kinds in stats.items()) or "—"


def arm_table(arm: Path, split, size: int) -> list[str]:
    runs = sorted(p for p in arm.iterdir() if (p / LOG).exists())
    names = [p.name for p in runs]
    if "resnet18" not in names:
        raise SystemExit(f"{arm}: no resnet18 run to compare with")
    config = json.loads((arm / "resnet18" / CONFIG).read_text())
    base = losses(arm / "resnet18")
    epochs = len(base)
    lines = [f"### {arm.name}: {arm_label(config)}", "",
             "| model | " + " | ".join(f"loss ep {e + 1}" for e in range(epochs))
             + " | Δ loss vs plain, ep " + str(epochs) + f" | val err ep {epochs} (%) | gate std across images by stage |",
             "|---|" + "---:|" * (epochs + 3)]
    for run in runs:
        ls = losses(run)[:epochs]
        diff = "" if run.name == "resnet18" else f"{ls[-1] - base[-1]:+.4f}"
        val = last_val(run)
        std = "—" if run.name == "resnet18" else gate_std(run, split, size)
        lines.append(f"| {run.name} | " + " | ".join(f"{x:.4f}" for x in ls) + f" | {diff} | "
                     + ("—" if val is None else f"{val:.2f}") + f" | {std} |")
    lines += ["", f"Command: `{' '.join(config['argv'])}` (commit {config.get('git_commit')}, "
              f"dirty: {config.get('git_dirty')}).", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arms", nargs="+", type=Path, help="lgam train --out folders")
    p.add_argument("--data", required=True, help="data with a val split (for the gate statistics)")
    p.add_argument("--limit", type=int, default=500, help="val images for the gate statistics")
    p.add_argument("--size", type=int, default=128, help="input size for the gate statistics")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    args = p.parse_args(argv)
    split = load_split(args.data, "val", limit=args.limit)
    lines = [f"Gate std: the std over {len(split)} val images ({args.size} px) of each gate unit, "
             "averaged per stage, of the gate kind that varies most (SE/CBAM: channel; SGE/LGAM: spatial).", ""]
    for arm in args.arms:
        lines += arm_table(arm, split, args.size)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
