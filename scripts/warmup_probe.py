"""Probe a recipe's first epoch (its warm-up) step by step: loss, gradient norm and SkipInit's gains
every few steps, on a subset of the training images. How the ``cpu`` recipe's block initialisation
was chosen (docs/results/recipe-screen.md): whether a model trains, stalls at chance (loss ~3.0
with 20 classes and label smoothing) or diverges (NaN) while the learning rate ramps up.

    python scripts/warmup_probe.py --model resnet18_lgam --set branch_rms=0 \
        --set skip_init=true --set skip_gain_lr=1.0 --steps 150

(``branch_rms=0``: the ``cpu`` recipe now starts its branches with ``branch_rms=0.5``, and a
recipe takes one way to start them; the screen ran on its earlier form, ``zero_init_residual``.)
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import lgam
from lgam.data import DeviceAugment, load_split
from lgam.recipes import lr_at, make_recipe, param_groups
from lgam.train import init_batch, init_blocks, model_kwargs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/imagenet20")
    p.add_argument("--recipe", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--images", type=int, default=4096, help="training images (spread over the classes)")
    p.add_argument("--clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--steps-per-epoch", type=int, default=144, help="the full set's, for the schedule")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channel-gains", action="store_true",
                   help="SkipInit's gains per channel (C, 1, 1) instead of one scalar per block")
    args = p.parse_args(argv)

    recipe = make_recipe(args.recipe, args.overrides)
    torch.manual_seed(args.seed)
    split = load_split(args.data, "train", limit=args.images)
    model = lgam.create_model(args.model, num_classes=len(split.classes), **model_kwargs(recipe))
    init_blocks(model, recipe, init_batch(split.images, recipe, args.seed))
    if args.channel_gains:
        for m in model.modules():
            if getattr(m, "skip_gain", None) is not None:
                m.skip_gain = torch.nn.Parameter(torch.zeros(m.bn2.num_features, 1, 1))
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(param_groups(model, recipe), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    augment = DeviceAugment(recipe.train_size_start or recipe.train_size, train=True,
                            scale=(recipe.crop_scale_min, 1.0))
    gen = torch.Generator().manual_seed(args.seed + 1)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    print(f"{args.model} {recipe}", flush=True)
    for step in range(args.steps):
        idx = torch.randint(0, len(split), (recipe.batch_size,), generator=gen)
        x = augment(split.images[idx], generator=gen).contiguous(memory_format=torch.channels_last)
        lr = lr_at(recipe, step, args.steps_per_epoch)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss = criterion(model(x), split.labels[idx])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip or math.inf)
        opt.step()
        gains = [round(float(m.skip_gain.detach().abs().mean()), 2) for m in model.modules()
                 if getattr(m, "skip_gain", None) is not None]
        if step % args.every == 0 or not torch.isfinite(loss):
            print(f"step {step:>4}  lr {lr:.4f}  loss {float(loss):.3f}  grad norm {float(norm):.1f}  "
                  f"{1e3 * (time.perf_counter() - t):.0f} ms  gains {gains}", flush=True)
        if not torch.isfinite(loss):
            print("diverged", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
