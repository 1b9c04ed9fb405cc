"""The ``lgam`` command (lgam.cli): plain-text help with defaults, and its exit statuses."""
from __future__ import annotations

import argparse
import re

import pytest

from _helpers import REPO

from lgam.cli import COMMANDS, HelpFormatter, main, plain_text

#: reStructuredText markup that must not reach a terminal
REST = re.compile(r"``|:(?:class|func|mod|meth|data|attr|obj):`")


def _flat(text: str) -> str:
    """``text`` with every run of whitespace as one space (argparse wraps to the terminal)."""
    return " ".join(text.split())


def test_plain_text_strips_rest_markup():
    doc = """``lgam params``: counted with :class:`torch.utils.flop_counter.FlopCounterMode` and
    :func:`~lgam.data.preprocess` (``MACs = FLOPs / 2``); **not** the *same* as a*b or 2 * 3.

        lgam params --models resnet18
    """
    assert plain_text(doc) == (
        "lgam params: counted with torch.utils.flop_counter.FlopCounterMode and\n"
        "preprocess (MACs = FLOPs / 2); not the same as a*b or 2 * 3.\n\n"
        "    lgam params --models resnet18")
    assert plain_text(None) == "" and plain_text("") == ""


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: lgam")
    assert all(name in err for name in COMMANDS) and not REST.search(err)


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "The lgam console command: lgam COMMAND [options]." in out
    assert not REST.search(out)


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["nope"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_is_plain_text_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lgam {command}")
    assert not REST.search(out), out
    flat = _flat(out)
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert not re.search(r"\(default: ([^)]*)\) \(default: \1\)", flat)  # never said twice


def test_figure5_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["figure5", "--help"])
    flat = _flat(capsys.readouterr().out)
    for shown in ("CAM method (default: gradcam)", "heatmap opacity in [0, 1] (default: 0.5)"):
        assert shown in flat


def test_help_formatter():
    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter,
                                description=plain_text("Uses ``x``;\nsee below.\n\n    x --size 1\n    x -h"))
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--size", type=int, default=224, help="input size")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 160], help="sizes")
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--recipe", default="fast", help="preset (default: fast)")
    p.add_argument("--out", help="output file")
    p.add_argument("--models", nargs="+", default=[], help="models")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--share", default="5%", help="a share")
    p.add_argument("--see", default="a", help="see :func:`~lgam.cli.main`")
    text = p.format_help()
    assert "Uses x;\nsee below.\n\n    x --size 1\n    x -h\n" in text  # lines kept as written
    flat = _flat(text)
    for shown in ("input size (default: 224)", "sizes (default: 224 160)", "--dpi DPI (default: 150)",
                  "preset (default: fast) ", "output file ", "a switch ", "a share (default: 5%)",
                  "see main (default: a)"):
        assert shown in flat + " ", shown
    assert flat.count("(default:") == 6 and "image files (default" not in flat


@pytest.mark.parametrize("argv, message", [
    (["params", "--models", "resnet19"], "unknown model 'resnet19'"),
    (["figure5", "x.png", "--checkpoints", "/nonexistent-lgam", "--out", "f.png"], "no manifest.json"),
    # an output path that is a folder: IsADirectoryError's traceback
    (["figure5", "x.png", "--checkpoints", str(REPO / "checkpoints"), "--out", "a_folder.png"],
     "Is a directory"),
    (["evaluate", "--data", "nowhere", "--device", "gpu0", "--checkpoints", str(REPO / "checkpoints")],
     "unknown device 'gpu0'"),
    (["train", "--data", "nowhere", "--model", "resnet18", "--out", "o", "--val-size", "0"],
     "--val-size must be a positive"),
])
def test_mistakes_are_one_error_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    """Each of these once ended in a traceback or exit 1."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "a_folder.png").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["evaluate", "--data", "d", "--batch-size", "0"], ["evaluate", "--data", "d", "--batch-size", "-1"],
    ["evaluate", "--data", "d", "--sizes", "224", "0"], ["evaluate", "--data", "d", "--latency-reps", "0"],
    ["figure5", "x.png", "--out", "f.png", "--dpi", "0"], ["gates", "--data", "d", "--limit", "0"],
    ["gates", "--data", "d", "--batch-size", "two"],
])
def test_counts_and_sizes_below_one_are_usage_errors(argv, capsys):
    """--batch-size 0 ended in range()'s ValueError, -1 in torch.cat's, --sizes 0 in
    interpolate's, --dpi 0 in matplotlib's: argparse now says which option, before any work."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert re.search(r"argument --[a-z-]+: (must be at least 1, got -?\d+|'two' is not an integer)", err), err


def test_an_out_file_gets_its_folder(tmp_path, capsys):
    """evaluate's, gates' and table4's --out raised FileNotFoundError for a new folder (evaluate's
    after it had updated the manifest); the figure commands already made theirs."""
    out = tmp_path / "new folder" / "sub" / "table4.md"
    assert main(["table4", str(REPO / "checkpoints" / "runs"), "--out", str(out)]) == 0
    assert out.read_text().startswith("Input size") and not list(out.parent.glob(".*.tmp"))
