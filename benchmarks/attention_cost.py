"""CPU cost of the six ResNet18 variants and LGAM's activation growth at initialisation.

Prints, for resnet18 / _se / _sge / _cbam / _bam / _lgam (ImageNet stem, 20 classes):

1. throughput as a ratio to plain resnet18, measured in one run: eval-mode forward and a training
   step (forward + backward + SGD, augmentation included), in float32 and in the fast path (bf16
   autocast + channels_last), at each ``--ratio-sizes`` (batch ``--ratio-batch``). The models are
   timed in interleaved rounds and each cell is the median over rounds, so a noisy neighbour
   slows every model alike instead of one. LGAM takes its op where its kernels run (the C++
   ones, on the CPU where they build; ``lgam.attention.set_fused_kernels``); the row
   "resnet18_lgam (eager)" is the same model with it off (its equations as plain tensor ops);
2. forward and forward+backward latency at batch 1 and 32, 224 px, float32 (median of ``--reps``,
   of ``--reps // 2`` for forward+backward at batches above 8; forward in eval mode;
   forward+backward in train mode, except at batch 1 where BN stays in eval mode);
3. for LGAM with G=4 (r=16) and G=32 (r=2): std(y_k) / std(x_k) per group at initialisation (train
   and eval mode), the module's std(A'') / std(A), and the std of the whole network's logits.

    python benchmarks/attention_cost.py [--ratio-sizes 128 224] [--rounds 3] [--skip-latency]
    python benchmarks/attention_cost.py --device cuda --ratio-batch 128 [--compile | --cuda-graphs] --skip-latency --skip-growth
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Iterator, Sequence

import torch

import lgam
from lgam.attention import fused_kernels
from lgam.attention.lgam import lgam_reference
from lgam.attention.lgam.kernels import kernel_missing
from lgam.device import bf16_native, device_summary, resolve_device
from lgam.models import FIGURE5_MODELS
from train_throughput import captured, step_seconds  # the training step, timed as lgam train runs it

#: the same model as resnet18_lgam with LGAM's op (its CPU kernels) off: its equations
EAGER_LGAM = "resnet18_lgam (eager)"
VARIANTS = list(FIGURE5_MODELS) + [EAGER_LGAM]


@contextlib.contextmanager
def variant(name: str) -> Iterator[str]:
    """The model name to build for table row ``name``, with LGAM's op off for ``EAGER_LGAM``
    (elsewhere LGAM takes it where its C++ kernels run, on the CPU)."""
    if name != EAGER_LGAM:
        yield name
        return
    with fused_kernels(False):
        yield "resnet18_lgam"


def _median_ms(fn, reps: int, sync=lambda: None) -> float:
    fn()  # warm-up (with --compile: the compilation)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def forward_seconds(name: str, batch: int, size: int, steps: int, fast: bool,
                    device: torch.device = torch.device("cpu"), compile: bool = False,
                    cuda_graph: bool = False) -> float:
    """Median seconds of an eval-mode forward (``fast``: bf16 autocast + channels_last;
    ``cuda_graph``: replayed as a captured CUDA graph)."""
    torch.manual_seed(0)
    model = lgam.create_model(name, num_classes=20).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if fast:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if compile:  # a fresh graph for every cell: past dynamo's recompile limit it would run eager
        torch._dynamo.reset()
    net = torch.compile(model, dynamic=False) if compile else model  # see lgam.train
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast, cache_enabled=not cuda_graph):
            net(x)

    with torch.no_grad():
        run = captured(forward).replay if cuda_graph else forward
        return _median_ms(run, steps, sync) / 1e3


def speed_ratios(sizes: list[int], batch: int, rounds: int, steps: int,
                 device: torch.device = torch.device("cpu"), compile: bool = False,
                 modes: tuple[str, ...] = ("fwd", "train"), cuda_graph: bool = False,
                 rows: Sequence[str] = tuple(VARIANTS)) -> None:
    """Throughput of each of ``rows`` (variants, resnet18 first) / throughput of resnet18, per
    size, precision and mode (``compile``, ``cuda_graph``: the fast path alone, each model under
    ``torch.compile``, replayed as a CUDA graph)."""
    fast_note = "" if bf16_native(device) else " (no native bf16 here: emulated, slower than float32)"
    how = (", torch.compile" if compile else "") + (", CUDA graphs" if cuda_graph else "")
    print(f"\n## Throughput relative to resnet18 ({device.type}{how}, batch {batch}, median over "
          f"{rounds} interleaved rounds of {steps} steps){fast_note}\n")
    precisions = (True,) if compile or cuda_graph else (False, True)
    columns = [(size, fast, mode) for size in sizes for fast in precisions for mode in modes]
    seconds: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for size, fast, mode in columns:
            for name in rows:
                with variant(name) as model_name:
                    s = (forward_seconds(model_name, batch, size, steps, fast, device, compile, cuda_graph)
                         if mode == "fwd" else step_seconds(model_name, device, batch, size, steps, 1, compile,
                                                            fast, cuda_graph))
                seconds.setdefault((name, size, fast, mode), []).append(s)
                print(f"<!-- {name} {mode} {'bf16' if fast else 'fp32'} {size}: {s * 1e3:.2f} ms -->",
                      flush=True)  # each cell as it comes: a run stopped early keeps them
    heads = [f"{mode} {'bf16' if fast else 'fp32'} {size}" for size, fast, mode in columns]
    print("| model | " + " | ".join(heads) + " |\n|---|" + "---:|" * len(heads))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print("| resnet18 img/s | " + " | ".join(
        f"{batch / median[('resnet18', *c)]:.0f}" for c in columns) + " |")
    for name in rows:
        print(f"| {name} | " + " | ".join(
            f"{median[('resnet18', *c)] / median[(name, *c)]:.2f}" for c in columns) + " |", flush=True)


def latency(reps: int, batches: list[int], size: int) -> None:
    print(f"\n## Latency, CPU, {size} px, median of {reps} (ms)\n")
    cols = [f"{k} b{b}" for b in batches for k in ("fwd", "fwd+bwd")]
    print("| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    warm = lgam.create_model("resnet18", num_classes=20)  # allocator and thread-pool warm-up, so
    warm.train(max(batches) > 1)  # the first row is not penalised (frozen BN at batch 1, as below)
    warm(torch.randn(max(batches), 3, size, size)).sum().backward()
    del warm
    for name in FIGURE5_MODELS:  # float32, NCHW: LGAM's eager path
        model = lgam.create_model(name, num_classes=20)
        cells = []
        for b in batches:
            x = torch.randn(b, 3, size, size)
            model.eval()
            with torch.inference_mode():
                cells.append(_median_ms(lambda: model(x), reps))
            # batch 1: BatchNorm1d (LGAM, BAM) cannot use batch statistics, so time the backward
            # with frozen BN statistics, as in a Grad-CAM backward or frozen-BN fine-tuning
            model.train(b > 1)

            def step():
                model.zero_grad(set_to_none=True)
                model(x).sum().backward()

            cells.append(_median_ms(step, max(1, reps // 2) if b > 8 else reps))
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


@torch.no_grad()
def growth(groups: int, reduction: int, channels: int = 256, hw: int = 14, batch: int = 16) -> None:
    torch.manual_seed(0)
    module = lgam.LGAM(channels, groups=groups, reduction=reduction)
    x = torch.randn(batch, channels, hw, hw)
    print(f"\n### LGAM G={groups}, r={reduction} (C={channels}, x ~ N(0, 1), {batch}x{hw}x{hw})\n")
    show = sorted({1, 2, 3, 4, groups // 4, groups // 2, groups} - {0})
    print("| mode | " + " | ".join(f"y_{k}" for k in show) + " | A''/A |\n|---|" + "---:|" * (len(show) + 1))
    for mode in ("train", "eval"):
        module.train(mode == "train")
        out, ys = lgam_reference(module, x, return_ladder=True)
        xs = x.chunk(groups, dim=1)
        ratios = [(ys[k - 1].std() / xs[k - 1].std()).item() for k in show]
        print(f"| {mode} | " + " | ".join(f"{r:.3g}" for r in ratios) + f" | {(out.std() / x.std()).item():.3g} |")


@torch.no_grad()
def network_growth(size: int = 224) -> None:
    print("\n### Whole network at initialisation: std of the logits (batch 8)\n")
    print("| model | train mode (batch statistics) | eval mode (default running statistics) |\n|---|---:|---:|")
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name in ("resnet18", "resnet18_lgam", "resnet18_lgam_g32"):
        torch.manual_seed(0)
        m = lgam.create_model(name, num_classes=20)
        stds = [m.train(mode)(x).std().item() for mode in (True, False)]
        print(f"| {name} | {stds[0]:.3g} | {stds[1]:.3g} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--ratio-sizes", type=int, nargs="*", default=[128, 224],
                   help="input sizes of the throughput-ratio table (none: skip it)")
    p.add_argument("--ratio-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ratio table")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
    p.add_argument("--models", nargs="+", choices=VARIANTS, metavar="MODEL",
                   help=f"rows of the ratio table (default: all of {', '.join(VARIANTS)}; resnet18 is always in it)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-growth", action="store_true")
    p.add_argument("--device", default="cpu", help="device of the ratio table (cpu, cuda)")
    p.add_argument("--modes", nargs="+", choices=("fwd", "train"), default=("fwd", "train"),
                   help="columns of the ratio table: eval forward, training step")
    p.add_argument("--compile", action="store_true",
                   help="ratio table of the fast path with every model under torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="ratio table of the fast path, each step replayed as one CUDA graph (needs --device cuda)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs --device cuda (a GPU)")
    why = kernel_missing()
    print(f"# `{' '.join(sys.argv)}`\n# machine: {device_summary(device)}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__}; CPU tables: {torch.get_num_threads()} threads; LGAM on the CPU: "
          + ("its C++ kernels" if why is None else f"its equations (no kernels here: {why})"))
    if args.ratio_sizes:
        rows = VARIANTS if not args.models else ["resnet18"] + [m for m in args.models if m != "resnet18"]
        speed_ratios(args.ratio_sizes, args.ratio_batch, args.rounds, args.steps, device, args.compile,
                     tuple(args.modes), args.cuda_graphs, rows)
    if not args.skip_latency:
        latency(args.reps, args.batches, args.size)
    if args.skip_growth:
        return
    print("\n## LGAM activation growth at initialisation: std(y_k) / std(x_k) per group k")
    growth(4, 16)
    growth(32, 2)
    network_growth(args.size)


if __name__ == "__main__":
    main()
