"""Training throughput (images/s) of the six ResNet18 variants: forward + backward + SGD step,
float32 beside the fast path (bf16 autocast + channels_last) in one run.

Random uint8 images are augmented on the device exactly as ``lgam train`` does (random-resized-crop,
flip, normalise: included in the timing), ImageNet stem, 20 classes, SGD with Nesterov momentum.
The fast path is what ``lgam train`` uses on CUDA and on CPUs with native bf16
(:func:`lgam.device.bf16_native`); on other CPUs it is printed anyway, marked as emulated.
``--compile`` adds ``torch.compile``. Reports the median step time over ``--steps`` steps after
``--warmup`` steps; with ``--rounds N`` every model and path runs once per round, interleaved, and
the median over the rounds is reported ("fast vs resnet18" needs resnet18 among ``--models``).

    python benchmarks/train_throughput.py --device cpu --batch 64 --size 112 --steps 4
    python benchmarks/train_throughput.py --device cuda --batch 256 --size 160 --steps 50
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lgam
from lgam.cli import positive_int
from lgam.data import DeviceAugment
from lgam.device import bf16_native, device_summary
from lgam.models import FIGURE5_MODELS

VARIANTS = list(FIGURE5_MODELS)


def step_seconds(name: str, device: torch.device, batch: int, size: int, steps: int, warmup: int,
                 compile: bool, fast: bool, cuda_graph: bool = False) -> float:
    """Median seconds of one training step of model ``name``; ``fast``: bf16 autocast + channels_last;
    ``cuda_graph``: forward, backward and SGD step replayed as one captured CUDA graph."""
    cuda = device.type == "cuda"
    if cuda_graph and not cuda:
        raise ValueError("CUDA graphs need --device cuda")
    torch.manual_seed(0)
    model = lgam.create_model(name, num_classes=20).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    if compile:  # a fresh graph for every cell: past dynamo's recompile limit it would run eager
        torch._dynamo.reset()
    net = torch.compile(model, dynamic=False) if compile else model  # see lgam.train
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, 20, (batch,), device=device, generator=gen)
    augment = DeviceAugment(size, train=True)

    def update(x: torch.Tensor) -> None:
        # no autocast weight cache: a CUDA graph must not capture a cast made before it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast, cache_enabled=not cuda_graph):
            loss = criterion(net(x), labels)
        opt.zero_grad(set_to_none=True)  # captured: backward writes the graph's own gradients
        loss.backward()
        opt.step()

    def batch_in() -> torch.Tensor:
        x = augment(images, generator=gen)
        return x.contiguous(memory_format=torch.channels_last) if fast else x

    step = _graphed(update, batch_in) if cuda_graph else (lambda: update(batch_in()))
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _graphed(update, batch_in):
    """The step for a captured ``update``: a new batch from ``batch_in()`` copied into the graph's
    static input, then the graph replayed (PyTorch's "whole-network capture")."""
    static_x = batch_in()
    graph = captured(lambda: update(static_x))

    def step() -> None:
        static_x.copy_(batch_in())
        graph.replay()
    return step


def captured(fn) -> torch.cuda.CUDAGraph:
    """``fn()`` captured as a CUDA graph, after three warm-up calls on a side stream (as capture
    requires); ``.replay()`` reruns its kernels on the same tensors with one launch."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="training crop size in pixels")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (more with --compile)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="each step replayed as one captured CUDA graph (needs --device cuda)")
    p.add_argument("--models", nargs="+", default=VARIANTS)
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="interleaved rounds over every model and path (the median of their medians)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs --device cuda (a GPU)")
    where = "GPU (compute capability < 8.0)" if device.type == "cuda" else "CPU"
    native = "" if bf16_native(device) else (f" (emulated: this {where} has no native bf16; lgam train "
                                             "uses float32)")
    print(f"## Training throughput: {device_summary(device)}; batch {args.batch}, {args.size} px, "
          f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} interleaved round(s)"
          f"{', torch.compile' if args.compile else ''}{', CUDA graphs' if args.cuda_graphs else ''}; torch {torch.__version__}\n")
    print(f"fast = bf16 autocast + channels_last{native}\n")
    print("| model | float32 img/s | fast img/s | fast / float32 | fast vs resnet18 |\n|---|---:|---:|---:|---:|")
    cells = [(name, fast) for name in args.models for fast in (False, True)]
    seconds: dict[tuple[str, bool], list[float]] = {c: [] for c in cells}
    for _ in range(args.rounds):  # every model and path in each round: the ratios are measured together
        for name, fast in cells:
            seconds[(name, fast)].append(step_seconds(name, device, args.batch, args.size, args.steps,
                                                      args.warmup, args.compile, fast, args.cuda_graphs))
    med = {c: statistics.median(v) for c, v in seconds.items()}
    base = med.get(("resnet18", True))
    for name in args.models:
        slow, fast = med[(name, False)], med[(name, True)]
        vs = f"{base / fast:.2f}x" if base else "—"
        print(f"| {name} | {args.batch / slow:.1f} | {args.batch / fast:.1f} | {slow / fast:.2f}x | {vs} |")


if __name__ == "__main__":
    main()
