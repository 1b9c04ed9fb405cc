"""``scripts/fair_runs.py``: which runs it starts, in which order, where their records go, and the
stretched recipe of the schedule test."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from lgam.recipes import make_recipe, train_size_at

REPO = Path(__file__).resolve().parents[1]


def _script(root: Path, monkeypatch) -> ModuleType:
    """The script as a module, its records under ``root``."""
    spec = importlib.util.spec_from_file_location("fair_runs", REPO / "scripts" / "fair_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", root)
    return module


@pytest.fixture()
def fair(tmp_path, monkeypatch):
    """The script as a module, its records under ``tmp_path`` and its runs recorded, not trained."""
    module = _script(tmp_path, monkeypatch)
    module.started = []
    monkeypatch.setattr(module, "one", lambda model, seed, data, runs, epochs, extra:
                        module.started.append((model, seed, runs.name, epochs)))
    return module


def _finished(fair, model: str, seed: int, epochs: int | None = None) -> None:
    d = fair.record_dir(model, seed, epochs)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text("{}")


def test_runs_every_seed_of_every_model_once_seed_by_seed(fair):
    _finished(fair, "resnet18", 0)
    assert fair.main(["--data", "d", "--models", "resnet18", "resnet18_lgam", "--seeds", "0", "1"]) == 0
    assert fair.started == [("resnet18_lgam", 0, "fair", None), ("resnet18", 1, "fair", None),
                            ("resnet18_lgam", 1, "fair", None)]
    fair.started.clear()
    assert fair.main(["--data", "d", "--seeds", "1", "2", "--max-runs", "2"]) == 0
    assert fair.started == [("resnet18", 1, "fair", None), ("resnet18_lgam", 1, "fair", None)]


def test_schedule_runs_have_their_own_records_and_run_states(fair):
    _finished(fair, "resnet18", 0)  # a 20-epoch run: not the 40-epoch one
    _finished(fair, "resnet18_lgam", 0, 40)
    assert fair.main(["--data", "d", "--epochs", "40", "--models", "resnet18", "resnet18_lgam",
                      "--seeds", "0"]) == 0
    assert fair.started == [("resnet18", 0, "fair-40ep", 40)]
    assert fair.record_dir("resnet18", 1, 40).name == "seed1-40ep"
    assert fair.record_dir("resnet18", 1).name == "seed1"


def test_schedule_test_stretches_the_whole_recipe(fair):
    """Twice the epochs: every train size for twice as many epochs, in the same order."""
    assert fair.schedule_args(None) == []
    args = fair.schedule_args(40)
    assert args[:2] == ["--epochs", "40"] and args[2] == "--set"
    short = make_recipe(fair.RECIPE)
    long = make_recipe(fair.RECIPE, [args[3]], epochs=40)
    sizes = [train_size_at(short, e) for e in range(short.epochs)]
    assert sorted(set(sizes)) == [96, 112, 128]
    assert [train_size_at(long, e) for e in range(40)] == [s for s in sizes for _ in range(2)]


def test_a_copy_cut_short_does_not_mark_the_run_done(tmp_path, monkeypatch):
    """metrics.json's presence marks a run done; copied in place, a kill mid-copy left a partial
    one, and the run counted as finished ever after."""
    fair = _script(tmp_path, monkeypatch)

    def train_and_evaluate(cmd: list[str]) -> None:  # what lgam train and lgam evaluate leave
        run = Path(cmd[cmd.index("--out") + 1]) / "resnet18" if "--out" in cmd else None
        if run is not None:
            run.mkdir(parents=True)
            for name in ("config.json", "log.jsonl", "metrics.json"):
                (run / name).write_text("{}")

    def torn(src, dst, copy=shutil.copyfile):
        if Path(src).name == "metrics.json":
            Path(dst).write_text("{")
            raise KeyboardInterrupt  # the kill
        return copy(src, dst)

    monkeypatch.setattr(fair, "run", train_and_evaluate)
    monkeypatch.setattr(fair.shutil, "copyfile", torn)
    with pytest.raises(KeyboardInterrupt):
        fair.one("resnet18", 1, "data", tmp_path / "runs", None, [])
    record = fair.record_dir("resnet18", 1)
    assert (record / "log.jsonl").exists() and not (record / "metrics.json").exists()
    assert not list(record.glob(".*.tmp"))
