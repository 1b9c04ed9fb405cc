"""What LGAM's two-part mixing matrix costs: one module's bf16 forward + backward with ``T`` as
one bf16 copy (the rounding that lost 3.4 % of a G=32 module's output) against ``hi + lo``
(:func:`lgam.attention.lgam.split_in`), interleaved in one run, per stage shape.

    python benchmarks/lgam_mixing.py [--batch 32] [--reps 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lgam.attention.lgam as lgam_module
from lgam import LGAM

#: (channels, side) of resnet18's stages 1 and 2 at 128 px, where LGAM takes the matrix route
SHAPES = [(64, 32), (128, 16)]


def one_part(t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    two_parts = lgam_module.split_in
    print("| C, side | T in one bf16 part (ms) | hi + lo (ms) | ratio |\n|---|---:|---:|---:|")
    for c, side in SHAPES:
        torch.manual_seed(0)
        m = LGAM(c, groups=4, reduction=16).train()
        x = torch.randn(args.batch, c, side, side).to(memory_format=torch.channels_last)
        x.requires_grad_(True)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(x.bfloat16())
            y.float().sum().backward()

        times: dict[str, list[float]] = {"one": [], "two": []}
        try:
            for _ in range(3):
                step()
            for _ in range(args.reps):
                for name, split in (("one", one_part), ("two", two_parts)):
                    lgam_module.split_in = split
                    t = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t) * 1e3)
        finally:
            lgam_module.split_in = two_parts
        one, two = (statistics.median(times[k]) for k in ("one", "two"))
        print(f"| {c}, {side}x{side} | {one:.2f} | {two:.2f} | {two / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
