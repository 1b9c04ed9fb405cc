"""What one LGAM module costs on each path, per resnet18 stage shape: its equations as plain tensor
ops ("LGAM eager", ``set_fused_kernels(False)``) against its op ("LGAM fused", the C++ kernels,
``lgam.attention.lgam.ops``),
with SE for scale; bf16 autocast + channels_last (``--float32``: float32, contiguous), eval-mode
forward and training forward + backward, interleaved in one run; the totals are over resnet18's
eight modules.

    python benchmarks/lgam_paths.py [--batch 32] [--size 128] [--reps 10] [--float32] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from lgam.attention import LGAM, SE, fused_kernels
from lgam.attention.lgam.kernels import kernel_missing
from lgam.device import device_summary

ROWS = ("SE", "LGAM eager", "LGAM fused")


def stage_shapes(size: int) -> list[tuple[int, int]]:
    """(channels, side) of resnet18's four stages at input ``size`` (two blocks each)."""
    return [(64 * 2**i, size // 4 // 2**i) for i in range(4)]


def module_steps(row: str, channels: int, side: int, batch: int, fast: bool) -> dict[str, Callable[[], None]]:
    """``fwd`` (eval, no grad) and ``train`` (forward + backward) of one module of kind ``row``
    (``fast``: bf16 autocast + channels_last, else float32)."""
    torch.manual_seed(0)
    m = SE(channels) if row == "SE" else LGAM(channels)
    x = torch.randn(batch, channels, side, side)
    if fast:
        x = x.bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)

    def fwd() -> None:
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            m(x)

    def train() -> None:
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            y = m(xg)
        torch.autograd.grad(y, xg, g)

    return {"fwd": fwd, "train": train}


def timed(row: str, fn: Callable[[], None]) -> float:
    with fused_kernels(row == "LGAM fused"):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--float32", action="store_true", help="float32, contiguous (default: bf16 + channels_last)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.batch < 2:
        p.error("--batch must be at least 2: the training rows run LGAM in train mode, whose BatchNorm1d "
                "normalises over the batch")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# `{' '.join(sys.argv)}`: {device_summary(torch.device('cpu'))}, torch {torch.__version__}")
    rows = ROWS if kernel_missing() is None else ROWS[:2]
    if len(rows) < len(ROWS):
        print(f"note: no fused path here ({kernel_missing()})")
    shapes = stage_shapes(args.size)
    steps = {(r, s): module_steps(r, *s, args.batch, not args.float32) for r in rows for s in shapes}
    times: dict[tuple, list[float]] = {}
    for rep in range(args.reps + 2):  # two warm-up rounds (the kernels build in the first)
        for key, fns in steps.items():
            for mode, fn in fns.items():
                ms = timed(key[0], fn)
                if rep >= 2:
                    times.setdefault((*key, mode), []).append(ms)
    heads = [f"{c}ch {s}x{s} {mode}" for c, s in shapes for mode in ("fwd", "train")]
    how = "float32, contiguous" if args.float32 else "bf16 autocast + channels_last"
    print(f"\n## One module, ms (batch {args.batch}, {args.size} px input, {how}, median of {args.reps})\n")
    print("| module | " + " | ".join(heads) + " | 8 modules fwd | 8 modules train |")
    print("|---|" + "---:|" * (len(heads) + 2))
    for r in rows:
        med = {(s, mode): statistics.median(times[(r, s, mode)]) for s in shapes for mode in ("fwd", "train")}
        total = {mode: 2 * sum(med[(s, mode)] for s in shapes) for mode in ("fwd", "train")}
        print(f"| {r} | " + " | ".join(f"{med[(s, mode)]:.2f}" for s in shapes for mode in ("fwd", "train"))
              + f" | {total['fwd']:.1f} | {total['train']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
