"""``lgam train``: train one or several models over the same data, batches and augmentation.

Every image is decoded once into a uint8 tensor that lives on the training device; each step
indexes a batch, random-resized-crops, flips and normalises it there (:class:`lgam.data.DeviceAugment`)
and feeds the *same* augmented batch to every model, each with its own optimiser, learning-rate
schedule, log and resume state. The recipe's bf16 autocast and channels_last apply on CUDA and on
CPUs with native bfloat16 (:func:`lgam.device.cpu_has_native_bf16`); elsewhere training runs in
float32 and says so once. A recipe with ``train_size_start`` grows the crop size from epoch to epoch
(progressive resizing, as FFCV does);
``--compile`` wraps each model in ``torch.compile``. Under ``torchrun --nproc_per_node N`` the same
command trains with DistributedDataParallel (NCCL on CUDA, gloo on CPU): every rank draws the same
global batch and augmentation and trains on its slice. BatchNorm normalises over each process's
slice (no SyncBatchNorm), so N processes train like one process with ``--set accum_steps=N``.

Outputs in ``OUT/MODEL/``: ``config.json`` (recipe, seed, command line, versions, device),
``log.jsonl`` (one line per epoch), ``state.safetensors`` + ``state.json`` (weights, optimiser and
random-generator states after the last finished epoch; no pickle). ``--resume`` continues from
there and gives the same weights as an uninterrupted run on CPU.

    lgam train --model resnet18 resnet18_lgam --data DATA --recipe fast --out runs/fast
    torchrun --nproc_per_node 2 -m lgam.train --model resnet18 --data DATA --out runs/ddp
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from ._fileio import atomic_write, atomic_write_json
from .device import bf16_native, device_summary, resolve_device
from .models import create_model, list_models

__all__ = [
    "Recipe", "RECIPES", "make_recipe", "lr_at", "train_size_at", "param_groups", "train", "summary_metrics", "configure_parser", "main",
]

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LOG = "log.jsonl"
CONFIG = "config.json"
RUNS = "runs"  # checkpoints/runs/MODEL/{config.json,log.jsonl}: each shipped model's training record


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run besides the data, the models and the seed.

    ``lr`` is the peak learning rate for ``batch_size`` (the global batch under DDP), which each
    process feeds as ``accum_steps`` micro-batches with accumulated gradients (BatchNorm sees a
    micro-batch, as it sees one process's share under DDP).
    ``schedule="step"`` multiplies it by ``gamma`` every ``step_epochs`` epochs; ``"cosine"``
    decays it per step to 0 after a linear warm-up of ``warmup_epochs``. ``bf16`` (autocast) and
    ``channels_last`` apply on CUDA and on CPUs with native bf16. ``train_size_start`` (0: off)
    starts the crops at that size and grows them linearly to ``train_size``, reached
    ``size_hold_epochs`` before the end (:func:`train_size_at`). ``bn_bias_decay=False`` exempts
    BatchNorm weights and all biases from weight decay.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    step_epochs: int
    gamma: float
    warmup_epochs: float
    label_smoothing: float
    train_size: int
    crop_scale_min: float
    bf16: bool
    channels_last: bool
    accum_steps: int
    train_size_start: int = 0
    size_hold_epochs: int = 0
    bn_bias_decay: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        for name in ("epochs", "batch_size", "step_epochs", "train_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.train_size_start < 0 or self.size_hold_epochs < 0:
            raise ValueError("train_size_start and size_hold_epochs must be >= 0")
        if self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("warmup_epochs must be >= 0 and label_smoothing in [0, 1)")


RECIPES: dict[str, Recipe] = {
    # DESIGN.md §5, the paper's ImageNet-20 recipe (train crops at 160 px, the stored size)
    "paper": Recipe(epochs=90, batch_size=64, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                    schedule="step", step_epochs=30, gamma=0.1, warmup_epochs=0.0, label_smoothing=0.0,
                    train_size=160, crop_scale_min=0.08, bf16=False, channels_last=False, accum_steps=1),
    # all six ResNet18 variants on ImageNet-20 within ~20 minutes of one H100: large batch,
    # warm-up + cosine, label smoothing, milder crops for the short schedule, bf16 + channels_last
    "fast": Recipe(epochs=16, batch_size=256, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-5,
                   schedule="cosine", step_epochs=30, gamma=0.1, warmup_epochs=2.0, label_smoothing=0.1,
                   train_size=160, crop_scale_min=0.25, bf16=True, channels_last=True, accum_steps=1),
    # each ResNet18 variant on ImageNet-20 within an hour of a 2-core CPU with native bf16
    # (AVX512-BF16): progressive resizing 96 -> 128 px (FFCV), evaluated at a larger size (FixRes),
    # label smoothing, no decay on BN/bias; the README's "Training on the CPU" has the measurements
    "cpu": Recipe(epochs=20, batch_size=128, lr=0.25, momentum=0.9, nesterov=True, weight_decay=5e-5,
                  schedule="cosine", step_epochs=30, gamma=0.1, warmup_epochs=1.0, label_smoothing=0.1,
                  train_size=128, crop_scale_min=0.25, bf16=True, channels_last=True, accum_steps=1,
                  train_size_start=96, size_hold_epochs=4, bn_bias_decay=False),
}


def _convert(field: dataclasses.Field, text: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name} needs true/false, got {text!r}")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def make_recipe(name: str, overrides: Sequence[str] = (), epochs: int | None = None) -> Recipe:
    """Preset ``name`` with ``key=value`` ``overrides`` (converted to each field's type) and then
    ``epochs`` applied. Raises ``ValueError`` naming the valid presets or fields."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            changes[key] = _convert(fields[key], value)
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}") from e
    if epochs is not None:
        changes["epochs"] = epochs
    return dataclasses.replace(RECIPES[name], **changes)


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimisation step ``step`` (0-based, counted over the whole run)."""
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** (step // steps_per_epoch // recipe.step_epochs)
    total = recipe.epochs * steps_per_epoch
    t = (step - warmup) / max(1, total - warmup)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def train_size_at(recipe: Recipe, epoch: int) -> int:
    """Crop size for epoch ``epoch`` (0-based): ``train_size``, or with ``train_size_start`` a
    linear ramp from it (first epoch) to ``train_size`` (epoch ``epochs - size_hold_epochs - 1``
    onwards), rounded to a multiple of 16 (oneDNN's and cuDNN's fastest shapes)."""
    if not recipe.train_size_start:
        return recipe.train_size
    last_ramp = recipe.epochs - recipe.size_hold_epochs - 1
    t = 1.0 if last_ramp <= 0 else min(1.0, epoch / last_ramp)
    size = recipe.train_size_start + t * (recipe.train_size - recipe.train_size_start)
    return max(16, int(round(size / 16)) * 16)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one, or with ``bn_bias_decay=False`` a second group of
    BatchNorm weights and biases (every parameter with fewer than 2 dimensions) without decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.bn_bias_decay:
        return [{"params": params, "weight_decay": recipe.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------ files

def _gen_state(gen: torch.Generator) -> list[int]:
    return gen.get_state().tolist()


def _set_gen_state(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))


# ----------------------------------------------------------------------------- training

class _Stopwatch:
    """Accumulated time of code sections; CUDA events on CUDA, so timing never synchronises."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._spans: list[tuple[Any, Any]] = []
        self._seconds = 0.0
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    def seconds(self) -> float:
        """Total and reset."""
        if self.cuda:
            torch.cuda.synchronize()
            self._seconds = sum(s.elapsed_time(e) for s, e in self._spans) / 1e3
            self._spans = []
        total, self._seconds = self._seconds, 0.0
        return total


@dataclass
class _Trainee:
    """One model being trained: raw module (weights, checkpoints), wrapped module (DDP/compile)."""

    name: str
    model: nn.Module
    net: nn.Module
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.SGD
    directory: Path
    epoch: int  # finished epochs
    records: list[dict[str, Any]]
    watch: _Stopwatch
    loss_sum: Tensor | None = None


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    if _dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _save_state(tr: _Trainee, recipe: Recipe, seed: int, generators: dict[str, list[int]]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in tr.model.state_dict().items()}
    opt = tr.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    atomic_write(tr.directory / STATE_TENSORS, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(tr.directory / STATE_JSON, {
        "epoch": tr.epoch, "recipe": asdict(recipe), "seed": seed,
        "param_groups": opt["param_groups"], "optim_scalars": scalars, "generators": generators,
    })


def _load_state(tr: _Trainee, recipe: Recipe, seed: int, device: torch.device) -> dict[str, list[int]]:
    """Restore ``tr`` from its state files; returns the saved generator states."""
    meta = json.loads((tr.directory / STATE_JSON).read_text())
    if meta["recipe"] != asdict(recipe) or meta["seed"] != seed:
        diff = {k: (v, asdict(recipe).get(k)) for k, v in meta["recipe"].items() if asdict(recipe).get(k) != v}
        if meta["seed"] != seed:
            diff["seed"] = (meta["seed"], seed)
        raise ValueError(
            f"cannot resume {tr.directory}: it was trained with different settings "
            f"(field: (saved, now)) {diff}; rerun with the saved settings or use another --out"
        )
    tensors = load_file(str(tr.directory / STATE_TENSORS), device=str(device))
    tr.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    tr.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    tr.epoch = meta["epoch"]
    log = tr.directory / LOG
    if log.exists():  # drop lines of an epoch whose state was never written (killed in between)
        tr.records = [r for r in map(json.loads, log.read_text().splitlines()) if r["epoch"] <= tr.epoch]
    return meta["generators"]


@torch.no_grad()
def _top1_err(model: nn.Module, images: Tensor, labels: Tensor, augment, batch: int,
              autocast: bool, channels_last: bool) -> float:
    """Top-1 error in percent over this rank's share of ``images``, summed over ranks."""
    rank, world = _dist_info()
    n = images.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(lo, hi, batch):
        x = augment(images[i:min(i + batch, hi)])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = model(x).argmax(1)
        correct += int((pred == labels[i:min(i + batch, hi)]).sum())
    model.train(was_training)
    correct, total = _all_reduce([float(correct), float(hi - lo)])
    return 100.0 * (1.0 - correct / total)


def train(
    models: Sequence[str],
    train_split: Any,
    val_split: Any | None,
    recipe: Recipe,
    out: str | Path,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stem: str | None = None,
    val_size: int = 224,
    val_every: int = 1,
    resume: bool = False,
    stop_after: int | None = None,
    compile: bool = False,
    progress: bool = True,
    config_extra: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train ``models`` on ``train_split`` (a :class:`lgam.data.DecodedSplit`: uint8 ``images``
    ``(N, 3, S, S)``, ``labels``, ``classes``) and return each model's per-epoch log records.

    ``val_split`` (same type, or ``None``) is scored every ``val_every`` epochs and after the last
    one. ``stop_after`` ends this call after that many finished epochs, as a kill would;
    ``resume=True`` continues from the state in ``out``. Under an initialised process group the
    models are wrapped in DistributedDataParallel and rank 0 writes the files.
    """
    from .data import DeviceAugment

    device = torch.device(device)
    rank, world = _dist_info()
    out = Path(out)
    cuda = device.type == "cuda"
    fast = bf16_native(device)
    autocast, channels_last = fast and recipe.bf16, fast and recipe.channels_last
    if (recipe.bf16 or recipe.channels_last) and not fast and rank == 0:
        print(f"note: {device_summary(device)}: training in float32 (bf16 autocast and channels_last "
              "are slower than float32 without native bf16)", file=sys.stderr, flush=True)
    n = int(train_split.images.shape[0])
    if recipe.batch_size % (world * recipe.accum_steps):
        raise ValueError(f"batch_size {recipe.batch_size} is not divisible by {world} process(es) x "
                         f"{recipe.accum_steps} accum_steps")
    if n < recipe.batch_size:
        raise ValueError(f"{n} training images are fewer than one batch ({recipe.batch_size}); "
                         "lower it with --set batch_size=N")
    steps = n // recipe.batch_size  # the incomplete last batch is dropped
    local = recipe.batch_size // world
    micro = local // recipe.accum_steps

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    images = train_split.images.to(device)
    labels = train_split.labels.to(device)
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    val_images = val_labels = val_augment = None
    if val_split is not None:
        val_images, val_labels = val_split.images.to(device), val_split.labels.to(device)
        val_augment = DeviceAugment(val_size, train=False)

    trainees: list[_Trainee] = []
    saved_generators: dict[int, dict[str, list[int]]] = {}  # finished epoch -> generator states
    for name in dict.fromkeys(models):
        torch.manual_seed(seed)  # every model starts from the same random stream
        model = create_model(name, num_classes=len(train_split.classes), stem=stem).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(param_groups(model, recipe), lr=recipe.lr, momentum=recipe.momentum,
                                    nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
        ddp = None
        if world > 1:
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        net: nn.Module = model if ddp is None else ddp
        if compile:
            net = torch.compile(net)
        tr = _Trainee(name, model, net, ddp, optimizer, out / name, 0, [], _Stopwatch(device))
        if (tr.directory / STATE_JSON).exists():
            if not resume:
                raise ValueError(f"{tr.directory / STATE_JSON} exists: pass --resume to continue that "
                                 "run, or choose another --out")
            saved_generators[tr.epoch] = _load_state(tr, recipe, seed, device)
        trainees.append(tr)

    start = min(t.epoch for t in trainees)
    if start > 0:  # random streams as they were after the least-trained model's last epoch
        generators = saved_generators[start]
        _set_gen_state(shuffle_gen, generators["shuffle"])
        _set_gen_state(aug_gen, generators["augment"])
        torch.set_rng_state(torch.tensor(generators["torch"], dtype=torch.uint8))
    if rank == 0:
        for tr in trainees:
            tr.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(tr.directory / CONFIG, {
                "model": tr.name, "models": list(dict.fromkeys(models)), "recipe": asdict(recipe),
                "seed": seed, "stem": stem, "val_size": val_size, "argv": list(sys.orig_argv),
                "torch": torch.__version__, "device": str(device), "hardware": device_summary(device),
                "bf16_autocast": autocast, "channels_last": channels_last, "world_size": world,
                "num_classes": len(train_split.classes), "train_images": n,
                "resumed_from_epoch": tr.epoch, **(config_extra or {}),
            })
            if tr.epoch == 0:
                (tr.directory / LOG).write_text("")
            else:
                (tr.directory / LOG).write_text("".join(json.dumps(r) + "\n" for r in tr.records))

    last = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    for epoch in range(start, last):
        active = [t for t in trainees if t.epoch == epoch]
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=shuffle_gen).to(device)
        train_size = train_size_at(recipe, epoch)
        augment = DeviceAugment(train_size, train=True, scale=(recipe.crop_scale_min, 1.0))
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step",
                   disable=(not progress or rank != 0) or None, leave=False)
        for tr in active:
            tr.loss_sum = torch.zeros((), device=device)
        for step in bar:
            idx = perm[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            # the whole global batch is augmented on every rank (same generator), so a rank's
            # slice is exactly what a single process would feed for those samples
            x = augment(images[idx], generator=aug_gen)[rank * local:(rank + 1) * local]
            y = labels[idx][rank * local:(rank + 1) * local]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(recipe, epoch * steps + step, steps)
            for tr in active:
                tr.watch.start()
                for group in tr.optimizer.param_groups:
                    group["lr"] = lr
                tr.optimizer.zero_grad(set_to_none=True)
                for j in range(recipe.accum_steps):
                    last_micro = j == recipe.accum_steps - 1
                    # DDP all-reduces the gradients once, after the last micro-batch
                    sync = contextlib.nullcontext() if tr.ddp is None or last_micro else tr.ddp.no_sync()
                    with sync:
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                            loss = criterion(tr.net(x[j * micro:(j + 1) * micro]),
                                             y[j * micro:(j + 1) * micro]) / recipe.accum_steps
                        loss.backward()
                    tr.loss_sum += loss.detach().float()
                tr.optimizer.step()
                tr.watch.stop()
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix({t.name: f"{float(t.loss_sum) / (step + 1):.3f}" for t in active})
        bar.close()
        gens = {"shuffle": _gen_state(shuffle_gen), "augment": _gen_state(aug_gen),
                "torch": torch.get_rng_state().tolist()}
        evaluate = val_split is not None and val_every > 0 and (
            (epoch + 1) % val_every == 0 or epoch + 1 == recipe.epochs)
        for tr in active:
            loss_sum, = _all_reduce([float(tr.loss_sum)])
            seconds, = _all_reduce([tr.watch.seconds()], op="max")
            record = {
                "epoch": epoch + 1, "loss": loss_sum / world / steps, "lr": lr, "train_size": train_size,
                "train_img_per_s": steps * recipe.batch_size / seconds,
                "val_top1_err": _top1_err(tr.model, val_images, val_labels, val_augment,
                                          recipe.batch_size, autocast, channels_last) if evaluate else None,
                "val_size": val_size if evaluate else None,
                "time": time.perf_counter() - t0,
            }
            tr.epoch += 1
            tr.records.append(record)
            if rank == 0:
                with open(tr.directory / LOG, "a") as f:
                    f.write(json.dumps(record) + "\n")
                _save_state(tr, recipe, seed, gens)
                err = "" if record["val_top1_err"] is None else f"  val top-1 err {record['val_top1_err']:.2f}%"
                print(f"{tr.name:<22} epoch {epoch + 1:>3}/{recipe.epochs}  loss {record['loss']:.4f}  "
                      f"lr {lr:.4g}  {train_size} px  {record['train_img_per_s']:.1f} img/s  "
                      f"{record['time']:.0f} s{err}", flush=True)
    if world > 1:
        dist.barrier()
    return {t.name: t.records for t in trainees}


def summary_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Checkpoint metrics from a model's log: ``train_img_per_s`` (mean over the epochs after the
    first, which includes warm-up and compilation), ``train_wall_min`` (the epochs' wall time,
    in-training validation included) and the last ``val_top1_err_<size>``."""
    speeds = [r["train_img_per_s"] for r in records]
    metrics: dict[str, float] = {}
    if speeds:
        metrics["train_img_per_s"] = float(np.mean(speeds[1:] if len(speeds) > 1 else speeds))
        metrics["train_wall_min"] = float(sum(r["time"] for r in records) / 60)
    scored = [r for r in records if r.get("val_top1_err") is not None]
    if scored:
        metrics[f"val_top1_err_{scored[-1]['val_size']}"] = scored[-1]["val_top1_err"]
    return metrics


# ---------------------------------------------------------------------------------- CLI

def configure_parser(p: argparse.ArgumentParser) -> None:
    fields = ", ".join(f.name for f in dataclasses.fields(Recipe))
    p.add_argument("--model", "--models", dest="models", nargs="+", required=True, metavar="NAME",
                   help="one or several registered models (lgam.list_models()), trained side by side")
    p.add_argument("--data", required=True,
                   help="ImageFolder root with train/ and val/, a folder of train-*/val-* tar shards, "
                        "or a CIFAR python folder")
    p.add_argument("--recipe", default="fast", choices=sorted(RECIPES), help="preset (default: fast)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe field (repeatable); fields: {fields}")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling, augmentation")
    p.add_argument("--out", required=True, help="run folder: OUT/MODEL/{config.json,log.jsonl,state.*}")
    p.add_argument("--resume", action="store_true", help="continue from the state in --out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--stem", choices=["imagenet", "cifar"], help="model stem (default: the model's)")
    p.add_argument("--val-size", type=int, default=224, help="validation image size (default 224)")
    p.add_argument("--val-every", type=int, default=1, metavar="N",
                   help="validate every N epochs and after the last (0: never)")
    p.add_argument("--decode-size", type=int, metavar="PX",
                   help="decode training images at PX x PX (default: as stored)")
    p.add_argument("--limit", type=int, metavar="N", help="use only N images of each split (smoke tests)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip undecodable images instead of failing")
    p.add_argument("--checkpoints-dir", metavar="DIR",
                   help="save the final models there (lgam.checkpoints, with metrics)")
    p.add_argument("--stop-after", type=int, metavar="E",
                   help="stop after E finished epochs (as a kill would); continue later with --resume")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from .data import DataError, load_split

    try:
        recipe = make_recipe(args.recipe, args.overrides, args.epochs)
        device = resolve_device(args.device)
        unknown = [m for m in args.models if m not in list_models()]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(list_models())}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        try:
            train_split = load_split(args.data, "train", size=args.decode_size,
                                     skip_corrupt=args.skip_corrupt, limit=args.limit)
            val_split = None if args.val_every == 0 else load_split(
                args.data, "val", size=args.val_size, skip_corrupt=args.skip_corrupt, limit=args.limit)
            records = train(
                args.models, train_split, val_split, recipe, args.out, seed=args.seed, device=device,
                stem=args.stem, val_size=args.val_size, val_every=args.val_every, resume=args.resume,
                stop_after=args.stop_after, compile=args.compile, progress=not args.no_progress,
                config_extra={"args": vars(args)},
            )
        except (ValueError, OSError) as e:  # DataError is a ValueError
            kind = "data error" if isinstance(e, DataError) else "error"
            print(f"{kind}: {e}", file=sys.stderr)
            return 2
        if args.checkpoints_dir and _dist_info()[0] == 0:
            _save_checkpoints(args, recipe, train_split, records)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def _save_checkpoints(args: argparse.Namespace, recipe: Recipe, split: Any,
                      records: dict[str, list[dict[str, Any]]]) -> None:
    from .checkpoints import save_checkpoint
    from .data import IMAGENET_MEAN, IMAGENET_STD

    for name, recs in records.items():
        if not recs or recs[-1]["epoch"] != recipe.epochs:
            continue  # not finished (--stop-after)
        model = create_model(name, num_classes=len(split.classes), stem=args.stem)
        tensors = load_file(str(Path(args.out) / name / STATE_TENSORS))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        run = Path(args.out) / name
        config = json.loads((run / CONFIG).read_text())
        saved_run = Path(args.checkpoints_dir) / RUNS / name  # the numbers' seed, config, command
        saved_run.mkdir(parents=True, exist_ok=True)
        for fname in (CONFIG, LOG):
            shutil.copyfile(run / fname, saved_run / fname)
        save_checkpoint(model, args.checkpoints_dir, classes=split.classes, input_size=args.val_size,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, recipe=asdict(recipe), seed=args.seed,
                        epochs=recipe.epochs, metrics=summary_metrics(recs),
                        extra={"wnids": list(split.wnids), "machine": config.get("hardware"),
                               "command": config.get("argv"), "run_log": f"{RUNS}/{name}/{LOG}"})
        print(f"saved {name} to {args.checkpoints_dir}")


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.train"))
