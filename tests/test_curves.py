"""lgam curves: training curves of several models from their log.jsonl."""
import json

from PIL import Image

from lgam.cli import main
from lgam.curves import curves_figure, read_logs, read_seed_logs


def _runs(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, final in (("resnet18", 30.0), ("resnet18_se", 28.0)):
        (tmp_path / name).mkdir()
        records = [{"epoch": e, "loss": 2.0 / e, "val_top1_err": (final + 40 / e) if e % 2 == 0 else None,
                    "val_size": 160 if e % 2 == 0 else None} for e in range(1, 7)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_reads_logs_in_the_asked_order(tmp_path):
    runs = _runs(tmp_path)
    assert list(read_logs([runs])) == ["resnet18", "resnet18_se"]
    logs = read_logs([runs], ["resnet18_se", "resnet18"])
    assert list(logs) == ["resnet18_se", "resnet18"] and len(logs["resnet18"]) == 6
    fig = curves_figure({m: [records] for m, records in logs.items()})
    err_ax, loss_ax = fig.axes
    assert [len(line.get_xdata()) for line in err_ax.lines] == [3, 3]  # validated epochs only
    assert [len(line.get_xdata()) for line in loss_ax.lines] == [6, 6]
    assert "160 px" in err_ax.get_ylabel()


def test_epoch_axes_have_whole_epochs_only():
    import io

    run = [{"epoch": e, "loss": 3.0 / e, "val_top1_err": 60.0 - 2 * e if e % 4 == 0 else None, "val_size": 160}
           for e in range(1, 21)]
    fig = curves_figure({"resnet18": [run]})
    fig.savefig(io.BytesIO(), dpi=150)  # ticks are placed when drawn (the loss axis at 2.5, 5.0, ... by default)
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())


def test_figure_refuses_one_run_not_wrapped_in_a_list(tmp_path):
    import pytest

    logs = read_logs([_runs(tmp_path)])
    with pytest.raises(TypeError, match=r"not so for \['resnet18', 'resnet18_se'\].*wrap them in a list"):
        curves_figure(logs)


def test_cli_writes_a_png_and_explains_errors(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    runs = _runs(tmp_path / "runs")
    out = tmp_path / "fig" / "curves.png"
    assert main(["curves", str(runs), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 1000
    assert main(["curves", str(runs), "--models", "resnet18_lgam", "--out", str(out)]) == 2
    assert "no log.jsonl for ['resnet18_lgam']" in capsys.readouterr().err
    assert main(["curves", str(runs), "--out", str(tmp_path / "c.gif")]) == 2
    assert "must end in one of .png" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_end_labels_spread_apart_only_where_they_would_overlap():
    from lgam.curves import spread

    ys = spread([24.1, 30.0, 23.6, 24.0, 60.0], gap=2.0)
    assert ys[1] == 30.0 and ys[4] == 60.0  # far from the others: where they are
    close = sorted(ys[i] for i in (0, 2, 3))
    assert all(b - a >= 2.0 - 1e-9 for a, b in zip(close, close[1:]))
    assert abs(sum(close) / 3 - (24.1 + 23.6 + 24.0) / 3) < 1e-9  # centred on their mean
    assert ys[2] < ys[3] < ys[0]  # order kept
    assert spread([], 1.0) == []


def test_reads_one_seed_of_runs_kept_per_seed(tmp_path):
    """checkpoints/runs keeps MODEL/seedK/: --seed K picks those logs; without it the error says so."""
    import pytest

    from lgam.errors import UsageError

    flat = _runs(tmp_path / "flat")
    for model in ("resnet18", "resnet18_se"):
        for k in (0, 1):
            (tmp_path / "runs" / model / f"seed{k}").mkdir(parents=True)
            text = (flat / model / "log.jsonl").read_text()
            (tmp_path / "runs" / model / f"seed{k}" / "log.jsonl").write_text(text if k == 0 else text[:60] + "\n")
    logs = read_logs([tmp_path / "runs"], seed=0)
    assert list(logs) == ["resnet18", "resnet18_se"] and len(logs["resnet18"]) == 6
    with pytest.raises(UsageError, match="--seed K"):
        read_logs([tmp_path / "runs"])


def _seeded(tmp_path, seeds=(0, 1), models=("resnet18", "resnet18_se")):
    """``runs/MODEL/seedK/log.jsonl``; seed k's val errors and losses are seed 0's plus k."""
    flat = _runs(tmp_path / "flat")
    for model in models:
        base = [json.loads(line) for line in (flat / model / "log.jsonl").read_text().splitlines()]
        for k in seeds:
            records = [{**r, "loss": r["loss"] + k,
                        "val_top1_err": None if r["val_top1_err"] is None else r["val_top1_err"] + k}
                       for r in base]
            d = tmp_path / "runs" / model / f"seed{k}"
            d.mkdir(parents=True)
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "runs"


def test_several_seeds_draw_each_model_s_mean_and_each_seed(tmp_path, capsys):
    import pytest

    runs = _seeded(tmp_path)
    logs = read_seed_logs([runs], [0, 1])
    assert list(logs) == ["resnet18", "resnet18_se"] and [len(r) for r in logs.values()] == [2, 2]
    err_ax, loss_ax = curves_figure(logs).axes
    means = [line for line in err_ax.lines if line.get_label().endswith("(mean of 2 seeds)")]
    assert [m.get_label() for m in means] == ["resnet18 (mean of 2 seeds)", "resnet18_se (mean of 2 seeds)"]
    assert len(err_ax.lines) == 2 * 3 and len(loss_ax.lines) == 2 * 3  # a mean and two seeds each
    assert list(means[1].get_ydata()) == pytest.approx([28.0 + 40 / e + 0.5 for e in (2, 4, 6)])
    assert [t.get_text() for t in err_ax.texts] == ["37.2", "35.2"]  # the means at epoch 6: 30 (28) + 40/6 + 0.5
    out = tmp_path / "c.png"
    assert main(["curves", str(runs), "--seed", "0", "1", "--out", str(out)]) == 0
    assert "2 models, seeds 0 1" in capsys.readouterr().out and out.stat().st_size > 1000


def test_a_model_without_every_seed_is_named_not_averaged_over_fewer(tmp_path, capsys):
    import pytest

    from lgam.errors import UsageError

    runs = _seeded(tmp_path)
    (runs / "resnet18_se" / "seed1" / "log.jsonl").unlink()
    with pytest.raises(UsageError, match="resnet18_se seed 1: pass --models"):
        read_seed_logs([runs], [0, 1])
    assert list(read_seed_logs([runs], [0, 1], ["resnet18"])) == ["resnet18"]
    assert main(["curves", str(runs), "--seed", "0", "1", "--out", str(tmp_path / "c.png")]) == 2
    assert "resnet18_se seed 1" in capsys.readouterr().err


def test_the_seed_hint_only_where_there_are_seed_folders_and_no_silent_overwrite(tmp_path):
    """The --seed hint once showed for any empty folder (a generator is always true); a model
    logged in two folders kept the last one read; --seed 0 0 counted one run twice."""
    import pytest

    from lgam.errors import UsageError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        read_logs([tmp_path / "empty"])
    assert "--seed" not in str(e.value)
    a, b = _runs(tmp_path / "a"), _runs(tmp_path / "b")
    with pytest.raises(UsageError, match="more than one folder"):
        read_logs([a, b])
    with pytest.raises(UsageError, match="one seed twice"):
        read_seed_logs([_seeded(tmp_path / "s")], [0, 0])
