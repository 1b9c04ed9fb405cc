"""``lgam table4``: the paper's Table 4 from several seeds per model, with error bars and paired tests.

Reads ``RUNS/MODEL/seedK/metrics.json`` (``lgam evaluate --runs``, copied by
``scripts/fair_runs.py``) and reports, at one input size:

- each model's val top-1 error as mean ± std over its seeds (sample std), next to the paper's;
- each model's difference to plain ResNet18, seed by seed (the same seed is the same data order
  and augmentation), with a 95 % t interval over the seeds: with three seeds the interval is wide
  (t = 4.30), which is the honest size of what three runs can tell;
- McNemar's exact test between each model's and plain's shipped runs (``--shipped-seed``) on the
  val images they disagree on: whether *those two networks* differ, not whether the modules do.

The input size is chosen on the training images every run held out (the lowest mean
``holdout_top1_err`` over all runs), never on val. ``--figure`` draws the means with std bars;
``--checkpoints DIR`` makes that size the shipped checkpoints' ``input_size`` (the app's). Below
the table, one row per run: its val and held-out errors at every size, its last epoch's train
loss, its training minutes (wall and CPU time, from its ``log.jsonl``) and the commit it ran (its
``config.json``), so no number of a run is copied by hand. ``--by COLUMN --data DATA`` breaks
the table down by a column of the data's ``classes.tsv`` (``source``: Imagenette's classes vs
Imagewoof's dog breeds), from each run's val misses. ``--schedule N`` adds the schedule test: the
runs of another length, ``RUNS/MODEL/seedK-Nep/`` (which the table leaves out), beside the
table's runs of the same seeds; with ``--by``, those runs broken down by the column too.

    lgam table4 checkpoints/runs --by source --data ../shared/data/imagenet20 \\
        --out docs/results/table4.md --figure docs/table4.png --checkpoints checkpoints
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ._fileio import write_text
from ._format import DASH, format_or_dash
from .errors import UsageError
from .evaluate import PAPER_TOP1_ERR, unpack_mask
from .models import FIGURE5_MODELS

__all__ = ["T975", "t975", "read_runs", "evaluated_sizes", "choose_size", "SeedSummary",
           "summarise", "paired_difference", "gap_difference", "mean_interval", "mcnemar", "format_table4",
           "format_runs", "format_schedule", "by_group", "format_by_group", "seed_dir_name", "seeds_label",
           "table4_figure", "ship_input_size", "configure_parser", "main"]

#: two-sided 95 % quantiles of Student's t by degrees of freedom (1..30; :func:`t975` beyond)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
        26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    """Student's t two-sided 95 % quantile: the table to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal's 1.95996 (within 1e-3 there; the normal quantile
    alone, used once past 10, made a 12-seed interval 11 % too narrow)."""
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)

Runs = dict[str, dict[int, dict[str, Any]]]  # model -> seed -> metrics


def seed_dir_name(seed: int, epochs: int | None = None) -> str:
    """A run's folder under ``RUNS/MODEL/``: ``seedK``, or ``seedK-Nep`` for a run of another
    schedule length (``epochs=N``), kept apart from the table's runs."""
    return f"seed{seed}{_suffix(epochs)}"


def _suffix(epochs: int | None) -> str:
    return "" if epochs is None else f"-{epochs}ep"


def _seed_of(dir_name: str, epochs: int | None) -> int | None:
    suffix = _suffix(epochs)
    k = dir_name[4:len(dir_name) - len(suffix)]
    ok = dir_name.startswith("seed") and dir_name.endswith(suffix) and k.isdigit()
    return int(k) if ok else None


def read_runs(folder: str | Path, models: Sequence[str] | None = None, epochs: int | None = None) -> Runs:
    """``{model: {seed: metrics}}`` from ``FOLDER/MODEL/seedK/metrics.json``, or with ``epochs``
    from the other schedule's ``FOLDER/MODEL/seedK-{epochs}ep/`` (:func:`seed_dir_name`)."""
    runs: Runs = {}
    for path in sorted(Path(folder).glob("*/seed*/metrics.json")):
        model, seed = path.parent.parent.name, _seed_of(path.parent.name, epochs)
        if seed is None or (models and model not in models):
            continue
        runs.setdefault(model, {})[seed] = json.loads(path.read_text())
    if not runs:
        raise UsageError(f"no MODEL/seedK{_suffix(epochs)}/metrics.json under {folder} (lgam evaluate --runs writes them)")
    order = list(models or FIGURE5_MODELS)
    return dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def evaluated_sizes(runs: Runs) -> list[int]:
    """Every input size some run has a val error at, ascending."""
    return sorted({int(k.rsplit("_", 1)[1]) for seeds in runs.values() for m in seeds.values()
                   for k in m if k.startswith("val_top1_err_")})


def choose_size(runs: Runs, sizes: Sequence[int] | None = None) -> tuple[int, dict[int, float]]:
    """The size with the lowest mean held-out error over every run (among ``sizes``, default every
    size the runs were evaluated at), and each size's mean."""
    sizes = evaluated_sizes(runs) if sizes is None else sizes
    every = {(model, seed): m for model, seeds in runs.items() for seed, m in seeds.items()}
    have = {s: {k for k, m in every.items() if f"holdout_top1_err_{s}" in m} for s in sizes}
    have = {s: keys for s, keys in have.items() if keys}
    if not have:
        raise UsageError("no held-out errors in these runs (train with --holdout N): pass --size")
    lacking = {s: len(every) - len(keys) for s, keys in sorted(have.items()) if len(keys) < len(every)}
    if lacking:  # a size averaged over only some runs does not compare with the others
        counts = ", ".join(f"{s} px: {n}" for s, n in lacking.items())
        raise UsageError(f"runs without a held-out error at a candidate size ({counts} of {len(every)}): "
                         "evaluate every run at every size, or pass --size")
    means = {s: statistics.fmean(every[k][f"holdout_top1_err_{s}"] for k in keys) for s, keys in have.items()}
    return min(means, key=lambda s: (means[s], s)), means


@dataclass
class SeedSummary:
    """One model's val error at one size over its seeds."""

    errors: dict[int, float]

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors.values())

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.errors.values()) if self.n > 1 else None


def summarise(runs: Runs, size: int) -> dict[str, SeedSummary]:
    return {model: SeedSummary({k: m[f"val_top1_err_{size}"] for k, m in sorted(seeds.items())})
            for model, seeds in runs.items()}


def paired_difference(runs: Runs, model: str, base: str, size: int) -> tuple[list[float], float, float | None]:
    """Per-seed ``model - base`` errors over the seeds both have, their mean and the 95 % t
    interval's half-width (None with fewer than two seeds)."""
    seeds = sorted(set(runs[model]) & set(runs[base]))
    diffs = [runs[model][k][f"val_top1_err_{size}"] - runs[base][k][f"val_top1_err_{size}"] for k in seeds]
    if not diffs:
        raise UsageError(f"{model} and {base} share no seed")
    return (diffs, *mean_interval(diffs))


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean of ``values`` and its 95 % Student's t interval's half-width (None for one value)."""
    half = None
    if len(values) > 1:
        half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values), half


def mcnemar(wrong_a: Sequence[bool], wrong_b: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test on paired predictions: ``(b, c, p)`` with ``b`` the images only ``a``
    gets wrong, ``c`` those only ``b`` gets wrong, ``p`` the two-sided binomial p-value."""
    b = sum(1 for x, y in zip(wrong_a, wrong_b) if x and not y)
    c = sum(1 for x, y in zip(wrong_a, wrong_b) if y and not x)
    n, k = b + c, min(b, c)
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)


def _shipped_mcnemar(runs: Runs, model: str, base: str, size: int, seed: int) -> str:
    a, b = runs[model].get(seed), runs[base].get(seed)
    key = f"val_misses_{size}"
    if not a or not b or key not in a or key not in b:
        return DASH
    n = a["val_images"]
    if b["val_images"] != n:  # masks over other images: McNemar would pair unrelated predictions
        return DASH
    only_model, only_base, p = mcnemar(unpack_mask(a[key], n).tolist(), unpack_mask(b[key], n).tolist())
    return f"{only_model} / {only_base}, p = {p:.2g}"


def format_table4(runs: Runs, size: int, base: str = "resnet18", shipped_seed: int = 0) -> str:
    """Markdown: one row per model (see the module's docstring)."""
    summary = summarise(runs, size)
    head = ["model", "paper Table 4 (%)", f"ours, {size} px: mean ± std (%)", "seeds", "per seed (%)",
            f"Δ vs {base}: mean [95 % CI] (pt)", f"McNemar vs {base}, seed {shipped_seed}: only it wrong / only {base} wrong"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 5 + "---|"]
    for model, s in summary.items():
        label = FIGURE5_MODELS.get(model, model)
        paper = PAPER_TOP1_ERR.get(model)
        delta = _delta(runs, model, base, size)
        test = DASH if delta == DASH else _shipped_mcnemar(runs, model, base, size, shipped_seed)
        lines.append(f"| {label} | {format_or_dash(paper, '.2f')} | {_mean_std(s)} | {s.n} | {_per_seed(s)} "
                     f"| {delta} | {test} |")
    n_val = next(iter(next(iter(runs.values())).values())).get("val_images")
    lines.append(f"\nVal images: {n_val}. Std over seeds is the sample std; the interval is Student's t "
                 "over the per-seed paired differences.")
    return "\n".join(lines)


def by_group(runs: Runs, size: int, groups: Sequence[str]) -> dict[str, Runs]:
    """The runs' val errors at ``size`` within each group of val images: ``{group: runs}``, each
    run's ``val_top1_err_{size}`` the share (%) of that group's images it gets wrong, from its
    ``val_misses_{size}``. ``groups``: each val image's group, in the order the runs were
    evaluated in (:func:`lgam.data.image_groups`)."""
    key = f"val_misses_{size}"
    members = {g: torch.tensor([x == g for x in groups]) for g in dict.fromkeys(groups)}
    out: dict[str, Runs] = {g: {} for g in members}
    for model, seeds in runs.items():
        for seed, m in seeds.items():
            if key not in m:
                raise UsageError(f"{model} seed {seed} has no {key} (lgam evaluate --runs writes it)")
            if m["val_images"] != len(groups):
                raise UsageError(f"{model} seed {seed} was evaluated on {m['val_images']} val images, the "
                                 f"data given has {len(groups)}: not the data these runs were evaluated on")
            wrong = unpack_mask(m[key], len(groups))
            for g, inside in members.items():
                n = int(inside.sum())
                out[g].setdefault(model, {})[seed] = {f"val_top1_err_{size}": 100.0 * int(wrong[inside].sum()) / n,
                                                      "val_images": n}
    return out


def format_by_group(grouped: dict[str, Runs], size: int, base: str = "resnet18") -> str:
    """Markdown: one row per group and model (:func:`by_group`): the group's images, the model's
    error in it as mean ± std over its seeds, per seed, and its paired difference to ``base`` on
    those images with the 95 % t interval, as in :func:`format_table4`."""
    lines = [f"| group | images | model | {size} px: mean ± std (%) | per seed (%) | "
             f"Δ vs {base}: mean [95 % CI] (pt) |", "|---|---:|---|---:|---:|---:|"]
    for group, runs in grouped.items():
        for model, s in summarise(runs, size).items():
            n = next(iter(runs[model].values()))["val_images"]
            lines.append(f"| {_cell(group)} | {n} | {FIGURE5_MODELS.get(model, model)} | {_mean_std(s)} | "
                         f"{_per_seed(s)} | {_delta(runs, model, base, size)} |")
    if len(grouped) == 2:
        lines += ["", _format_gap_difference(grouped, size, base)]
    return "\n".join(lines)


def gap_difference(grouped: dict[str, Runs], model: str, base: str, size: int
                   ) -> tuple[list[float], float, float | None]:
    """Whether ``model``'s gap to ``base`` differs between two groups: per seed (those all four
    runs share), its paired difference in the second group minus that in the first; their mean
    and the 95 % t interval's half-width (None with one seed)."""
    (_, first), (_, second) = grouped.items()
    seeds = sorted(set(first[model]) & set(first[base]) & set(second[model]) & set(second[base]))
    if not seeds:
        raise UsageError(f"{model} and {base} share no seed in both groups")
    key = f"val_top1_err_{size}"
    diffs = [(second[model][k][key] - second[base][k][key]) - (first[model][k][key] - first[base][k][key])
             for k in seeds]
    return (diffs, *mean_interval(diffs))


def _format_gap_difference(grouped: dict[str, Runs], size: int, base: str) -> str:
    first, second = (_cell(g) for g in grouped)
    lines = [f"| model | Δ in {second} − Δ in {first}: mean [95 % CI] (pt) | per seed (pt) |",
             "|---|---:|---:|"]
    runs = next(iter(grouped.values()))
    for model in runs:
        if model == base or base not in runs:
            continue
        shared = set.intersection(*(set(g[model]) & set(g[base]) for g in grouped.values()))
        if not shared:  # as _delta: a dash, not an error, for a model without a seed in common
            lines.append(f"| {FIGURE5_MODELS.get(model, model)} | {DASH} | {DASH} |")
            continue
        diffs, mean, half = gap_difference(grouped, model, base, size)
        ci = "" if half is None else f" [{mean - half:+.2f}, {mean + half:+.2f}]"
        lines.append(f"| {FIGURE5_MODELS.get(model, model)} | {mean:+.2f}{ci} | "
                     f"{' / '.join(f'{d:+.2f}' for d in diffs)} |")
    return "\n".join(lines)


def _mean_std(s: SeedSummary) -> str:
    return f"{s.mean:.2f}" + ("" if s.std is None else f" ± {s.std:.2f}")


def _per_seed(s: SeedSummary) -> str:
    return " / ".join(f"{e:.2f}" for e in s.errors.values())


def _cell(text: str) -> str:
    """A classes.tsv value as a Markdown table cell: ``|`` escaped, an empty one a dash."""
    return text.replace("|", "\\|") or DASH


def _delta(runs: Runs, model: str, base: str, size: int) -> str:
    """``mean [lo, hi]`` of the paired difference to ``base``, or a dash (the base itself, or no
    seed in common)."""
    if model == base or base not in runs or not set(runs[model]) & set(runs[base]):
        return DASH
    _, mean, half = paired_difference(runs, model, base, size)
    return f"{mean:+.2f}" + ("" if half is None else f" [{mean - half:+.2f}, {mean + half:+.2f}]")


def _errors(metrics: dict[str, Any], split: str, sizes: Sequence[int]) -> str:
    return " / ".join(format_or_dash(metrics.get(f"{split}_top1_err_{z}"), ".2f") for z in sizes)


def _run_facts(run: Path) -> tuple[str, str, str, str]:
    """``(last epoch's train loss, train wall minutes, train CPU minutes, short commits)`` of the
    run in folder ``run`` from its log.jsonl and config.json: a resumed run names the commit of
    each session that trained it, in order (``earlier_sessions``, then its last); a dash where a
    file or field is missing."""
    from .runstate import CONFIG, read_log
    from .train import summary_metrics

    records = read_log(run)
    summary = summary_metrics(records)
    config = json.loads((run / CONFIG).read_text()) if (run / CONFIG).exists() else {}
    sessions = [*config.get("earlier_sessions", []), config]
    commits = [c[:7] for c in dict.fromkeys(s.get("git_commit") for s in sessions) if c]
    return (format_or_dash(records[-1]["loss"] if records else None, ".3f"),
            format_or_dash(summary.get("train_wall_min"), ".0f"),
            format_or_dash(summary.get("train_cpu_min"), ".0f"), " → ".join(commits) or DASH)


def format_runs(runs: Runs, folder: str | Path, epochs: int | None = None) -> str:
    """Markdown: one row per run (model, seed) with its val and held-out errors at every size in
    its metrics, its last epoch's train loss, its training minutes (wall and CPU) and its commits
    (:func:`_run_facts`)."""
    sizes = sorted({int(k.rsplit("_", 1)[1]) for seeds in runs.values() for m in seeds.values()
                    for k in m if k.startswith("val_top1_err_")})
    px = " / ".join(map(str, sizes))
    lines = [f"| model | seed | val {px} px (%) | held-out {px} px (%) | train loss, last epoch "
             "| train min (log) | CPU min (log) | commit |", "|---|---:|---|---|---:|---:|---:|---|"]
    for model, seeds in runs.items():
        for seed, m in sorted(seeds.items()):
            facts = _run_facts(Path(folder) / model / seed_dir_name(seed, epochs))
            lines.append(f"| {model} | {seed} | {_errors(m, 'val', sizes)} | {_errors(m, 'holdout', sizes)} | "
                         + " | ".join(facts) + " |")
    return "\n".join(lines)


def format_schedule(runs: Runs, longer: Runs, size: int, epochs: tuple[Any, Any],
                    base: str = "resnet18") -> str:
    """Markdown: the schedule test. One row per run of the longer schedule (``longer``) beside
    the table's run of the same model and seed (``runs``): both val errors at ``size``, the
    change, and each one's difference to ``base`` on that seed; a mean row per model over the
    seeds it has. ``epochs``: the two schedules' lengths, for the headers."""
    key = f"val_top1_err_{size}"
    n0, n1 = epochs
    head = ["model", "seed", f"{n0} epochs (%)", f"{n1} epochs (%)", "change (pt)",
            f"vs {base}, {n0} epochs (pt)", f"vs {base}, {n1} epochs (pt)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * 5]
    for model, seeds in longer.items():
        cols = [[] for _ in range(5)]
        for seed, m in sorted(seeds.items()):
            short = runs.get(model, {}).get(seed, {}).get(key)
            values = [short, m[key], _minus(m[key], short),
                      None if model == base else _minus(short, runs.get(base, {}).get(seed, {}).get(key)),
                      None if model == base else _minus(m[key], longer.get(base, {}).get(seed, {}).get(key))]
            for col, v in zip(cols, values):
                col.append(v)
            lines.append(f"| {model} | {seed} | " + " | ".join(
                format_or_dash(v, "+.2f" if i >= 2 else ".2f") for i, v in enumerate(values)) + " |")
        if len(seeds) > 1:
            means = [None if None in c else statistics.fmean(c) for c in cols]
            lines.append(f"| {model} | mean | " + " | ".join(
                format_or_dash(v, "+.2f" if i >= 2 else ".2f") for i, v in enumerate(means)) + " |")
    return "\n".join(lines)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def recipe_epochs(folder: str | Path, runs: Runs, epochs: int | None = None) -> int | str:
    """The runs' schedule length from their ``config.json`` recipes, or a dash if unknown or mixed."""
    from .runstate import CONFIG

    found = set()
    for model, seeds in runs.items():
        for seed in seeds:
            config = Path(folder) / model / seed_dir_name(seed, epochs) / CONFIG
            found.add(json.loads(config.read_text())["recipe"].get("epochs") if config.exists() else None)
    return found.pop() if len(found) == 1 and None not in found else DASH


def seeds_label(counts: Iterable[int]) -> str:
    """What the figure's points are: one seed has no error bar, and unequal counts are said."""
    counts = sorted(set(counts))
    if counts == [1]:
        return "one seed (no error bar)"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"mean ± std over {n} seeds"


def table4_figure(runs: Runs, size: int) -> Any:
    """Means with std bars per model, the paper's values beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(runs, size)
    labels = [FIGURE5_MODELS.get(m, m) for m in summary]
    x = range(len(summary))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.errorbar([i - 0.1 for i in x], [s.mean for s in summary.values()],
                yerr=[s.std or 0 for s in summary.values()], fmt="o", capsize=4,
                label=f"ours ({size} px), {seeds_label(s.n for s in summary.values())}")
    for i, s in zip(x, summary.values()):
        ax.plot([i - 0.1] * s.n, list(s.errors.values()), ".", color="grey", alpha=0.6)
    paper = [(i, PAPER_TOP1_ERR[m]) for i, m in zip(x, summary) if m in PAPER_TOP1_ERR]
    ax.plot([i + 0.1 for i, _ in paper], [v for _, v in paper], "s", color="tab:red", label="paper, Table 4")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("val top-1 error (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, help="folder of MODEL/seedK/metrics.json (checkpoints/runs)")
    p.add_argument("--size", type=int, help="input size (default: chosen on the held-out training images)")
    p.add_argument("--base", default="resnet18", help="the model the differences are taken to")
    p.add_argument("--shipped-seed", type=int, default=0, help="the seed of the shipped checkpoints")
    p.add_argument("--schedule", type=int, metavar="EPOCHS",
                   help="also compare the runs of another schedule length, RUNS/MODEL/seedK-{EPOCHS}ep "
                        "(scripts/fair_runs.py --epochs EPOCHS), with the table's runs of the same seeds")
    p.add_argument("--by", metavar="COLUMN",
                   help="also break the table down by a column of the data's classes.tsv (e.g. source: "
                        "Imagenette vs Imagewoof; name: each class), from each run's val misses, and the "
                        "--schedule runs likewise; needs --data")
    p.add_argument("--data", help="the data the runs were evaluated on, for --by (its val split's order)")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    p.add_argument("--figure", type=Path, help="write the error-bar plot here (PNG/PDF/SVG)")
    p.add_argument("--checkpoints", type=Path, metavar="DIR",
                   help="also set the input size (the app's) of the checkpoints in DIR to the size chosen, and "
                        "copy their runs' val and held-out errors into the manifest (each checkpoint whose "
                        "run, its manifest entry's run_log, has a metrics.json)")


def main(args: argparse.Namespace) -> int:
    from ._fileio import save_figure
    from .data import image_groups

    if bool(args.by) != bool(args.data):
        raise UsageError("--by needs --data (the data the runs were evaluated on), and --data is only for --by")
    runs = read_runs(args.runs)
    if args.base not in runs:
        raise UsageError(f"no runs of --base {args.base} under {args.runs}; it has {list(runs)}")
    lines = []
    size = args.size
    if size is not None and not any(f"val_top1_err_{size}" in m for seeds in runs.values() for m in seeds.values()):
        raise UsageError(f"no run has a val error at {size} px (lgam evaluate --runs --sizes): pass one of "
                         + ", ".join(map(str, evaluated_sizes(runs))))
    if size is None:
        size, means = choose_size(runs)
        lines.append(f"Input size {size} px, chosen on the held-out training images (mean error over "
                     f"{sum(map(len, runs.values()))} runs: "
                     + ", ".join(f"{s} px {e:.2f}%" for s, e in sorted(means.items())) + ").\n")
    lines.append(format_table4(runs, size, args.base, args.shipped_seed))
    lines.append("\nEvery run (train loss: the mean over the last epoch's augmented batches; train minutes: "
                 "wall time of its finished epochs on the machine it ran on, pauses included (an epoch a "
                 "kill cut short, and trained again, counts once); CPU "
                 "minutes: the process's CPU time over all its threads, pauses excluded, logged since "
                 "2026-12-06):\n")
    lines.append(format_runs(runs, args.runs))
    groups = image_groups(args.data, "val", args.by) if args.by else None
    if groups is not None:
        lines.append(f"\nBy {args.by}, a column of the data's classes.tsv (val, {size} px):\n")
        lines.append(format_by_group(by_group(runs, size, groups), size, args.base))
    if args.schedule:
        longer = read_runs(args.runs, epochs=args.schedule)
        lines.append(f"\nSchedule test: {args.schedule} epochs against the table's runs of the same seeds "
                     f"(val, {size} px):\n")
        lines.append(format_schedule(runs, longer, size, (recipe_epochs(args.runs, runs), args.schedule),
                                     args.base))
        lines.append(f"\nEvery {args.schedule}-epoch run:\n")
        lines.append(format_runs(longer, args.runs, args.schedule))
        if groups is not None:
            lines.append(f"\nThe {args.schedule}-epoch runs by {args.by} (val, {size} px):\n")
            lines.append(format_by_group(by_group(longer, size, groups), size, args.base))
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    if args.figure:
        save_figure(table4_figure(runs, size), args.figure)
    if args.checkpoints:
        for line in ship_input_size(args.checkpoints, size):
            print(line)
    return 0


RUN_COUNTS = ("val_images", "holdout_images")  # in metrics.json: how many images its errors are on


def ship_input_size(checkpoints: Path, size: int) -> list[str]:
    """Set ``input_size`` of every checkpoint in ``checkpoints`` that came from a run with a
    ``metrics.json`` (its manifest entry's ``extra.run_log``, ``lgam evaluate --runs``) to
    ``size``, and merge that run's val and held-out errors (with how many images each is on) into
    its metrics; one line per model saying what was done, or why not (an older checkpoint from no
    evaluated run keeps its size)."""
    from .checkpoints import load_manifest, update_metrics

    lines = []
    for name, entry in load_manifest(checkpoints)["models"].items():
        run_log = (entry.get("extra") or {}).get("run_log")
        found = (checkpoints / run_log).parent / "metrics.json" if run_log else None
        if found is None or not found.exists():
            lines.append(f"{name}: unchanged (input size {entry['input_size']}): no evaluated run "
                         f"({run_log or 'no run_log'})")
            continue
        metrics = json.loads(found.read_text())
        if metrics.get("seed") != entry.get("seed"):
            lines.append(f"{name}: unchanged: {found} is seed {metrics.get('seed')}, the checkpoint seed "
                         f"{entry.get('seed')}")
            continue
        update_metrics(checkpoints, name, {k: v for k, v in metrics.items() if k in RUN_COUNTS
                                           or k.startswith(("val_top1_err_", "holdout_top1_err_"))}, size)
        lines.append(f"{name}: input size {size} px; errors from {found.parent.relative_to(checkpoints)}")
    return lines


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("lgam.table4"))
