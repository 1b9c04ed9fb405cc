"""``lgam train``: train one or several models over the same data, batches and augmentation.

Every image is decoded once into a uint8 tensor that lives on the training device; each step
indexes a batch, random-resized-crops, flips and normalises it there (:class:`lgam.data.DeviceAugment`)
and feeds the *same* augmented batch to every model, each with its own optimiser, learning-rate
schedule, log and resume state. The recipe's bf16 autocast and channels_last apply where bf16 is
native (:func:`lgam.device.bf16_native`: GPUs of compute capability 8.0 and newer, CPUs with
AVX512-BF16/AMX); elsewhere (a T4, a V100, most CPUs) training runs in float32 and says so once. A recipe with ``train_size_start`` grows the crop size from epoch to epoch
(progressive resizing, as FFCV does);
``--compile`` wraps each model in ``torch.compile``; compiled or not, LGAM modules run their op,
the C++ kernels, where they build (on the CPU: :func:`lgam.attention.set_fused_kernels`;
``LGAM_FUSED=0`` runs their equations as plain tensor ops; ``config.json`` records which). Under ``torchrun --nproc_per_node N`` the same
command trains with DistributedDataParallel (NCCL on CUDA, gloo on CPU): every rank draws the same
global batch and augmentation and trains on its slice. BatchNorm normalises over each process's
slice (no SyncBatchNorm), so N processes train like one process with ``--set accum_steps=N``.

Outputs in ``OUT/MODEL/``: ``config.json`` (recipe, seed, command line, versions, device),
``log.jsonl`` (one line per epoch), ``state.safetensors`` + ``state.json`` (weights, optimiser and
random-generator states after the last finished epoch; no pickle). ``--resume`` continues from
there and gives the same weights as an uninterrupted run on CPU (warning when torch, the
threads or LGAM's kernels changed); it refuses settings that would give other weights, naming each
one, a log that lost or repeated epochs, and a run folder another process is training. The recipes
live in :mod:`lgam.recipes`, the resume state in :mod:`lgam.runstate`; this module holds the loop
(:func:`train`) and the command.

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
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ._fileio import atomic_write, atomic_write_json
from .attention import fused_kernels_setting
from .checkpoints import git_revision
from .device import bf16_native, device_summary, resolve_device
from .models import create_model, init_residual_bn, list_models, match_branch_rms, model_config, zero_init_residual
from .models.branch_init import residual_bns
from .recipes import RECIPES, Recipe, TrainError, lr_at, make_recipe, param_groups, train_size_at
from .runstate import (CONFIG, LOG, RUNS, STATE_JSON, check_generators, check_log, generator_states, load_state,
                       load_weights, read_log, restore_generators, run_lock, save_state)

__all__ = [  # the recipe names are lgam.recipes', kept here for `from lgam.train import ...`
    "Recipe", "RECIPES", "TrainError", "Diverged", "make_recipe", "lr_at", "train_size_at", "param_groups",
    "train", "summary_metrics", "configure_parser", "main",
]


class Diverged(TrainError):
    """A model's training loss was not finite (the message says which, and what state it keeps);
    ``records``: the other models' epoch records, trained on to the end, as :func:`train` returns."""

    def __init__(self, message: str, records: dict[str, list[dict[str, Any]]] | None = None):
        super().__init__(message)  # records has a default: an exception is unpickled from its args
        self.records = records or {}


# ------------------------------------------------------------------------------ the loop

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
    # -- device, precision, data and random streams (the same on every rank) --
    run = _setup_run(train_split, val_split, recipe, torch.device(device), seed, val_size)
    last = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    with contextlib.ExitStack() as locks:
        if run.rank == 0:  # the rank that writes the files holds each run folder
            for name in dict.fromkeys(models):
                locks.enter_context(run_lock(Path(out) / name))
        trainees, saved_generators = _trainees(run, models, Path(out), stem, resume, compile)
        # -- config.json and the log so far (a run with nothing left to train keeps its own) --
        if run.rank == 0:
            for tr in trainees:
                if tr.epoch < last or tr.epoch == 0:
                    _start_files(tr, _config(run, tr, models, stem, config_extra))
        _train_epochs(run, trainees, last, val_every, progress, saved_generators)
    diverged = [t.diverged for t in trainees if t.diverged]
    if diverged:  # the same on every rank: the losses are all-reduced
        raise Diverged("; ".join(diverged), {t.name: t.records for t in trainees if not t.diverged})
    if run.world > 1:
        dist.barrier()
    return {t.name: t.records for t in trainees}


def _trainees(run: _Run, models: Sequence[str], out: Path, stem: str | None, resume: bool,
              compile: bool) -> tuple[list[_Trainee], dict[int, dict[str, list[int]]]]:
    """The models, from the same random stream, with their optimisers and resume states, and
    the random streams' states each resumed model saved: ``{its finished epochs: states}``."""
    trainees: list[_Trainee] = []
    saved_generators: dict[int, dict[str, list[int]]] = {}  # finished epoch -> generator states
    for name in dict.fromkeys(models):
        tr = _new_trainee(run, name, out / name, stem)
        generators = _resume(run, tr, resume)
        if generators is not None:
            check_generators(generators, run.aug_gen, tr.directory)
            saved_generators[tr.epoch] = generators
        _wrap(run, tr, compile)
        trainees.append(tr)
    return trainees, saved_generators


def _train_epochs(run: _Run, trainees: list[_Trainee], last: int, val_every: int, progress: bool,
                  saved_generators: dict[int, dict[str, list[int]]]) -> None:
    """Train up to epoch ``last``, each epoch every model that has not done it. A model resumed at
    epoch ``e`` sets the random streams to its own saved states when epoch ``e`` begins: the same
    as the streams reach there, unless an epoch no model trained (those behind it diverged) left
    them behind."""
    for epoch in range(min(t.epoch for t in trainees), last):
        if epoch in saved_generators:
            restore_generators(saved_generators[epoch], run.shuffle_gen, run.aug_gen)
        # -- one pass over the data for every model that has not done this epoch --
        active = [t for t in trainees if t.epoch == epoch and t.diverged is None]
        if not active:
            continue
        t0 = time.perf_counter(), time.process_time()
        lr, train_size = _train_epoch(run, active, epoch, progress)
        wall, cpu = time.perf_counter() - t0[0], time.process_time() - t0[1]
        own = [tr.watch.seconds() for tr in active]
        generators = generator_states(run.shuffle_gen, run.aug_gen)

        # -- validation, log line, resume state --
        evaluate = run.val is not None and val_every > 0 and (
            (epoch + 1) % val_every == 0 or epoch + 1 == run.recipe.epochs)
        for tr, seconds, share in zip(active, own, training_shares(own, wall)):
            record = _epoch_record(run, tr, epoch, lr, train_size, evaluate, seconds,
                                   (share * wall, share * cpu))
            if not math.isfinite(record["loss"]):
                tr.diverged = _divergence(tr, record)  # the others train on; its state is not saved
                continue
            tr.epoch += 1
            tr.records.append(record)
            if run.rank == 0:
                _write_epoch(run, tr, record, generators)


# ------------------------------------------------------------------------------ setup

@dataclass
class _Run:
    """What the models of one :func:`train` call share."""

    recipe: Recipe
    seed: int
    device: torch.device
    rank: int
    world: int
    autocast: bool  # bf16 autocast: the recipe's bf16 where the device has native bf16
    channels_last: bool
    steps: int  # optimisation steps per epoch (the incomplete last batch is dropped)
    local: int  # this process's share of a (global) batch
    micro: int  # one of its accum_steps micro-batches
    images: Tensor  # (N, 3, S, S) uint8, on the device
    labels: Tensor
    classes: list[str]
    shuffle_gen: torch.Generator  # batch order
    aug_gen: torch.Generator  # crops and flips
    criterion: nn.Module
    val: tuple[Tensor, Tensor, Any] | None  # images, labels, DeviceAugment
    val_size: int


def _setup_run(train_split: Any, val_split: Any | None, recipe: Recipe, device: torch.device, seed: int,
               val_size: int) -> _Run:
    """Precision, batch geometry, seeded random streams, the data on the device."""
    from .data import DataError, DeviceAugment

    if val_split is not None and list(val_split.class_ids) != list(train_split.class_ids):
        raise DataError(f"the val data's classes {list(val_split.class_ids)[:4]}... are not the training "
                        f"data's {list(train_split.class_ids)[:4]}... (labels would not match): shards of "
                        "splits with different classes need a classes.tsv listing every class")
    rank, world = _dist_info()
    autocast, channels_last = _precision(recipe, device, rank)
    steps, local, micro = _batch_geometry(recipe, int(train_split.images.shape[0]), world)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    images, labels = train_split.images.to(device), train_split.labels.to(device)
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    val = None
    if val_split is not None:
        val = (val_split.images.to(device), val_split.labels.to(device), DeviceAugment(val_size, train=False))
    classes = train_split.class_ids  # folder ids fix the labels
    return _Run(recipe, seed, device, rank, world, autocast, channels_last, steps, local, micro, images,
                labels, classes, shuffle_gen, aug_gen, criterion, val, val_size)


def _precision(recipe: Recipe, device: torch.device, rank: int) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last): the recipe's where the device has native bf16, else off."""
    fast = bf16_native(device)
    if (recipe.bf16 or recipe.channels_last) and not fast and rank == 0:
        print(f"note: {device_summary(device)}: training in float32 (bf16 autocast and channels_last "
              "are slower than float32 without native bf16)", file=sys.stderr, flush=True)
    return fast and recipe.bf16, fast and recipe.channels_last


def _batch_geometry(recipe: Recipe, n: int, world: int) -> tuple[int, int, int]:
    """(steps per epoch, one process's share of a batch, one micro-batch) for ``n`` images."""
    if recipe.batch_size % (world * recipe.accum_steps):
        raise TrainError(f"batch_size {recipe.batch_size} is not divisible by {world} process(es) x "
                         f"{recipe.accum_steps} accum_steps")
    if n < recipe.batch_size:
        raise TrainError(f"{n} training images are fewer than one batch ({recipe.batch_size}); "
                         "lower it with --set batch_size=N")
    local = recipe.batch_size // world
    return n // recipe.batch_size, local, local // recipe.accum_steps


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
    optimizer: torch.optim.SGD
    directory: Path
    settings: dict[str, Any]  # what shapes its weights (lgam.runstate.check_settings)
    watch: _Stopwatch
    net: nn.Module | None = None  # model, or its DDP / torch.compile wrapper
    ddp: nn.parallel.DistributedDataParallel | None = None
    epoch: int = 0  # finished epochs
    records: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: Tensor | None = None
    diverged: str | None = None  # why it stopped training (its loss was not finite)


def _new_trainee(run: _Run, name: str, directory: Path, stem: str | None) -> _Trainee:
    """Model ``name`` drawn from the seed's random stream (the same for every model), its optimiser."""
    torch.manual_seed(run.seed)
    model = create_model(name, num_classes=len(run.classes), stem=stem, **model_kwargs(run.recipe)).to(run.device)
    # a resumed run's saved weights replace the init: one begun before the check still finishes
    init_blocks(model, run.recipe, _init_batch(run), check=not (directory / STATE_JSON).exists())
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    r = run.recipe
    optimizer = torch.optim.SGD(param_groups(model, r), lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                                weight_decay=r.weight_decay)
    return _Trainee(name, model, optimizer, directory, _settings(run, name, stem), _Stopwatch(run.device))


def check_branch_init(model: nn.Module, recipe: Recipe) -> None:
    """:class:`TrainError` when ``recipe`` sets the residual branches' last BN and ``model`` has
    none to set (pre-activation blocks, e.g. WRN's): the recipe would be applied in name only."""
    asked = [k for k in recipe.branch_inits if k != "skip_init"]  # SkipInit adds its own gains
    if asked and not residual_bns(model):
        name = getattr(model, "model_name", type(model).__name__)
        off = str(Recipe.__dataclass_fields__[asked[0]].default).lower()
        raise TrainError(f"the recipe sets {asked[0]}, the scale of each residual branch's last BatchNorm, "
                         f"and {name}'s blocks have none (pre-activation blocks): choose a recipe without "
                         f"it (e.g. --recipe paper) or override it (--set {asked[0]}={off})")


def init_blocks(model: nn.Module, recipe: Recipe, images: Tensor | None = None,
                check: bool = True) -> list[float] | None:
    """Apply ``recipe``'s initialisation of the residual branches' last BN (``zero_init_residual``,
    ``residual_bn_scale``, ``branch_rms``) to a freshly built ``model``; ``branch_rms`` needs
    ``images`` ``(B, 3, H, W)``, normalised (:func:`init_batch`), and returns the branches'
    output RMS after it. ``check``: refuse a setting the model has no BN for
    (:func:`check_branch_init`); off for a model whose saved state replaces it (a resume)."""
    if check:
        check_branch_init(model, recipe)
    if recipe.zero_init_residual:
        zero_init_residual(model)
    elif recipe.residual_bn_scale != 1.0:
        init_residual_bn(model, recipe.residual_bn_scale)
    elif recipe.branch_rms:
        if images is None:
            raise TrainError("branch_rms sets the branches' scale from a batch of training images: none given")
        return match_branch_rms(model, images, recipe.branch_rms)
    return None


def init_batch(images: Tensor, recipe: Recipe, seed: int) -> Tensor:
    """The batch :func:`init_blocks` measures on: ``batch_size`` of the uint8 training ``images``
    ``(N, 3, S, S)`` drawn by ``seed`` (the same on every process), each whole image resized to
    the first epoch's size (no crop) and normalised, float32."""
    from .data import DeviceAugment

    idx = torch.randperm(int(images.shape[0]), generator=torch.Generator().manual_seed(seed))[:recipe.batch_size]
    return DeviceAugment(recipe.train_size_start or recipe.train_size, train=False)(images[idx.to(images.device)])


def _init_batch(run: _Run) -> Tensor | None:
    return init_batch(run.images, run.recipe, run.seed) if run.recipe.branch_rms else None


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    """What ``recipe`` adds to :func:`lgam.create_model`'s arguments (SkipInit's gains)."""
    return {"skip_init": True} if recipe.skip_init else {}


def _settings(run: _Run, name: str, stem: str | None) -> dict[str, Any]:
    """Everything that shapes model ``name``'s weights (:data:`lgam.runstate.SETTINGS`)."""
    return {
        "model": name, "recipe": asdict(run.recipe), "seed": run.seed,
        "stem": model_config(name, stem=stem)["stem"], "num_classes": len(run.classes), "classes": run.classes,
        "train_images": int(run.images.shape[0]), "image_size": int(run.images.shape[-1]),
        "world_size": run.world, "autocast": "bfloat16" if run.autocast else "float32",
    }


def check_fresh_start(directory: Path, resume: bool) -> bool:
    """Whether run folder ``directory`` holds a saved state; :class:`TrainError` if it does and
    ``resume`` is off (a new run would overwrite it)."""
    if not (directory / STATE_JSON).exists():
        return False
    if not resume:
        raise TrainError(f"{directory / STATE_JSON} exists: pass --resume to continue that run, "
                         "or choose another --out")
    return True


def _resume(run: _Run, tr: _Trainee, resume: bool) -> dict[str, list[int]] | None:
    """Load ``tr``'s saved state, if there is one (refused without ``resume`` or with other
    settings); returns the saved generator states, or None for a fresh start."""
    if not check_fresh_start(tr.directory, resume):
        return None
    tr.epoch, generators = load_state(tr.directory, tr.model, tr.optimizer, tr.settings, run.device)
    tr.records = read_log(tr.directory, tr.epoch)
    check_log(tr.directory, tr.records, tr.epoch)
    return generators


def _wrap(run: _Run, tr: _Trainee, compile: bool) -> None:
    """DistributedDataParallel under a process group (it starts from rank 0's weights, which every
    rank has loaded alike), then ``torch.compile`` if asked."""
    if run.world > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        tr.ddp = nn.parallel.DistributedDataParallel(tr.model, device_ids=device_ids)
    tr.net = tr.model if tr.ddp is None else tr.ddp
    if compile:
        # static shapes: LGAM's functions meet a new shape per stage, and the dynamic-shape
        # recompile this would trigger failed in Inductor (torch 2.11, CUDA: CantSplit)
        tr.net = torch.compile(tr.net, dynamic=False)


def _config(run: _Run, tr: _Trainee, models: Sequence[str], stem: str | None,
            extra: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json``: the settings, the command line, the versions and the machine."""
    return {
        "model": tr.name, "models": list(dict.fromkeys(models)), "recipe": asdict(run.recipe),
        "seed": run.seed, "stem": stem, "val_size": run.val_size, "argv": list(sys.orig_argv),
        "torch": torch.__version__, "device": str(run.device), "hardware": device_summary(run.device),
        "bf16_autocast": run.autocast, "channels_last": run.channels_last, "world_size": run.world,
        "lgam_fused_kernels": fused_kernels_setting(run.device),
        "num_classes": len(run.classes), "train_images": int(run.images.shape[0]),
        "resumed_from_epoch": tr.epoch, **git_revision(), **(extra or {}),
    }


#: what says which code, command and machine ran a session's epochs (kept over resumes)
PROVENANCE = ("git_commit", "git_dirty", "argv", "torch", "hardware", "lgam_fused_kernels", "resumed_from_epoch")


#: what, if it changed between sessions, makes a resumed run's weights differ in their last bits
#: from an uninterrupted run's (the thread count is in the hardware line)
BIT_EXACT = ("torch", "hardware", "lgam_fused_kernels")


def _earlier_sessions(old: dict[str, Any]) -> list[dict[str, Any]]:
    """The provenance of every session that trained a resumed run before this one, oldest first:
    the run's previous ``config.json`` (``old``)'s own list plus that config's :data:`PROVENANCE`."""
    return [*old.get("earlier_sessions", []), {k: old[k] for k in PROVENANCE if k in old}]


def _warn_if_not_bit_exact(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Say so when a resumed run continues on other software or hardware (:data:`BIT_EXACT`)."""
    changed = [f"{k} was {old[k]!r}, now {new[k]!r}" for k in BIT_EXACT if k in old and old[k] != new[k]]
    if changed:
        print(f"warning: resuming {directory} with {'; '.join(changed)}: its weights will differ slightly "
              "from an uninterrupted run's", file=sys.stderr, flush=True)


def _start_files(tr: _Trainee, config: dict[str, Any]) -> None:
    """Write ``config.json`` and ``log.jsonl`` with the epochs already done (none, or a resumed
    run's, dropping the line of an epoch whose state was never written), each in one atomic
    replace, and remove the temporary files of writes a kill cut short. A resumed run's
    ``config.json`` keeps, under ``earlier_sessions``, which commit and command ran its earlier
    epochs."""
    tr.directory.mkdir(parents=True, exist_ok=True)
    for tmp in tr.directory.glob(".*.tmp"):  # atomic_write's, left by a SIGKILL (the run is locked)
        tmp.unlink()
    if tr.epoch > 0 and (tr.directory / CONFIG).exists():
        old = json.loads((tr.directory / CONFIG).read_text())
        _warn_if_not_bit_exact(tr.directory, old, config)
        config = {**config, "earlier_sessions": _earlier_sessions(old)}
    atomic_write_json(tr.directory / CONFIG, config)
    log = "".join(json.dumps(r) + "\n" for r in tr.records)
    atomic_write(tr.directory / LOG, lambda tmp: Path(tmp).write_text(log))


# ------------------------------------------------------------------------------ one epoch

def _train_epoch(run: _Run, active: list[_Trainee], epoch: int, progress: bool) -> tuple[float, int]:
    """One pass over the shuffled training set, each batch fed to every ``active`` model; returns
    the last step's learning rate and the epoch's crop size."""
    from .data import DeviceAugment

    recipe, steps = run.recipe, run.steps
    perm = torch.randperm(int(run.images.shape[0]), generator=run.shuffle_gen).to(run.device)
    train_size = train_size_at(recipe, epoch)
    augment = DeviceAugment(train_size, train=True, scale=(recipe.crop_scale_min, 1.0))
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step",
               disable=(not progress or run.rank != 0) or None, leave=False)
    for tr in active:
        tr.loss_sum = torch.zeros((), device=run.device)
    for step in bar:
        x, y = _batch(run, augment, perm[step * recipe.batch_size:(step + 1) * recipe.batch_size])
        lr = lr_at(recipe, epoch * steps + step, steps)
        for tr in active:
            _train_step(run, tr, x, y, lr)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix({t.name: f"{float(t.loss_sum) / (step + 1):.3f}" for t in active})
    bar.close()
    return lr, train_size


def _batch(run: _Run, augment: Any, idx: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's slice of the global batch ``idx``, augmented. The whole batch is augmented on
    every rank (same generator), so a slice is exactly what a single process would feed."""
    lo, hi = run.rank * run.local, (run.rank + 1) * run.local
    x = augment(run.images[idx], generator=run.aug_gen)[lo:hi]
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, run.labels[idx][lo:hi]


def _train_step(run: _Run, tr: _Trainee, x: Tensor, y: Tensor, lr: float) -> None:
    """One optimisation step of ``tr`` at learning rate ``lr``: ``accum_steps`` micro-batches of
    ``x``, ``y``, their gradients summed."""
    accum = run.recipe.accum_steps
    tr.watch.start()
    for group in tr.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    tr.optimizer.zero_grad(set_to_none=True)
    for j in range(accum):
        part = slice(j * run.micro, (j + 1) * run.micro)
        # DDP all-reduces the gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if tr.ddp is None or j == accum - 1 else tr.ddp.no_sync()
        with sync:
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
                loss = run.criterion(tr.net(x[part]), y[part]) / accum
            loss.backward()
        tr.loss_sum += loss.detach().float()
    tr.optimizer.step()
    tr.watch.stop()


def _epoch_record(run: _Run, tr: _Trainee, epoch: int, lr: float, train_size: int, evaluate: bool,
                  seconds: float, train_time: tuple[float, float]) -> dict[str, Any]:
    """``tr``'s log line for ``epoch``: loss and speed over all ranks, validation error if
    ``evaluate``; ``seconds``: its own training steps' time; ``train_time``: its share of the
    epoch's training pass, wall clock and this process's CPU time (:func:`training_shares`), to
    which its own validation is added (not the other models'). The CPU seconds (all of this
    process's threads) do not count time the process was stopped or waiting for the cores, so
    they compare runs that the wall time, with pauses in it, cannot."""
    loss_sum, = _all_reduce([float(tr.loss_sum)])
    seconds, = _all_reduce([seconds], op="max")
    v0 = time.perf_counter(), time.process_time()
    val_err = _top1_err(run, tr.model) if evaluate else None
    return {
        "epoch": epoch + 1, "loss": loss_sum / run.world / run.steps, "lr": lr, "train_size": train_size,
        "train_img_per_s": run.steps * run.recipe.batch_size / seconds,
        "val_top1_err": val_err,
        "val_size": run.val_size if evaluate else None,
        "time": train_time[0] + time.perf_counter() - v0[0],
        "cpu_time": train_time[1] + time.process_time() - v0[1],
    }


def training_shares(own: list[float], wall: float) -> list[float]:
    """Each model's share of a training pass that trained several side by side: its own steps'
    time ``own[i]`` plus an equal part of the rest (loading, augmenting), over the pass's ``wall``
    time; the shares sum to 1, and one model's share is 1."""
    n = len(own)
    common = max(0.0, wall - sum(own))
    total = sum(own) + common
    return [(s + common / n) / total if total > 0 else 1 / n for s in own]


def _divergence(tr: _Trainee, record: dict[str, Any]) -> str:
    """What to tell about a model whose epoch's loss was not finite: the run diverged, and
    training on would spend hours on NaN weights. Its state of the epoch before stays on disk."""
    kept = (f"{tr.directory} keeps the state after epoch {tr.epoch}" if tr.epoch
            else "no state was saved")
    return (f"{tr.name}: the training loss is {record['loss']} in epoch {record['epoch']}: the run "
            f"diverged ({kept}; the other models trained on); start it again with a new --out and a "
            "lower --set lr or another --seed")


def _write_epoch(run: _Run, tr: _Trainee, record: dict[str, Any], generators: dict[str, list[int]]) -> None:
    """Append the log line, save the resume state, print the epoch's line."""
    with open(tr.directory / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")
    save_state(tr.directory, tr.epoch, tr.model, tr.optimizer, tr.settings, generators)
    err = "" if record["val_top1_err"] is None else f"  val top-1 err {record['val_top1_err']:.2f}%"
    print(f"{tr.name:<22} epoch {record['epoch']:>3}/{run.recipe.epochs}  loss {record['loss']:.4f}  "
          f"lr {record['lr']:.4g}  {record['train_size']} px  {record['train_img_per_s']:.1f} img/s  "
          f"{record['time']:.0f} s{err}", flush=True)


@torch.no_grad()
def _top1_err(run: _Run, model: nn.Module) -> float:
    """Top-1 error in percent of ``model`` on the validation images: this rank's share, summed over ranks."""
    images, labels, augment = run.val
    n, batch = images.shape[0], run.recipe.batch_size
    lo, hi = run.rank * n // run.world, (run.rank + 1) * n // run.world
    _broadcast_buffers(model)
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(lo, hi, batch):
        x = augment(images[i:min(i + batch, hi)])
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            pred = model(x).argmax(1)
        correct += int((pred == labels[i:min(i + batch, hi)]).sum())
    model.train(was_training)
    correct, total = _all_reduce([float(correct), float(hi - lo)])
    return 100.0 * (1.0 - correct / total)


# ------------------------------------------------------------------------------ processes

def _dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP sends them before each
    training forward pass, and then each rank updates them from its own slice: validated as they
    were, each rank's share of the images met other statistics than the checkpoint (rank 0's)."""
    if _dist_info()[1] == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (or their maximum, ``op="max"``) over the processes."""
    if _dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


# ------------------------------------------------------------------------------ the command

def summary_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Checkpoint metrics from a model's log: ``train_img_per_s`` (the images over the training
    steps' time of the epochs after the first, which includes warm-up and compilation: the harmonic
    mean of their rates, as every epoch trains as many images), ``train_wall_min`` (the epochs' wall time,
    in-training validation included), ``train_cpu_min`` (their CPU time, pauses excluded; only
    when every epoch logged it) and the last ``val_top1_err_<size>``."""
    speeds = [r["train_img_per_s"] for r in records]
    metrics: dict[str, float] = {}
    if speeds:
        steady = speeds[1:] if len(speeds) > 1 else speeds
        metrics["train_img_per_s"] = float(statistics.harmonic_mean(steady))
        metrics["train_wall_min"] = float(sum(r["time"] for r in records) / 60)
    if records and all("cpu_time" in r for r in records):
        metrics["train_cpu_min"] = float(sum(r["cpu_time"] for r in records) / 60)
    scored = [r for r in records if r.get("val_top1_err") is not None]
    if scored:
        metrics[f"val_top1_err_{scored[-1]['val_size']}"] = scored[-1]["val_top1_err"]
    return metrics


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
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="set N training images per class aside, untrained on (lgam.data.split_holdout: "
                        "the same images for every seed), to choose settings on without val")
    p.add_argument("--skip-corrupt", action="store_true", help="skip undecodable images instead of failing")
    p.add_argument("--checkpoints-dir", metavar="DIR",
                   help="save the final models there (lgam.checkpoints, with metrics)")
    p.add_argument("--stop-after", type=int, metavar="E",
                   help="stop after E finished epochs (as a kill would); continue later with --resume")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from .data import DataError, check_holdout, is_flat_tree, load_split, split_holdout

    try:
        recipe = make_recipe(args.recipe, args.overrides, args.epochs)
        device = resolve_device(args.device)
        unknown = [m for m in args.models if m not in list_models()]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(list_models())}")
        for flag, value in (("--val-size", args.val_size), ("--decode-size", args.decode_size)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be a positive number of pixels, got {value}")
        for name in args.models:  # before minutes of decoding
            check_fresh_start(Path(args.out) / name, args.resume)
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
            def before_decoding(counts: dict[str, int]) -> None:  # what would fail minutes later
                check_holdout(counts, args.holdout)
                _batch_geometry(recipe, sum(counts.values()) - args.holdout * len(counts), world)

            if args.val_every and is_flat_tree(args.data):
                raise DataError(f"{args.data} is a folder of class folders without val/: its val split would "
                                "be the training images themselves; add val/ (and train/), or pass "
                                "--val-every 0")
            train_split = load_split(args.data, "train", size=args.decode_size,
                                     skip_corrupt=args.skip_corrupt, limit=args.limit, check=before_decoding)
            train_split = split_holdout(train_split, args.holdout)[0]
            val_split = None if args.val_every == 0 else load_split(
                args.data, "val", size=args.val_size, skip_corrupt=args.skip_corrupt, limit=args.limit)
            records = train(
                args.models, train_split, val_split, recipe, args.out, seed=args.seed, device=device,
                stem=args.stem, val_size=args.val_size, val_every=args.val_every, resume=args.resume,
                stop_after=args.stop_after, compile=args.compile, progress=not args.no_progress,
                config_extra={"args": vars(args)},
            )
        except Diverged as e:  # the others' checkpoints are theirs to keep
            if args.checkpoints_dir and _dist_info()[0] == 0:
                _save_checkpoints(args, recipe, train_split, e.records)
            print(f"error: {e}", file=sys.stderr)
            return 2
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
    from .params import cost_metrics

    for name, recs in records.items():
        if not recs or recs[-1]["epoch"] != recipe.epochs:
            continue  # not finished (--stop-after)
        run = Path(args.out) / name
        model = create_model(name, num_classes=len(split.classes), stem=args.stem, **model_kwargs(recipe))
        model.load_state_dict(load_weights(run))
        config = json.loads((run / CONFIG).read_text())
        saved_run = Path(args.checkpoints_dir) / RUNS / name / f"seed{args.seed}"  # the numbers' seed, config, command
        saved_run.mkdir(parents=True, exist_ok=True)
        for fname in (CONFIG, LOG):
            shutil.copyfile(run / fname, saved_run / fname)
        save_checkpoint(model, args.checkpoints_dir, classes=split.classes, input_size=args.val_size,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, recipe=asdict(recipe), seed=args.seed,
                        epochs=recipe.epochs, metrics={**summary_metrics(recs), **cost_metrics(model)},
                        extra={"wnids": list(split.wnids), "holdout_per_class": args.holdout,
                               "train_images": len(split), "machine": config.get("hardware"),
                               "command": config.get("argv"), "run_log": f"{RUNS}/{name}/seed{args.seed}/{LOG}"})
        print(f"saved {name} to {args.checkpoints_dir}")


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.train"))
