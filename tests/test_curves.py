"""lgam curves: training curves of several models from their log.jsonl."""
import json

from PIL import Image

from lgam.cli import main
from lgam.curves import curves_figure, read_logs


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
    fig = curves_figure(logs)
    err_ax, loss_ax = fig.axes
    assert [len(line.get_xdata()) for line in err_ax.lines] == [3, 3]  # validated epochs only
    assert [len(line.get_xdata()) for line in loss_ax.lines] == [6, 6]
    assert "160 px" in err_ax.get_ylabel()


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
