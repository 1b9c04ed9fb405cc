"""Kernel launches per resnet18 training step and eval forward, per model and LGAM path: what a
GPU pays per launch (a few microseconds each, whatever the kernel does) where batches are small
enough that launches, not arithmetic, bound a step.

Counted without a GPU: every torch op that runs a kernel (views and allocations do not) plus
every launch of LGAM's Triton kernels, which run here interpreted on CPU tensors (the counts are
those a GPU would see; ``TRITON_INTERPRET=1`` is set before Triton loads, where there is no GPU).
bf16 autocast + channels_last, as the recipe trains; the optimiser's step is not counted.

    python benchmarks/lgam_launches.py [--batch 2] [--size 32]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton loads: its kernels on CPU tensors

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lgam import create_model  # noqa: E402
from lgam.attention import _lgam_kernel, _lgam_triton, fused_kernels  # noqa: E402
from lgam.models import FIGURE5_MODELS  # noqa: E402

#: (table row, model, LGAM's fused Triton kernels or its eager path)
ROWS = [(name, name, False) for name in FIGURE5_MODELS if name != "resnet18_lgam"] + [
    ("resnet18_lgam, eager", "resnet18_lgam", False), ("resnet18_lgam, Triton kernels", "resnet18_lgam", True)]
#: ops that run no kernel: allocations, and bookkeeping the dispatcher sees
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "set_"}


class Launches(TorchDispatchMode):
    """Counts the torch ops under it that run a kernel (views and allocations excluded; nothing
    while ``paused``: the interpreter's own copies inside a Triton launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class CountedKernel:
    """One of LGAM's Triton kernels, its launches counted as one each."""

    def __init__(self, kernel, mode: Launches, name: str) -> None:
        self.kernel, self.mode, self.name = kernel, mode, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.mode.ops[f"triton:{self.name}"] += 1
            self.mode.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.mode.paused = False
        return launch


def count(model: torch.nn.Module, x: torch.Tensor, train: bool) -> Counter:
    """Launches of one training step (forward + backward) or eval forward of ``model`` on ``x``."""
    model.train(train)
    mode = Launches()
    kernels = {n: getattr(_lgam_triton, n) for n in ("_scales_kernel", "_scales_backward_kernel",
                                                      "_forward_kernel", "_backward_kernel")}
    try:
        for n, k in kernels.items():
            setattr(_lgam_triton, n, CountedKernel(k, mode, n))
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            if train:
                model(x).float().square().mean().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for n, k in kernels.items():
            setattr(_lgam_triton, n, k)
    return mode.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    print(f"Kernel launches per step, batch {args.batch}, {args.size} px, bf16 autocast + channels_last "
          f"(optimiser step not counted; 8 LGAM modules in resnet18_lgam)\n")
    print("| model | training step | eval forward | the attention's share of a step (per module) |")
    print("|---|---:|---:|---:|")
    base = None
    for row, name, triton in ROWS:
        if triton and _lgam_triton.triton_missing():
            print(f"| {row} | ({_lgam_triton.triton_missing()}) | | |")
            continue
        torch.manual_seed(0)
        model = create_model(name, num_classes=20).to(memory_format=torch.channels_last)
        saved = dict(_lgam_kernel.BACKENDS)
        _lgam_kernel.BACKENDS["cpu"] = _lgam_triton.triton_kernels()  # CPU tensors: interpreted
        try:
            with fused_kernels(triton):
                step, fwd = (sum(count(model, x, train).values()) for train in (True, False))
        finally:
            _lgam_kernel.BACKENDS.clear()
            _lgam_kernel.BACKENDS.update(saved)
        base = step if base is None else base
        share = "" if name == "resnet18" else f"{step - base} ({(step - base) / 8:.0f})"
        print(f"| {row} | {step} | {fwd} | {share} |")


if __name__ == "__main__":
    main()
