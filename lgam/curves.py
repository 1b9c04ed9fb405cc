"""``lgam curves``: training curves (validation top-1 error and training loss per epoch) of several
models in one figure, from the ``log.jsonl`` that ``lgam train`` writes.

Reads ``RUNS/MODEL/log.jsonl`` for every model folder under each ``RUNS`` (a training ``--out`` or a
checkpoints folder's ``runs/``); PNG, PDF or SVG by the output's suffix.

    lgam curves checkpoints/runs --seed 0 --out docs/val_curves.png
    lgam curves checkpoints/runs --seed 0 1 --out curves.png   # mean over seeds, each seed thin
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ._fileio import FIGURE_FORMATS, save_figure
from .errors import UsageError

__all__ = ["read_logs", "read_seed_logs", "curves_figure", "configure_parser", "main"]


def read_logs(folders: Sequence[str | Path], models: Sequence[str] | None = None, seed: int | None = None
              ) -> dict[str, list[dict[str, Any]]]:
    """``{model: records}`` from ``FOLDER/MODEL/log.jsonl``, or with ``seed`` from
    ``FOLDER/MODEL/seedK/log.jsonl`` (the layout of ``checkpoints/runs``), in ``models`` order if
    given, else sorted. Raises :class:`~lgam.errors.UsageError` naming what is missing or unreadable."""
    logs: dict[str, list[dict[str, Any]]] = {}
    pattern = "*/log.jsonl" if seed is None else f"*/seed{seed}/log.jsonl"
    for folder in map(Path, folders):
        for log in sorted(folder.glob(pattern)):
            model = log.parent.name if seed is None else log.parent.parent.name
            if model in logs:
                raise UsageError(f"{model} has a log in more than one folder ({log}): pass one of them")
            lines = log.read_text().splitlines()
            try:
                logs[model] = [json.loads(line) for line in lines if line.strip()]
            except json.JSONDecodeError as e:
                raise UsageError(f"{log} is not a JSON-lines training log: {e}") from None
            if not all(isinstance(r, dict) and {"epoch", "loss"} <= r.keys() for r in logs[model]):
                raise UsageError(f"{log}: every record needs 'epoch' and 'loss' (an lgam train log)")
    if models:
        missing = [m for m in models if m not in logs]
        if missing:
            raise UsageError(f"no log.jsonl for {missing} under {[str(f) for f in folders]}; "
                                    f"found {sorted(logs)}")
        return {m: logs[m] for m in models}
    if not logs:
        hint = " (runs kept per seed, MODEL/seedK/: pass --seed K)" if seed is None and any(
            next(Path(f).glob("*/seed*/log.jsonl"), None) for f in folders) else ""
        raise UsageError(f"no {pattern} under {[str(f) for f in folders]}{hint}")
    return logs


def read_seed_logs(folders: Sequence[str | Path], seeds: Sequence[int], models: Sequence[str] | None = None
                   ) -> dict[str, list[list[dict[str, Any]]]]:
    """``{model: [records of each seed]}`` from ``FOLDER/MODEL/seedK/log.jsonl`` for every seed in
    ``seeds`` (:func:`read_logs` per seed). Every model needs every seed: a model that lacks one
    is a :class:`~lgam.errors.UsageError` naming it, not a mean over fewer seeds."""
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds {list(seeds)} name one seed twice: its run would count twice in the mean")
    per_seed = {k: read_logs(folders, models, k) for k in seeds}
    found = list(dict.fromkeys(m for logs in per_seed.values() for m in logs))
    missing = {m: [k for k, logs in per_seed.items() if m not in logs] for m in found}
    missing = {m: ks for m, ks in missing.items() if ks}
    if missing:
        raise UsageError("no log for " + "; ".join(f"{m} seed {', '.join(map(str, ks))}" for m, ks in missing.items())
                         + ": pass --models with the models that have every seed, or fewer seeds")
    return {m: [per_seed[k][m] for k in seeds] for m in found}


def spread(values: Sequence[float], gap: float) -> list[float]:
    """Positions for labels at ``values``: each as near its value as it can be, at least ``gap``
    from the others, in the same order (labels that would overlap are spread around their mean)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    clusters: list[list[float]] = []  # runs of labels that touch: their values, in order
    for i in order:
        clusters.append([values[i]])
        while len(clusters) > 1 and (_start(clusters[-2], gap) + len(clusters[-2]) * gap
                                     > _start(clusters[-1], gap)):
            clusters[-2:] = [clusters[-2] + clusters[-1]]
    placed = [_start(c, gap) + k * gap for c in clusters for k in range(len(c))]
    out = [0.0] * len(values)
    for i, p in zip(order, placed):
        out[i] = p
    return out


def _start(cluster: list[float], gap: float) -> float:
    """The first position of a run of labels centred on its values' mean."""
    return sum(cluster) / len(cluster) - (len(cluster) - 1) * gap / 2


def _label_ends(ax, ends: list[tuple[float, float, str]]) -> None:
    """Write each curve's last value beside its end, spread so that no two labels overlap."""
    if not ends:
        return
    low, high = ax.get_ylim()
    ys = spread([e for _, e, _ in ends], gap=0.045 * (high - low))  # ~1.5 lines of 7 pt text
    for (x, y, colour), y_text in zip(ends, ys):
        ax.annotate(f"{y:.1f}", (x, y), xytext=(x + 0.4, y_text), textcoords="data", fontsize=7,
                    color=colour, va="center",
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.5, shrinkA=0, shrinkB=1))


def curves_figure(logs: dict[str, list[list[dict[str, Any]]]], title: str | None = None):
    """A matplotlib ``Figure``: validation top-1 error (left) and training loss (right) per epoch,
    one line per model; the last validation error is written at each line's end.

    ``logs``: ``{model: [records of each run]}`` (:func:`read_seed_logs`; one run:
    ``{model: [records]}`` from :func:`read_logs`). With several runs each is a thin line and the
    model's line is the mean over them at the epochs they all have."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    bad = [name for name, runs in logs.items() if not runs or not all(isinstance(run, list) for run in runs)]
    if bad:
        raise TypeError(f"curves_figure takes {{model: [records of each run]}}; not so for {bad} "
                        "(one run's records: wrap them in a list)")
    fig = Figure(figsize=(10, 4), layout="constrained")
    err_ax, loss_ax = fig.subplots(1, 2)
    ends = []  # (epoch, error, colour) of each validation curve's last point
    for name, runs in logs.items():
        label = name if len(runs) == 1 else f"{name} (mean of {len(runs)} seeds)"
        colour = _plot_mean(err_ax, runs, "val_top1_err", label, marker="o", markersize=3)
        _plot_mean(loss_ax, runs, "loss", label, color=colour)
        scored = _mean_over_runs(runs, "val_top1_err")
        if scored:
            ends.append((scored[-1][0], scored[-1][1], colour))
    sizes = {r.get("val_size") for runs in logs.values() for run in runs for r in run if r.get("val_size")}
    size = f" at {sizes.pop()} px" if len(sizes) == 1 else ""
    err_ax.set(xlabel="epoch", ylabel=f"val top-1 error (%){size}", ylim=(0, None))
    _label_ends(err_ax, ends)
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    for ax in (err_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 2.5
    err_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _mean_over_runs(runs: list[list[dict[str, Any]]], key: str) -> list[tuple[int, float]]:
    """``(epoch, mean of key)`` at the epochs where every run has ``key``, in order."""
    per_run = [{r["epoch"]: r[key] for r in run if r.get(key) is not None} for run in runs]
    epochs = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    return [(e, sum(d[e] for d in per_run) / len(per_run)) for e in epochs]


def _plot_mean(ax, runs: list[list[dict[str, Any]]], key: str, label: str, **style) -> str:
    """The mean over ``runs`` as a line (each run thin behind it when there are several); its colour."""
    points = _mean_over_runs(runs, key)
    line, = ax.plot([e for e, _ in points], [v for _, v in points], label=label, **style)
    if len(runs) > 1:
        for run in runs:
            kept = [r for r in run if r.get(key) is not None]
            ax.plot([r["epoch"] for r in kept], [r[key] for r in kept], color=line.get_color(),
                    linewidth=0.7, alpha=0.35)
    return line.get_color()


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="folders holding MODEL/log.jsonl (e.g. checkpoints/runs)")
    p.add_argument("--models", nargs="+", help="models to plot, in this order (default: all found)")
    p.add_argument("--out", type=Path, required=True, help=f"output file ({', '.join(FIGURE_FORMATS)})")
    p.add_argument("--title", help="figure title")
    p.add_argument("--seed", type=int, nargs="+", metavar="K",
                   help="read MODEL/seedK/log.jsonl (checkpoints/runs keeps every seed); several seeds: each "
                        "model's mean over them, each seed a thin line")


def main(args: argparse.Namespace) -> int:
    seeds = args.seed or [None]
    if len(seeds) == 1:
        logs = {m: [records] for m, records in read_logs(args.runs, args.models, seeds[0]).items()}
    else:
        logs = read_seed_logs(args.runs, seeds, args.models)
    save_figure(curves_figure(logs, args.title), args.out)
    over = f", seeds {' '.join(map(str, args.seed))}" if args.seed else ""
    print(f"wrote {args.out} ({len(logs)} models{over})")
    return 0


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.curves"))
