"""``lgam evaluate``: top-1 error of checkpoints on a val split, params, GMACs, CPU latency.

Each val image is resized as a whole to the square input (:func:`lgam.data.resize_normalize`, the
path the app uses) at every ``--sizes`` entry and at the manifest's ``input_size`` (the app's), in
float32. Writes a Markdown table with the paper's Table 4 column beside ours and stores the numbers
in the manifest's metrics (not with ``--limit``: a subset's numbers are not the val error, nor with
``--no-update``). ``--choose-input-size`` sets every evaluated model's ``input_size`` to the size
with the lowest mean error over them (one size for all, so the app preprocesses once).

    lgam evaluate --checkpoints checkpoints --data ../shared/data/imagenet20 --choose-input-size
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._fileio import write_text
from ._format import format_or_dash
from .checkpoints import CheckpointError, load_checkpoint, load_manifest, update_metrics
from .cli import positive_int
from .attention import fused_kernels_setting
from .data import (IMAGENET_MEAN, IMAGENET_STD, DataError, DecodedSplit, is_flat_tree, load_split, resize_normalize,
                   split_holdout)
from .models import create_model
from .device import device_summary, resolve_device
from .errors import UsageError
from .params import cost_metrics

__all__ = ["PAPER_TOP1_ERR", "SIZES", "top1_error", "misses", "pack_mask", "unpack_mask", "load_run_model",
           "evaluate_run", "cpu_latency_ms", "latency_setup", "note_resized", "evaluate_checkpoints",
           "best_input_size", "format_table", "configure_parser", "main"]

#: input sizes evaluated by default (the app's ``input_size`` is added to them)
SIZES = (224, 192, 160, 128)

#: the paper's Table 4 (ImageNet, 20 classes) top-1 error in percent
PAPER_TOP1_ERR = {
    "resnet18": 25.57, "resnet18_se": 25.26, "resnet18_sge": 24.38, "resnet18_cbam": 23.74,
    "resnet18_bam": 23.57, "resnet18_lgam": 23.14, "resnet18_lgam_g32": 23.14,
}


@torch.inference_mode()
def top1_error(model: nn.Module, split: DecodedSplit, size: int, mean: Sequence[float],
               std: Sequence[float], batch_size: int = 64) -> float:
    """Top-1 error in percent of ``model`` (eval mode) on ``split`` resized to ``size``."""
    return 100.0 * int(misses(model, split, size, mean, std, batch_size).sum()) / len(split)


@torch.inference_mode()
def misses(model: nn.Module, split: DecodedSplit, size: int, mean: Sequence[float] = IMAGENET_MEAN,
           std: Sequence[float] = IMAGENET_STD, batch_size: int = 64) -> Tensor:
    """``(N,)`` bool: which of ``split``'s images ``model`` (eval mode, float32) gets wrong at ``size``."""
    model.eval()
    device = next(model.parameters()).device
    wrong = [model(resize_normalize(split.images[i:i + batch_size].to(device), size, mean, std)).argmax(1).cpu()
             != split.labels[i:i + batch_size] for i in range(0, len(split), batch_size)]
    return torch.cat(wrong)


def pack_mask(mask: Tensor) -> str:
    """A bool mask as a hex string (8 images a byte, first image in the first byte's high bit)."""
    return np.packbits(mask.numpy().astype(np.uint8)).tobytes().hex()


def unpack_mask(text: str, n: int) -> Tensor:
    """Inverse of :func:`pack_mask` for ``n`` images."""
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:n].astype(bool))


def load_run_model(run: str | Path) -> nn.Module:
    """The model of an ``lgam train`` run folder (``OUT/MODEL``) with its last saved weights, built
    as the run built it (its recipe's SkipInit gains included), in eval mode."""
    from .recipes import Recipe
    from .runstate import CONFIG, load_weights
    from .train import model_kwargs

    run = Path(run)
    config = json.loads((run / CONFIG).read_text())
    model = create_model(config["model"], num_classes=config["num_classes"], stem=config["stem"],
                         **model_kwargs(Recipe(**config["recipe"])))
    model.load_state_dict(load_weights(run))
    return model.eval()


@torch.inference_mode()
def evaluate_run(run: str | Path, val: DecodedSplit | None, holdout: DecodedSplit | None,
                 sizes: Sequence[int] = SIZES) -> dict[str, Any]:
    """Top-1 errors of run folder ``run``'s model on ``val`` (None: no val split) and on the
    training images held out from it (``holdout``, :func:`lgam.data.split_holdout`) at every size,
    and which val images it gets wrong at each (``val_misses_<size>``, :func:`pack_mask`: for
    paired tests between runs)."""
    model = load_run_model(run)
    metrics: dict[str, Any] = {"val_images": 0 if val is None else len(val),
                               "holdout_images": 0 if holdout is None else len(holdout)}
    for s in sorted(sizes, reverse=True):
        if val is not None:
            wrong = misses(model, val, s)
            metrics[f"val_top1_err_{s}"] = round(100.0 * float(wrong.double().mean()), 2)
            metrics[f"val_misses_{s}"] = pack_mask(wrong)
        if holdout is not None and len(holdout):
            metrics[f"holdout_top1_err_{s}"] = round(100.0 * float(misses(model, holdout, s).double().mean()), 2)
    return metrics


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, size: int = 224, reps: int = 10) -> float:
    """Median forward time of one ``(1, 3, size, size)`` image on the CPU, in ms."""
    model = model.cpu().eval()
    x = torch.randn(1, 3, size, size)
    model(x)
    times = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def latency_setup() -> str:
    """What a CPU latency depends on besides the model, in words, recorded beside the number:
    threads, the CPU and LGAM's path (its C++ kernels or the equations)."""
    return f"{device_summary(torch.device('cpu'))}, LGAM kernels {fused_kernels_setting('cpu')}"


def evaluate_checkpoints(
    directory: str | Path,
    data: str | Path | Sequence[str | Path],
    models: Sequence[str] | None = None,
    sizes: Sequence[int] = SIZES,
    limit: int | None = None,
    batch_size: int = 64,
    latency_reps: int = 10,
    update: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Evaluate checkpoints of ``directory`` on the ``val`` split of ``data``; one dict per model
    with ``model``, ``input_size`` and the metrics (also merged into the manifest if ``update``; a
    ``limit`` turns that off)."""
    manifest = load_manifest(directory)["models"]
    names = list(models or manifest)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise CheckpointError(f"not in {directory}/manifest.json: {unknown}; it has {sorted(manifest)}")
    split = load_split(data, "val", limit=limit)
    note_resized(split)
    rows = []
    for name in names:
        model, entry = load_checkpoint(directory, name, map_location=device)
        # by class id where the entry has them: two classes may share a display name
        wnids = (entry.get("extra") or {}).get("wnids")
        _check_same_classes(name, *((wnids, split.class_ids) if wnids else (entry["classes"], split.classes)))
        metrics: dict[str, Any] = {
            f"val_top1_err_{s}": round(top1_error(model, split, s, entry["mean"], entry["std"],
                                                  batch_size), 2)
            for s in sorted({*sizes, int(entry["input_size"])}, reverse=True)
        }
        metrics.update(cost_metrics(model))
        metrics["cpu_latency_ms_224"] = round(cpu_latency_ms(model, 224, latency_reps), 2)
        metrics["cpu_latency_setup"] = latency_setup()
        metrics["val_images"] = len(split)
        if update and limit is None:
            update_metrics(directory, name, metrics)
        rows.append({"model": name, "input_size": int(entry["input_size"]), **entry["metrics"], **metrics})
    return rows


def note_resized(split: DecodedSplit) -> None:
    """Say on stderr when val images of other sizes were resized on decode to the first one's
    square: they are then resized twice (there, and to each input size), where the app resizes
    each image once, so their errors can differ slightly from what the app would give."""
    if split.resized:
        s = split.images.shape[-1]
        print(f"note: {split.resized} of {len(split)} val images are not {s}x{s} px (the first image's "
              f"size): each was resized to {s}x{s} on decoding, then to each input size (the app "
              "resizes once), so their errors can differ slightly from the app's", file=sys.stderr)


def _check_same_classes(what: str, trained: Sequence[str], data: Sequence[str]) -> None:
    """:class:`DataError` unless ``what`` was trained on the class list the data has (in order)."""
    if list(trained) != list(data):
        raise DataError(f"{what} was trained on classes {list(trained)[:3]}... but the val data has "
                        f"{list(data)[:3]}...: the labels would not match; evaluate on the same class list")


def best_input_size(rows: list[dict[str, Any]], sizes: Sequence[int]) -> tuple[int, dict[int, float]]:
    """The size among ``sizes`` with the lowest mean top-1 error over ``rows``, and every mean."""
    means = {s: statistics.fmean(r[f"val_top1_err_{s}"] for r in rows) for s in sizes}
    return min(means, key=lambda s: (means[s], s)), means


def format_table(rows: list[dict[str, Any]], sizes: Sequence[int] = SIZES) -> str:
    """Our Table 4 beside the paper's column: the error at the app's input size first, then at
    each of ``sizes``."""
    cols = [f"top-1 err {s} px (%)" for s in sizes]
    head = ["model", "app size", "top-1 err, app size (%)", *cols, "paper Table 4 (%)", "params (M)",
            "GMACs 224", "CPU ms (b=1, 224)", "train img/s", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    fmt = format_or_dash
    for r in rows:
        app = r.get("input_size")
        cells = [r["model"], fmt(app, "d"), fmt(r.get(f"val_top1_err_{app}"), ".2f"),
                 *(fmt(r.get(f"val_top1_err_{s}"), ".2f") for s in sizes),
                 fmt(PAPER_TOP1_ERR.get(r["model"]), ".2f"), fmt(r.get("params", 0) / 1e6, ".3f"),
                 fmt(r.get("gmacs_224"), ".3f"), fmt(r.get("cpu_latency_ms_224"), ".1f"),
                 fmt(r.get("train_img_per_s"), ".0f"), fmt(r.get("train_wall_min"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0].get("val_images") if rows else None
    lines.append(f"\nVal images: {n}. One seed per model: differences below ~1 point are within "
                 "seed-to-seed noise and do not rank the modules.")
    setups = sorted({r["cpu_latency_setup"] for r in rows if r.get("cpu_latency_setup")})
    if setups:
        lines.append(f"CPU ms measured with {' / '.join(setups)}.")
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", default="checkpoints", help="folder with manifest.json")
    p.add_argument("--data", required=True,
                   help="val data: ImageFolder root, folder of val-*.tar.gz shards, or CIFAR folder")
    p.add_argument("--models", nargs="+", help="models to evaluate (default: all in the manifest)")
    p.add_argument("--sizes", nargs="+", type=positive_int, default=list(SIZES),
                   help=f"input sizes (default {' '.join(map(str, SIZES))}; the app's size is added)")
    p.add_argument("--choose-input-size", action="store_true",
                   help="set the evaluated models' input_size (the app's) to the size among --sizes "
                        "with the lowest mean val error: chosen on val, the val numbers then favour it "
                        "(with held-out runs, lgam table4 RUNS --checkpoints DIR chooses on those)")
    p.add_argument("--limit", type=positive_int,
                   help="evaluate on at most N val images (spread over classes); the manifest is "
                        "then left as it is")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--latency-reps", type=positive_int, default=10)
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N: device for the error "
                   "computation (latency is CPU)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--no-update", action="store_true", help="do not write metrics to the manifest")
    p.add_argument("--runs", nargs="+", type=Path, metavar="RUN",
                   help="instead of checkpoints: lgam train run folders (OUT/MODEL); writes each one's "
                        "val and held-out errors at every --sizes entry to RUN/metrics.json")


def evaluate_runs(runs: Sequence[Path], data: str | Path, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """:func:`evaluate_run` for each run folder, on ``data``'s val split and on the training images
    each run held out (its ``--holdout``); writes ``RUN/metrics.json`` and returns the metrics. A
    folder of class folders (no val/) has no val split apart from its training images: its runs get
    held-out errors only."""
    from ._fileio import atomic_write_json

    configs = [_finished_run_config(run) for run in runs]  # before minutes of decoding
    val = None
    if is_flat_tree(data):
        if not all(int(c.get("args", {}).get("holdout") or 0) for c in configs):
            raise DataError(f"{data} is a folder of class folders without val/: its val split would be the "
                            "training images themselves, and a run without --holdout has no other images to "
                            "be scored on; add val/ (and train/)")
        print(f"note: {data} is a folder of class folders without val/: held-out errors only", file=sys.stderr)
    else:
        val = load_split(data, "val")
        note_resized(val)
    key_of, label = ("val", "") if val is not None else ("holdout", "held-out ")  # what the lines print
    held: dict[tuple, DecodedSplit] = {}
    rows = []
    for run, config in zip(runs, configs):
        args = config.get("args", {})
        n = int(args.get("holdout") or 0)
        # the images the run held out: its train split as it read it (--limit, --skip-corrupt)
        key = (n, args.get("limit"), bool(args.get("skip_corrupt")))
        if n and key not in held:
            held[key] = split_holdout(load_split(data, "train", limit=key[1], skip_corrupt=key[2]), n)[1]
        if config.get("classes") is not None:
            _check_same_classes(str(run), config["classes"], (val if val is not None else held[key]).class_ids)
        metrics = {"model": config["model"], "seed": config["seed"], "holdout_per_class": n,
                   **evaluate_run(run, val, held.get(key), sizes)}
        atomic_write_json(run / "metrics.json", metrics)
        rows.append(metrics)
        print(f"{run}: {label}" + ", ".join(f"{s} px {metrics[f'{key_of}_top1_err_{s}']:.2f}%" for s in sorted(sizes)),
              flush=True)
    return rows


def _finished_run_config(run: Path) -> dict[str, Any]:
    """``run``'s ``config.json`` with the classes its state was trained on; :class:`UsageError`
    unless it is an ``lgam train`` run folder whose saved state has every epoch of its recipe (an
    unfinished run's numbers would enter Table 4 as a finished one's)."""
    from .runstate import CONFIG, STATE_TENSORS, read_state_meta

    if not (run / CONFIG).is_file() or not (run / STATE_TENSORS).is_file():
        raise UsageError(f"{run} is not an lgam train run folder (OUT/MODEL with {CONFIG} and "
                         f"{STATE_TENSORS})")
    config = json.loads((run / CONFIG).read_text())
    meta = read_state_meta(run)
    epochs = int(config["recipe"]["epochs"])
    if int(meta["epoch"]) != epochs:
        raise UsageError(f"{run} has finished {meta['epoch']} of its {epochs} epochs: finish it "
                         f"(lgam train ... --resume) before evaluating it")
    return {**config, "classes": meta.get("settings", {}).get("classes")}


#: ``lgam evaluate`` options that apply to checkpoints only (their defaults: :func:`configure_parser`)
CHECKPOINT_ONLY = ("models", "choose_input_size", "limit", "batch_size", "device", "out", "no_update")


def main(args: argparse.Namespace) -> int:
    if args.runs:
        defaults = argparse.ArgumentParser()
        configure_parser(defaults)
        given = [k for k in CHECKPOINT_ONLY if getattr(args, k) != defaults.get_default(k)]
        if given:
            raise UsageError("with --runs, " + ", ".join("--" + k.replace("_", "-") for k in given)
                             + " do not apply: a run is evaluated on the full val split and its "
                               "numbers go to RUN/metrics.json")
        evaluate_runs(args.runs, args.data, args.sizes)
        return 0
    if args.choose_input_size and (args.limit is not None or args.no_update):
        raise UsageError("--choose-input-size needs the full val split and a manifest update "
                         "(drop --limit / --no-update)")
    try:
        device = str(resolve_device(args.device))  # before minutes of decoding
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows = evaluate_checkpoints(args.checkpoints, args.data, args.models, args.sizes, args.limit,
                                args.batch_size, args.latency_reps, not args.no_update, device)
    if args.limit is not None and not args.no_update:
        print(f"note: --limit {args.limit}: numbers of a subset, the manifest is left as it is",
              file=sys.stderr)
    if args.choose_input_size:
        size, means = best_input_size(rows, args.sizes)
        for r in rows:
            update_metrics(args.checkpoints, r["model"], {}, input_size=size)
            r["input_size"] = size
        summary = ", ".join(f"{s} px {e:.2f}%" for s, e in means.items())
        print(f"input_size -> {size} px (mean top-1 error over {len(rows)} models: {summary})")
    table = format_table(rows, args.sizes)
    print(table)
    if args.out:
        write_text(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.evaluate"))
