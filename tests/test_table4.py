"""lgam table4: seeds summarised, paired differences with t intervals, McNemar, size on held-out."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from lgam.cli import main
from lgam.errors import UsageError
from lgam.evaluate import pack_mask
from lgam.table4 import (choose_size, format_runs, format_schedule, mcnemar, paired_difference, read_runs,
                         seed_dir_name, seeds_label, summarise)

N_VAL = 40


def _write(root, model, seed, errors, holdout, wrong, epochs=None):
    d = root / model / seed_dir_name(seed, epochs)
    d.mkdir(parents=True)
    metrics = {"model": model, "seed": seed, "val_images": N_VAL, "holdout_images": 20}
    for size, e in errors.items():
        metrics[f"val_top1_err_{size}"] = e
        metrics[f"holdout_top1_err_{size}"] = holdout[size]
        metrics[f"val_misses_{size}"] = pack_mask(torch.tensor(wrong))
    (d / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def runs(tmp_path):
    plain_wrong = [i < 10 for i in range(N_VAL)]
    se_wrong = [i < 8 or i == 30 for i in range(N_VAL)]  # only SE wrong: 30; only plain wrong: 8, 9
    for seed, (p, s) in enumerate([(20.0, 19.0), (22.0, 20.5), (21.0, 21.5)]):
        _write(tmp_path, "resnet18", seed, {128: p + 2, 160: p}, {128: 30.0, 160: 25.0}, plain_wrong)
        _write(tmp_path, "resnet18_se", seed, {128: s + 2, 160: s}, {128: 31.0, 160: 26.0}, se_wrong)
    (tmp_path / "resnet18_se" / "notes").mkdir()  # not a seed folder: ignored
    return tmp_path


def test_summary_and_paired_differences(runs):
    r = read_runs(runs)
    assert list(r) == ["resnet18", "resnet18_se"] and sorted(r["resnet18"]) == [0, 1, 2]
    s = summarise(r, 160)
    assert s["resnet18"].mean == pytest.approx(21.0) and s["resnet18"].std == pytest.approx(1.0)
    diffs, mean, half = paired_difference(r, "resnet18_se", "resnet18", 160)
    assert diffs == pytest.approx([-1.0, -1.5, 0.5]) and mean == pytest.approx(-2 / 3)
    assert half == pytest.approx(4.303 * statistics.stdev(diffs) / math.sqrt(3))


def test_size_is_chosen_on_held_out_images_not_val(runs):
    size, means = choose_size(read_runs(runs), (128, 160))
    assert size == 160 and means[128] == pytest.approx(30.5)  # val would say the same here; held-out decides
    for d in runs.glob("*/seed*/metrics.json"):  # held-out prefers 128 even though val prefers 160
        m = json.loads(d.read_text())
        m["holdout_top1_err_128"] = 10.0
        d.write_text(json.dumps(m))
    assert choose_size(read_runs(runs), (128, 160))[0] == 128


def test_size_is_not_chosen_over_different_runs_per_size(runs):
    """A size only some runs were evaluated at was averaged over those runs alone (the better
    models' size could win); now that is refused with the counts."""
    def drop(model: str, seed: int, size: int) -> None:
        d = runs / model / f"seed{seed}" / "metrics.json"
        m = json.loads(d.read_text())
        del m[f"holdout_top1_err_{size}"]
        d.write_text(json.dumps(m))

    drop("resnet18", 0, 128)
    with pytest.raises(UsageError, match=r"without a held-out error at a candidate size \(128 px: 1 of 6\)"):
        choose_size(read_runs(runs), (128, 160))
    assert choose_size(read_runs(runs), (160,))[0] == 160
    drop("resnet18_se", 1, 160)  # as many runs at each size, not the same ones: a count check let it through
    with pytest.raises(UsageError, match=r"\(128 px: 1, 160 px: 1 of 6\)"):
        choose_size(read_runs(runs), (128, 160))


def test_mcnemar_needs_both_runs_on_the_same_images(runs):
    from lgam.table4 import format_table4

    row = lambda: [l for l in format_table4(read_runs(runs), 160).splitlines() if l.startswith("| SE ")][0]
    assert "1 / 2, p = " in row()  # only SE wrong: 1 image, only plain wrong: 2
    d = runs / "resnet18" / "seed0" / "metrics.json"
    m = json.loads(d.read_text())
    m["val_images"] = N_VAL - 8  # evaluated on a --limit: its mask covers other images
    d.write_text(json.dumps(m))
    assert "p = " not in row()


def test_mcnemar_exact():
    # 2 discordant one way, 8 the other: p = 2 * P(X <= 2 | n=10, 1/2) = 2 * 56/1024
    a = [True] * 2 + [False] * 8 + [True] * 5
    b = [False] * 2 + [True] * 8 + [True] * 5
    assert mcnemar(a, b) == (2, 8, pytest.approx(112 / 1024))
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    assert mcnemar([True] * 5, [False] * 5)[2] == pytest.approx(2 / 32)


def test_cli_table_and_figure(runs, tmp_path, capsys):
    out, fig = tmp_path / "t4.md", tmp_path / "t4.png"
    assert main(["table4", str(runs), "--out", str(out), "--figure", str(fig)]) == 0
    text = out.read_text()
    assert "chosen on the held-out training images" in text and "160 px" in text
    assert "| SE | 25.26 | 20.33 ± 1.26 | 3 | 19.00 / 20.50 / 21.50 | -0.67 [-3.25, +1.92] |" in text
    assert "| ResNet18 | 25.57 | 21.00 ± 1.00 | 3 |" in text
    assert "only it wrong" in text and "| 1 / 2, p = 1 |" in text  # SE alone: image 30; plain alone: 8, 9
    assert fig.stat().st_size > 1000


def test_the_figure_plots_each_model_s_mean_its_seeds_and_the_paper(runs):
    """The CLI's figure was checked only for its file size."""
    from lgam.table4 import PAPER_TOP1_ERR, table4_figure

    ax = table4_figure(read_runs(runs), 160).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    means = dict(zip(labels, ax.lines[0].get_ydata()))
    assert means["ResNet18"] == pytest.approx(21.00, abs=0.005) and means["SE"] == pytest.approx(20.33, abs=0.005)
    se = labels.index("SE") - 0.1  # each seed's point, left of the paper's
    seeds = [y for line in ax.lines if line.get_marker() == "." for x, y in zip(line.get_xdata(), line.get_ydata())
             if x == pytest.approx(se)]
    assert sorted(seeds) == pytest.approx([19.0, 20.5, 21.5])
    paper = ax.lines[-1]
    assert paper.get_label() == "paper, Table 4" and PAPER_TOP1_ERR["resnet18_se"] in list(paper.get_ydata())
    assert any("mean ± std over 3 seeds" in t.get_text() for t in ax.get_legend().get_texts())


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="metrics.json"):
        read_runs(tmp_path)


def test_the_size_chosen_on_held_out_becomes_the_shipped_input_size(runs, tmp_path, capsys):
    """``--checkpoints``: checkpoints from an evaluated run (their manifest's run_log) get the size
    chosen on held-out images and their run's errors; an older checkpoint from no such run, or a
    checkpoint of another seed, keeps its own."""
    import lgam
    from lgam.checkpoints import load_manifest, save_checkpoint

    ckpt = runs / "ckpt"
    classes = [f"c{i}" for i in range(3)]
    for name, run_log, seed in [("resnet18", "../resnet18/seed0/log.jsonl", 0),
                                ("resnet18_se", "../resnet18_se/seed0/log.jsonl", 1),
                                ("resnet18_bam", "runs/resnet18_bam/log.jsonl", 0)]:
        save_checkpoint(lgam.create_model(name, num_classes=3), ckpt, classes=classes, input_size=224, seed=seed,
                        extra={"run_log": run_log})
    assert main(["table4", str(runs), "--checkpoints", str(ckpt)]) == 0
    models = load_manifest(ckpt)["models"]
    assert models["resnet18"]["input_size"] == 160  # held-out: 25 % at 160 px, 30 % at 128 px
    assert models["resnet18"]["metrics"]["val_top1_err_160"] == 20.0
    assert models["resnet18"]["metrics"]["holdout_top1_err_128"] == 30.0
    assert models["resnet18"]["metrics"]["val_images"] == N_VAL  # what the errors are on
    assert models["resnet18"]["metrics"]["holdout_images"] == 20
    assert models["resnet18_se"]["input_size"] == 224 and "seed 0" in capsys.readouterr().out  # seed 1's checkpoint
    assert models["resnet18_bam"]["input_size"] == 224 and not models["resnet18_bam"]["metrics"]


def test_figure_label_says_how_many_seeds_its_points_are():
    assert seeds_label([3, 3]) == "mean ± std over 3 seeds"
    assert seeds_label([1, 1]) == "one seed (no error bar)"  # a point without a bar is not a mean ± std
    assert seeds_label([1, 3, 2]) == "mean ± std over 1-3 seeds"


def test_every_run_is_listed_with_its_minutes_and_commit(runs):
    d = runs / "resnet18" / "seed1"
    (d / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.5 - e / 4, "time": 90.0, "cpu_time": 150.0,
                                                     "train_img_per_s": 9.0}) + "\n" for e in (1, 2)))
    (d / "config.json").write_text(json.dumps({"git_commit": "0123456789abcdef"}))
    lines = format_runs(read_runs(runs), runs).splitlines()
    assert lines[0] == ("| model | seed | val 128 / 160 px (%) | held-out 128 / 160 px (%) | train loss, last epoch "
                        "| train min (log) | CPU min (log) | commit |")
    assert "| resnet18 | 1 | 24.00 / 22.00 | 30.00 / 25.00 | 1.000 | 3 | 5 | 0123456 |" in lines  # 2 x 90 s, 2 x 150 s
    assert "| resnet18_se | 2 | 23.50 / 21.50 | 31.00 / 26.00 | — | — | — | — |" in lines  # no log, no config
    assert len(lines) == 2 + 6
    # a run resumed over sessions names each session's commit, in order
    (d / "config.json").write_text(json.dumps({"git_commit": "fedcba9876", "earlier_sessions": [
        {"git_commit": "0123456789abcdef", "resumed_from_epoch": 0}]}))
    assert "| resnet18 | 1 | 24.00 / 22.00 | 30.00 / 25.00 | 1.000 | 3 | 5 | 0123456 → fedcba9 |" in format_runs(
        read_runs(runs), runs).splitlines()


def _forty_epochs(runs):
    """Plain and SE on the 40-epoch schedule, seeds 0 and 1, beside the fixture's 20-epoch runs."""
    wrong = [False] * N_VAL
    for seed, (p, s) in enumerate([(19.0, 18.0), (21.5, 20.0)]):
        _write(runs, "resnet18", seed, {128: p + 1, 160: p}, {128: 30.0, 160: 25.0}, wrong, epochs=40)
        _write(runs, "resnet18_se", seed, {128: s + 1, 160: s}, {128: 31.0, 160: 26.0}, wrong, epochs=40)
    return runs


def test_schedule_runs_are_kept_apart_and_compared_seed_by_seed(runs):
    _forty_epochs(runs)
    assert {m: sorted(s) for m, s in read_runs(runs).items()} == {"resnet18": [0, 1, 2], "resnet18_se": [0, 1, 2]}
    assert summarise(read_runs(runs), 160)["resnet18"].mean == pytest.approx(21.0)  # the 40-epoch runs stay out
    longer = read_runs(runs, epochs=40)
    assert {m: sorted(s) for m, s in longer.items()} == {"resnet18": [0, 1], "resnet18_se": [0, 1]}
    lines = format_schedule(read_runs(runs), longer, 160, (20, 40)).splitlines()
    assert lines[0] == ("| model | seed | 20 epochs (%) | 40 epochs (%) | change (pt) | vs resnet18, 20 epochs (pt) "
                        "| vs resnet18, 40 epochs (pt) |")
    assert lines[2:] == [
        "| resnet18 | 0 | 20.00 | 19.00 | -1.00 | — | — |",
        "| resnet18 | 1 | 22.00 | 21.50 | -0.50 | — | — |",
        "| resnet18 | mean | 21.00 | 20.25 | -0.75 | — | — |",
        "| resnet18_se | 0 | 19.00 | 18.00 | -1.00 | -1.00 | -1.00 |",
        "| resnet18_se | 1 | 20.50 | 20.00 | -0.50 | -1.50 | -1.50 |",
        "| resnet18_se | mean | 19.75 | 19.00 | -0.75 | -1.25 | -1.25 |",
    ]
    with pytest.raises(UsageError, match=r"MODEL/seedK-80ep/metrics.json"):
        read_runs(runs, epochs=80)


def test_cli_schedule_section_names_both_lengths_from_the_recipes(runs, capsys):
    _forty_epochs(runs)
    for d in runs.glob("*/seed*/"):
        (d / "config.json").write_text(json.dumps({"recipe": {"epochs": 40 if d.name.endswith("-40ep") else 20},
                                                   "git_commit": "abcdef0123"}))
    assert main(["table4", str(runs), "--size", "160", "--schedule", "40"]) == 0
    out = capsys.readouterr().out
    assert "Schedule test: 40 epochs against the table's runs of the same seeds (val, 160 px)" in out
    assert "| model | seed | 20 epochs (%) | 40 epochs (%) |" in out
    assert "| resnet18_se | mean | 19.75 | 19.00 | -0.75 | -1.25 | -1.25 |" in out
    every = out.split("Every 40-epoch run:")[1]
    assert "| resnet18_se | 1 | 21.00 / 20.00 | 31.00 / 26.00 | — | — | — | abcdef0 |" in every
    # no 80-epoch runs: a usage error naming what is missing
    assert main(["table4", str(runs), "--size", "160", "--schedule", "80"]) != 0
    assert "seedK-80ep" in capsys.readouterr().err


def test_t_quantile_past_the_table():
    """Past 10 degrees of freedom the interval once used the normal's 1.96: at 12 seeds (t = 2.201)
    11 % too narrow."""
    from lgam.table4 import t975

    assert t975(11) == pytest.approx(2.201) and t975(30) == pytest.approx(2.042)
    for df, t in [(31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)]:  # scipy's t.ppf(0.975)
        assert t975(df) == pytest.approx(t, abs=2e-4)


def test_a_model_without_a_seed_in_common_with_the_base_gets_dashes(runs, tmp_path):
    _write(runs, "resnet18_lgam", 7, {128: 25.0, 160: 23.0}, {128: 30.0, 160: 25.0}, [False] * N_VAL)
    from lgam.table4 import format_table4

    row = [l for l in format_table4(read_runs(runs), 160).splitlines() if l.startswith("| LGAM ")][0]
    assert row.endswith("| 23.00 | — | — |")


@pytest.mark.parametrize("extra, message", [(["--base", "resnet18x"], "no runs of --base resnet18x"),
                                            (["--size", "999"], "no run has a val error at 999 px")])
def test_cli_refuses_a_base_or_size_the_runs_lack(runs, capsys, extra, message):
    assert main(["table4", str(runs), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.fixture()
def val_data(tmp_path):
    """A val folder of N_VAL images in two classes of two sources, never decoded by --by."""
    root = tmp_path / "data"
    for w in ("n001", "n002"):
        (root / "val" / w).mkdir(parents=True)
        for i in range(N_VAL // 2):
            (root / "val" / w / f"{i:02d}.png").write_bytes(b"not decoded")
    (root / "classes.tsv").write_text("index\twnid\tname\tsource\n0\tn001\ttench\tnette\n1\tn002\tbeagle\twoof\n")
    return root


def test_errors_within_each_group_of_val_images(runs):
    from lgam.table4 import by_group

    groups = ["a"] * 20 + ["b"] * 20
    grouped = by_group(read_runs(runs), 160, groups)
    assert list(grouped) == ["a", "b"]
    # plain misses images 0-9 (all in a), SE 0-7 and 30 (one in b), on every seed
    assert grouped["a"]["resnet18"][1] == {"val_top1_err_160": 50.0, "val_images": 20}
    assert grouped["a"]["resnet18_se"][2]["val_top1_err_160"] == 40.0
    assert grouped["b"]["resnet18"][0]["val_top1_err_160"] == 0.0
    assert grouped["b"]["resnet18_se"][0]["val_top1_err_160"] == 5.0
    assert paired_difference(grouped["b"], "resnet18_se", "resnet18", 160)[1] == pytest.approx(5.0)
    interleaved = by_group(read_runs(runs), 160, ["even", "odd"] * 20)  # as Imagenette/Imagewoof classes are
    assert interleaved["odd"]["resnet18"][0]["val_top1_err_160"] == 25.0  # 1, 3, 5, 7, 9 of 20
    assert interleaved["odd"]["resnet18_se"][0]["val_top1_err_160"] == 20.0  # 1, 3, 5, 7
    assert interleaved["even"]["resnet18_se"][0]["val_top1_err_160"] == 25.0  # 0, 2, 4, 6, 30
    with pytest.raises(UsageError, match="evaluated on 40 val images, the data given has 39"):
        by_group(read_runs(runs), 160, groups[:-1])
    with pytest.raises(UsageError, match="has no val_misses_192"):
        by_group(read_runs(runs), 192, groups)


def test_the_gap_difference_between_two_groups_is_paired_by_seed(runs):
    """"Trails plain by more in group b" is a claim about (gap in b) - (gap in a), seed by seed:
    the two groups' intervals side by side do not test it."""
    from lgam.table4 import by_group, gap_difference

    grouped = by_group(read_runs(runs), 160, ["a"] * 20 + ["b"] * 20)
    diffs, mean, half = gap_difference(grouped, "resnet18_se", "resnet18", 160)
    assert diffs == [15.0, 15.0, 15.0] and half == 0.0  # b: 5 - 0, a: 40 - 50
    grouped["b"]["resnet18_se"][1]["val_top1_err_160"] = 8.0
    diffs, mean, half = gap_difference(grouped, "resnet18_se", "resnet18", 160)
    assert diffs == [15.0, 18.0, 15.0] and mean == pytest.approx(16.0)
    assert half == pytest.approx(4.303 * statistics.stdev(diffs) / math.sqrt(3))
    del grouped["a"]["resnet18_se"][1]  # a seed missing in one group is left out
    assert gap_difference(grouped, "resnet18_se", "resnet18", 160)[0] == [15.0, 15.0]
    from lgam.table4 import format_by_group

    for g in grouped.values():  # no seed in common: a dash row, as the Δ column has, not an error
        g["resnet18_se"] = {7: g["resnet18_se"][0]}
    assert "| SE | — | — |" in format_by_group(grouped, 160)


def test_cli_breaks_the_table_down_by_a_classes_tsv_column(runs, val_data, capsys):
    assert main(["table4", str(runs), "--by", "source", "--data", str(val_data)]) == 0
    out = capsys.readouterr().out
    assert "By source, a column of the data's classes.tsv (val, 160 px)" in out
    assert "| nette | 20 | ResNet18 | 50.00 ± 0.00 | 50.00 / 50.00 / 50.00 | — |" in out
    assert "| woof | 20 | SE | 5.00 ± 0.00 | 5.00 / 5.00 / 5.00 | +5.00 [+5.00, +5.00] |" in out
    assert "| SE | +15.00 [+15.00, +15.00] | +15.00 / +15.00 / +15.00 |" in out  # two groups: their gaps compared
    assert main(["table4", str(runs), "--by", "name", "--data", str(val_data)]) == 0
    assert "| beagle | 20 | ResNet18 | 0.00 ± 0.00 |" in capsys.readouterr().out
    assert main(["table4", str(runs), "--by", "source"]) == 2
    assert "--by needs --data" in capsys.readouterr().err
    assert main(["table4", str(runs), "--data", str(val_data)]) == 2
    assert "--data is only for --by" in capsys.readouterr().err
    assert main(["table4", str(runs), "--by", "breed", "--data", str(val_data)]) == 2
    assert "no column 'breed'" in capsys.readouterr().err


def test_cli_breaks_the_schedule_runs_down_by_the_column_too(runs, val_data, capsys):
    """Whether a gap in one group is the short schedule's: the longer runs, split as the table's."""
    for seed in (0, 1):  # 40 epochs: plain misses 4 woof images, SE 2 nette ones
        _write(runs, "resnet18", seed, {160: 10.0}, {160: 12.0}, [20 <= i < 24 for i in range(N_VAL)], epochs=40)
        _write(runs, "resnet18_se", seed, {160: 5.0}, {160: 6.0}, [i < 2 for i in range(N_VAL)], epochs=40)
    args = ["table4", str(runs), "--size", "160", "--by", "source", "--data", str(val_data)]
    assert main([*args, "--schedule", "40"]) == 0
    out = capsys.readouterr().out
    table_by, longer_by = out.split("By source, a column")[1].split("The 40-epoch runs by source (val, 160 px):")
    assert "| woof | 20 | ResNet18 | 0.00 ± 0.00 | 0.00 / 0.00 / 0.00 | — |" in table_by  # the 20-epoch runs
    assert "| woof | 20 | ResNet18 | 20.00 ± 0.00 | 20.00 / 20.00 | — |" in longer_by
    assert "| nette | 20 | SE | 10.00 ± 0.00 | 10.00 / 10.00 | +10.00 [+10.00, +10.00] |" in longer_by
    assert "| woof | 20 | SE | 0.00 ± 0.00 | 0.00 / 0.00 | -20.00 [-20.00, -20.00] |" in longer_by
    assert "| SE | -30.00 [-30.00, -30.00] | -30.00 / -30.00 |" in longer_by  # woof's gap - nette's
    assert main(args) == 0  # no --schedule: no such section
    assert "-epoch runs by" not in capsys.readouterr().out


def test_a_group_name_cannot_break_the_markdown_table(runs):
    from lgam.table4 import by_group, format_by_group

    text = format_by_group(by_group(read_runs(runs), 160, ["a|b"] * 20 + [""] * 20), 160)
    rows = [line for line in text.splitlines() if line.startswith("| a\\|b | 20 |") or line.startswith("| — | 20 |")]
    assert len(rows) == 4 and all(line.count(" | ") == 5 for line in rows)
