"""Issue 22's 18 runs (the six Figure-5 models x seeds 0, 1, 2 on the ``cpu`` recipe), one at a
time, resumable: run it detached at the start of a session and it continues where the last
session stopped.

For each (seed, model) in order (every model's seed 0 first: those are the shipped checkpoints),
unless ``checkpoints/runs/MODEL/seedK/metrics.json`` exists:

1. ``lgam train --model MODEL --seed K --recipe cpu --holdout 50 --resume`` into
   ``RUNS/seedK/MODEL`` (outside the work tree; ``--resume`` continues a killed run from its last
   epoch, or starts one); seed 0 also saves the float16 checkpoint into ``checkpoints/``;
2. ``lgam evaluate --runs``: val and held-out errors at 128/160/192/224 px, val misses;
3. copies ``config.json``, ``log.jsonl`` and ``metrics.json`` to ``checkpoints/runs/MODEL/seedK/``.

Nothing is committed: the session commits each finished run. ``--epochs N`` is the schedule test:
the recipe stretched to N epochs (:func:`schedule_args`), its records in ``seedK-Nep`` folders
and its run states in ``RUNS-Nep``.

    setsid nohup python scripts/fair_runs.py --data ../shared/data/imagenet20 > ~/.cache/lgam-runs/fair.log 2>&1 &
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from lgam._fileio import atomic_write
from lgam.recipes import RECIPES
from lgam.table4 import seed_dir_name

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet18", "resnet18_lgam", "resnet18_se", "resnet18_cbam", "resnet18_sge", "resnet18_bam"]
SEEDS = [0, 1, 2]
SHIPPED_SEED = 0  # fixed before any result: the shipped checkpoint is every model's seed-0 run
HOLDOUT = 50  # training images per class kept out of every run (lgam.data.split_holdout)
RECIPE = "cpu"


def schedule_args(epochs: int | None) -> list[str]:
    """``lgam train`` arguments for another schedule length: the recipe stretched as a whole, its
    epochs and the epochs held at full size scaled together, so every train size gets the same
    share of the run (``cpu`` at 40 epochs: 96 / 112 / 128 px for 8 / 16 / 16 epochs, twice the
    20-epoch run's 4 / 8 / 8); the warm-up stays one epoch."""
    if not epochs:
        return []
    base = RECIPES[RECIPE]
    hold = round(base.size_hold_epochs * epochs / base.epochs)
    return ["--epochs", str(epochs), "--set", f"size_hold_epochs={hold}"]


def record_dir(model: str, seed: int, epochs: int | None = None) -> Path:
    """Where a run's records are committed: ``seedK``, or ``seedK-Nep`` for another schedule length
    (``lgam table4 --schedule N`` reads those)."""
    return ROOT / "checkpoints" / "runs" / model / seed_dir_name(seed, epochs)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def one(model: str, seed: int, data: str, runs: Path, epochs: int | None, extra: list[str]) -> None:
    out = runs / f"seed{seed}"
    cmd = [sys.executable, "-m", "lgam", "train", "--model", model, "--data", data, "--recipe", RECIPE,
           "--seed", str(seed), "--holdout", str(HOLDOUT), "--val-size", "160", "--val-every", "4",
           "--out", str(out), "--resume", "--no-progress", *schedule_args(epochs), *extra]
    if seed == SHIPPED_SEED and not epochs:
        cmd += ["--checkpoints-dir", str(ROOT / "checkpoints")]
    run(cmd)
    run([sys.executable, "-m", "lgam", "evaluate", "--runs", str(out / model), "--data", data])
    dest = record_dir(model, seed, epochs)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "log.jsonl", "metrics.json"):  # metrics.json last: it marks the run done
        atomic_write(dest / name, lambda tmp: shutil.copyfile(out / model / name, tmp))
    print(f"done: {model} seed {seed} -> {dest.relative_to(ROOT)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--runs", type=Path, default=Path.home() / ".cache" / "lgam-runs" / "fair",
                   help="run states (outside the work tree)")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--epochs", type=int, help="another schedule length, the recipe stretched to it "
                                              "(the schedule test: 40)")
    p.add_argument("--max-runs", type=int, help="stop after this many runs")
    args, extra = p.parse_known_args(argv)
    done = 0
    for seed in args.seeds:
        for model in args.models:
            if (record_dir(model, seed, args.epochs) / "metrics.json").exists():
                continue
            if args.max_runs is not None and done >= args.max_runs:
                return 0
            one(model, seed, args.data, args.runs if not args.epochs else args.runs.with_name(
                f"{args.runs.name}-{args.epochs}ep"), args.epochs, extra)
            done += 1
    print("all runs done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
