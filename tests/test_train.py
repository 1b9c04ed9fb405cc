"""``lgam train``: recipes, overfitting a tiny set, exact resume, the settings a resume must keep,
DDP on 2 gloo processes."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _helpers import REPO
from lgam.checkpoints import load_checkpoint, load_manifest
from lgam.cli import run_module
from lgam.params import count_params
import lgam.data
import lgam.errors
import lgam.train
from lgam.recipes import RECIPES, TrainError, lr_at, make_recipe, param_groups, train_size_at
from lgam.runstate import LOCK

CLASSES = ("red", "green", "blue")
# tiny and quick: CIFAR stem, 16 px, global batch 8, learning-rate warm-up over the first epoch;
# float32 (bit-exact comparisons), so the bf16 fast path is tested on its own below
TINY = ["--stem", "cifar", "--val-size", "16", "--no-progress", "--device", "cpu",
        "--recipe", "fast", "--set", "batch_size=8", "--set", "lr=0.02", "--set", "warmup_epochs=1",
        "--set", "train_size=16", "--set", "crop_scale_min=0.5", "--set", "label_smoothing=0",
        "--set", "bf16=false", "--set", "channels_last=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU two threads contend and run slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """ImageFolder of 24 16x16 PNGs (3 colour classes with noise); val/ holds the same images."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for split in ("train", "val"):
            (root / split / name).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
            img[..., c] += 150
            for split in ("train", "val"):
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def _train(data: Path, out: Path, *extra: str) -> int:
    return run_module("lgam.train", ["--data", str(data), "--out", str(out), *TINY, *extra])


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "state.safetensors"))


def test_recipe_overrides_and_errors():
    r = make_recipe("paper", ["lr=0.3", "nesterov=true", "batch-size=32"], epochs=5)
    assert (r.lr, r.nesterov, r.batch_size, r.epochs) == (0.3, True, 32, 5)
    assert r.weight_decay == RECIPES["paper"].weight_decay
    with pytest.raises(ValueError, match="KEY one of epochs, batch_size"):
        make_recipe("fast", ["learning_rate=1"])
    with pytest.raises(ValueError, match="true/false"):
        make_recipe("fast", ["bf16=maybe"])
    with pytest.raises(ValueError, match="schedule must be"):
        make_recipe("fast", ["schedule=linear"])
    with pytest.raises(ValueError, match="unknown recipe"):
        make_recipe("slow")


def test_cpu_recipe_validates_and_grows_the_crops():
    cpu = make_recipe("cpu")
    sizes = [train_size_at(cpu, e) for e in range(cpu.epochs)]
    assert sizes[0] == cpu.train_size_start == 96 and sizes[-1] == cpu.train_size == 128
    assert sizes == sorted(sizes) and all(s % 16 == 0 for s in sizes)
    assert sizes[-cpu.size_hold_epochs - 1:] == [128] * (cpu.size_hold_epochs + 1)
    assert cpu.bf16 and cpu.channels_last and not cpu.bn_bias_decay
    assert {train_size_at(RECIPES["fast"], e) for e in range(16)} == {160}  # no ramp: fixed size
    with pytest.raises(ValueError, match="train_size_start"):
        make_recipe("cpu", ["train_size_start=-1"])


def test_no_weight_decay_on_batchnorm_and_biases():
    model = lgam.create_model("resnet18_lgam", num_classes=3)
    decayed, free = param_groups(model, make_recipe("cpu"))
    assert decayed["weight_decay"] == RECIPES["cpu"].weight_decay and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    (one,) = param_groups(model, RECIPES["paper"])
    assert len(one["params"]) == len(list(model.parameters()))


def test_no_weight_decay_on_sge_affine_and_skip_gains():
    """SGE's gamma/beta follow BN (its official code treats them alike); SkipInit's gains are
    0-dimensional: neither decays where BN does not."""
    model = lgam.create_model("resnet18_sge", num_classes=3, skip_init=True)
    decayed, free, gains = param_groups(
        model, make_recipe("cpu", ["branch_rms=0", "skip_init=true", "skip_gain_lr=0.1"]))
    free_ids = {id(p) for p in free["params"]}
    sge = model.layer3[0].attention
    assert id(sge.weight) in free_ids and id(sge.bias) in free_ids and sge.weight.ndim == 4
    assert gains["params"] == [b.skip_gain for b in model.modules() if getattr(b, "skip_gain", None) is not None]
    assert gains["weight_decay"] == 0.0 and gains["lr_scale"] == 0.1 and len(gains["params"]) == 8
    assert all(p.ndim > 1 for p in decayed["params"]) and id(model.layer3[0].conv1.weight) not in free_ids
    assert sum(len(g["params"]) for g in (decayed, free, gains)) == len(list(model.parameters()))


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_cpu_fast_path(tiny_data, tmp_path, monkeypatch, capsys, native):
    """With native bf16 the CPU trains under bf16 autocast + channels_last (the loss falls);
    without it the same recipe trains in float32 and says so once. The native case runs on every
    CPU: bf16_native is stubbed, and oneDNN emulates bf16 where the CPU lacks it (slower, same
    numbers), so a CPU without AVX512-BF16 tests the bf16 training path too."""
    seen: list[tuple[bool, bool]] = []

    def spy(name: str, **kwargs):
        model = lgam.create_model(name, **kwargs)
        model.register_forward_hook(lambda m, args, out: seen.append(
            (torch.is_autocast_enabled("cpu"), args[0].is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(lgam.train, "create_model", spy)
    monkeypatch.setattr(lgam.train, "bf16_native", lambda device: native)
    out = tmp_path / "run"
    assert _train(tiny_data, out, "--model", "resnet18", "--epochs", "8", "--val-every", "0",
                  "--set", "bf16=true", "--set", "channels_last=true") == 0
    assert seen and set(seen) == {(native, native)}
    config = json.loads((out / "resnet18" / "config.json").read_text())
    assert config["bf16_autocast"] is native and config["channels_last"] is native
    assert config["lgam_fused_kernels"].startswith("auto")  # the default (conftest), recorded
    from lgam.checkpoints import git_revision

    assert {k: config[k] for k in ("git_commit", "git_dirty")} == git_revision()  # the code that ran
    if (Path(lgam.__file__).resolve().parents[1] / ".git").exists():
        assert len(config["git_commit"]) == 40 and isinstance(config["git_dirty"], bool)
    log = _log(out / "resnet18")
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert all(0 < r["cpu_time"] for r in log)  # CPU seconds beside the wall time
    notes = capsys.readouterr().err.count("training in float32")
    assert notes == (0 if native else 1)


def test_summary_minutes_wall_and_cpu():
    """Wall minutes count pauses, CPU minutes do not; a log from before ``cpu_time`` has none."""
    from lgam.train import summary_metrics

    records = [{"epoch": 1, "train_img_per_s": 50.0, "time": 600.0, "cpu_time": 240.0,
                "val_top1_err": None},  # stopped for 8 minutes: 10 wall, 4 CPU minutes
               {"epoch": 2, "train_img_per_s": 100.0, "time": 120.0, "cpu_time": 240.0,
                "val_top1_err": 30.0, "val_size": 160}]
    m = summary_metrics(records)
    assert m == {"train_img_per_s": 100.0, "train_wall_min": 12.0, "train_cpu_min": 8.0,
                 "val_top1_err_160": 30.0}
    del records[0]["cpu_time"]
    assert "train_cpu_min" not in summary_metrics(records)


def test_summary_speed_is_images_over_time_not_the_mean_of_rates():
    """Every epoch trains as many images: 100 and 50 img/s are 66.7 img/s over both (the mean of
    the rates, 75, overstated the speed of a run whose epochs grow)."""
    from lgam.train import summary_metrics

    records = [{"epoch": e, "train_img_per_s": r, "time": 1.0, "val_top1_err": None}
               for e, r in enumerate((10.0, 100.0, 50.0), 1)]
    assert summary_metrics(records)["train_img_per_s"] == pytest.approx(200 / 3)


def test_training_shares():
    from lgam.train import training_shares

    assert training_shares([3.0], 5.0) == [1.0]
    assert training_shares([1.0, 3.0], 6.0) == pytest.approx([2 / 6, 4 / 6])  # 2 s shared, 1 s each
    assert training_shares([0.0, 0.0], 0.0) == [0.5, 0.5]


def test_side_by_side_models_time_only_their_own_work(tiny_data, tmp_path, monkeypatch):
    """Each model's epoch time counted every model's training and the earlier models' validation
    and state saving: train min of a side-by-side run was the whole run's for every model."""
    top1, calls = lgam.train._top1_err, []

    def slow_for_the_first(run, model):  # the first model's validation takes 2 s longer
        calls.append(model)
        if len(calls) == 1:
            time.sleep(2.0)
        return top1(run, model)

    monkeypatch.setattr(lgam.train, "_top1_err", slow_for_the_first)
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--model", "resnet18", "resnet18_se", "--epochs", "1",
                  "--val-every", "1") == 0
    a, b = _log(run / "resnet18")[0]["time"], _log(run / "resnet18_se")[0]["time"]
    assert a > 2.0 and b < a - 1.5


def test_lr_schedules():
    paper = RECIPES["paper"]
    assert [lr_at(paper, e * 10, 10) for e in (0, 29, 30, 60, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001])
    fast = make_recipe("fast", ["warmup_epochs=2", "lr=0.4"], epochs=10)
    lrs = [lr_at(fast, s, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.02) and lrs[19] == pytest.approx(0.4) and lrs[20] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:])) and lrs[-1] < 1e-3


@pytest.mark.slow
def test_overfit_two_models_and_checkpoint(tiny_data, tmp_path):
    """Two models over the same batches: loss falls, the (training) images end up all correct."""
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    assert _train(tiny_data, out, "--model", "resnet18", "resnet18_se", "--epochs", "8",
                  "--checkpoints-dir", str(ckpt)) == 0
    for name in ("resnet18", "resnet18_se"):
        log = _log(out / name)
        assert [r["epoch"] for r in log] == list(range(1, 9))
        assert log[-1]["loss"] < 0.5 * log[0]["loss"]
        assert log[-1]["val_top1_err"] == 0.0 and log[-1]["val_size"] == 16
        assert all(r["train_img_per_s"] > 0 for r in log)
        config = json.loads((out / name / "config.json").read_text())
        assert config["recipe"]["batch_size"] == 8 and config["seed"] == 0
        assert config["args"]["epochs"] == 8 and config["args"]["models"] == ["resnet18", "resnet18_se"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    entry = manifest["models"]["resnet18_se"]
    assert entry["classes"] == sorted(CLASSES) and entry["epochs"] == 8 and entry["seed"] == 0
    assert entry["metrics"]["val_top1_err_16"] == 0.0 and entry["metrics"]["train_img_per_s"] > 0
    assert entry["metrics"]["train_wall_min"] > 0 and entry["extra"]["machine"].startswith("cpu: ")
    assert entry["metrics"]["params"] == count_params(load_checkpoint(ckpt, "resnet18_se")[0])
    assert entry["metrics"]["gmacs_224"] > 0  # the app shows them beside every model
    assert entry["extra"]["command"] == sys.orig_argv  # this process's exact command line
    record = ckpt / entry["extra"]["run_log"]  # the training record travels with the weights
    assert record.read_text() == (out / "resnet18_se" / "log.jsonl").read_text()
    assert json.loads((record.parent / "config.json").read_text())["seed"] == 0


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    """Stopping after an epoch and resuming gives bit-identical weights and logs, also when the kill
    came after one model had saved its next epoch but before the other had."""
    args = ("--model", "resnet18", "resnet18_lgam", "--epochs", "3", "--val-every", "2")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(tiny_data, straight, *args) == 0
    assert _train(tiny_data, split, *args, "--stop-after", "1") == 0
    assert [r["epoch"] for r in _log(split / "resnet18")] == [1]
    lagging = split / "resnet18_lgam"
    saved = {f: (lagging / f).read_bytes() for f in ("state.json", "state.safetensors")}
    assert _train(tiny_data, split, *args, "--stop-after", "2", "--resume") == 0
    for f, data in saved.items():  # resnet18_lgam back at epoch 1; its log still has epoch 2
        (lagging / f).write_bytes(data)
    assert _train(tiny_data, split, *args, "--resume") == 0

    def strip(log: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("time", "cpu_time", "train_img_per_s")} for r in log]

    for name in ("resnet18", "resnet18_lgam"):
        a, b = _weights(straight / name), _weights(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert strip(_log(straight / name)) == strip(_log(split / name))
        assert [r["val_top1_err"] is not None for r in _log(split / name)] == [False, True, True]


def test_resume_matches_uninterrupted_run_on_the_cpu_recipes_path(tiny_data, tmp_path, monkeypatch):
    """The path the seed runs take (the test above is float32): the cpu recipe's bf16 autocast,
    channels_last and branch_rms, and a crop size that grows across the resume."""
    monkeypatch.setattr(lgam.train, "bf16_native", lambda device: True)  # oneDNN emulates it elsewhere
    args = ["--data", str(tiny_data), "--stem", "cifar", "--val-size", "16", "--no-progress", "--device", "cpu",
            "--recipe", "cpu", "--set", "batch_size=8", "--set", "lr=0.02", "--set", "train_size=32",
            "--set", "train_size_start=16", "--set", "size_hold_epochs=1", "--model", "resnet18",
            "--epochs", "3", "--val-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_module("lgam.train", [*args, "--out", str(straight)]) == 0
    assert run_module("lgam.train", [*args, "--out", str(split), "--stop-after", "1"]) == 0
    assert run_module("lgam.train", [*args, "--out", str(split), "--resume"]) == 0
    config = json.loads((split / "resnet18" / "config.json").read_text())
    assert config["bf16_autocast"] and config["channels_last"] and config["recipe"]["branch_rms"] > 0
    a, b = _weights(straight / "resnet18"), _weights(split / "resnet18")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = _log(straight / "resnet18"), _log(split / "resnet18")
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert logs[1][0]["train_size"] < logs[1][1]["train_size"]  # the size grew at the resume


def test_a_kill_between_the_state_files_cannot_pair_one_epochs_json_with_the_next_weights(tmp_path):
    """state.json is written after state.safetensors: a kill between the two left epoch 1's JSON
    (epoch, generators, optimiser scalars) beside epoch 2's weights, and load_state took the pair
    (the resumed run trained epoch 2 twice). The tensors' file now carries its own epoch's JSON."""
    from lgam.runstate import STATE_JSON, load_state, save_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = {"shuffle": [1], "augment": [2], "torch": [3]}

    def step():
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()

    step()
    save_state(tmp_path, 1, model, opt, {"seed": 0}, gen)
    epoch1_json = (tmp_path / STATE_JSON).read_bytes()
    step()
    save_state(tmp_path, 2, model, opt, {"seed": 0}, {**gen, "shuffle": [9]})
    want = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / STATE_JSON).write_bytes(epoch1_json)  # as if killed before the JSON's replace

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    epoch, generators = load_state(tmp_path, fresh, fresh_opt, {"seed": 0}, torch.device("cpu"))
    assert epoch == 2 and generators["shuffle"] == [9]
    assert all(torch.equal(fresh.state_dict()[k], want[k]) for k in want)


@pytest.mark.slow
def test_existing_run_needs_resume_with_the_same_settings(tiny_data, tmp_path):
    args = ("--model", "resnet18", "--epochs", "1", "--val-every", "0")
    assert _train(tiny_data, tmp_path, *args) == 0
    assert "pass --resume" in _cli_error(tiny_data, tmp_path, *args)
    msg = _cli_error(tiny_data, tmp_path, *args, "--resume", "--set", "lr=0.1")
    assert msg.startswith("error: cannot resume ") and "--set lr was 0.02, now 0.1" in msg
    assert "Traceback" not in msg
    assert "KEY one of" in _cli_error(tiny_data, tmp_path, *args, "--set", "lr")


ONE_EPOCH = ("--model", "resnet18", "--epochs", "1", "--val-every", "0")
NUM_IMAGES = "the number of training images (--data, --limit, --skip-corrupt)"


@pytest.fixture(scope="module")
def one_epoch_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 1-epoch resnet18 run (TINY settings) for the resume checks; a refused resume
    changes nothing in it."""
    out = tmp_path_factory.mktemp("one_epoch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _train(tiny_data, out, *ONE_EPOCH) == 0
    finally:
        torch.set_num_threads(threads)
    return out


#: a weight-shaping setting changed on --resume -> what the message says
CHANGED = [
    (("--stem", "imagenet"), "--stem was 'cifar', now 'imagenet'"),
    (("--seed", "1"), "--seed was 0, now 1"),
    (("--epochs", "2"), "--epochs was 1, now 2"),
    (("--recipe", "paper", "--epochs", "1"), "--set schedule was 'cosine', now 'step'"),
    (("--set", "batch_size=4"), "--set batch_size was 8, now 4"),
    (("--set", "momentum=0.5"), "--set momentum was 0.9, now 0.5"),
    (("--set", "weight_decay=0"), "--set weight_decay was 5e-05, now 0.0"),
    (("--set", "label_smoothing=0.1"), "--set label_smoothing was 0.0, now 0.1"),
    (("--set", "accum_steps=2"), "--set accum_steps was 1, now 2"),
    (("--set", "crop_scale_min=0.25"), "--set crop_scale_min was 0.5, now 0.25"),
    (("--set", "bn_bias_decay=false"), "--set bn_bias_decay was True, now False"),
    (("--limit", "12"), f"{NUM_IMAGES} was 24, now 12"),
    (("--decode-size", "8"), "the training images' size (--decode-size) was 16, now 8"),
]


@pytest.mark.parametrize("change, message", CHANGED, ids=[" ".join(c) for c, _ in CHANGED])
def test_resume_names_the_changed_setting(one_epoch_run, tiny_data, capsys, change, message):
    config = (one_epoch_run / "resnet18" / "config.json").read_bytes()
    assert _train(tiny_data, one_epoch_run, *ONE_EPOCH, "--resume", *change) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume {one_epoch_run / 'resnet18'}: ")
    assert message in err and "use the same setting" in err, err
    assert (one_epoch_run / "resnet18" / "config.json").read_bytes() == config  # untouched


def _with_classes(root: Path, out: Path, rename: dict[str, str | None]) -> Path:
    """A copy of ``root`` with class folders renamed (``None``: left out)."""
    for split in ("train", "val"):
        for folder in (root / split).iterdir():
            new = rename.get(folder.name, folder.name)
            if new is not None:
                shutil.copytree(folder, out / split / new)
    return out


@pytest.mark.parametrize("rename, message", [
    ({"red": "rose"}, "the classes (--data) was ['blue', 'green', 'red'], now ['blue', 'green', 'rose']"),
    ({"red": None}, "the number of classes (--data) was 3, now 2"),
], ids=["renamed", "fewer"])
def test_resume_names_other_classes(one_epoch_run, tiny_data, tmp_path, capsys, rename, message):
    data = _with_classes(tiny_data, tmp_path, rename)
    assert _train(data, one_epoch_run, *ONE_EPOCH, "--resume") == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert ("the classes (--data)" in err) == (None not in rename.values())  # the count says it


def test_resume_names_the_world_size(one_epoch_run, tiny_data, capsys, monkeypatch):
    """Two processes slice each batch in two (BatchNorm over 4 images): other weights."""
    monkeypatch.setattr(lgam.train, "_dist_info", lambda: (0, 2))  # refused before any collective
    assert _train(tiny_data, one_epoch_run, *ONE_EPOCH, "--resume") == 2
    assert "the number of processes (torchrun --nproc_per_node) was 1, now 2" in capsys.readouterr().err


def test_resume_names_the_autocast_dtype(tiny_data, tmp_path, capsys, monkeypatch):
    """The same recipe on a device with native bf16 would continue in bf16 autocast: refused."""
    args = (*ONE_EPOCH, "--set", "bf16=true")
    monkeypatch.setattr(lgam.train, "bf16_native", lambda device: False)
    assert _train(tiny_data, tmp_path, *args) == 0
    monkeypatch.setattr(lgam.train, "bf16_native", lambda device: True)
    assert _train(tiny_data, tmp_path, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert "the autocast dtype (--set bf16, on a device with native bf16) was 'float32', now 'bfloat16'" in err


def test_resume_keeps_which_commit_ran_the_earlier_epochs(tiny_data, tmp_path, monkeypatch):
    """config.json is rewritten on --resume; the commit and command of the epochs before it must
    survive (a run spread over sessions ran on more than one commit)."""
    run, args = tmp_path / "run", ("--model", "resnet18", "--epochs", "3", "--val-every", "0")
    assert _train(tiny_data, run, *args, "--stop-after", "1") == 0
    first = json.loads((run / "resnet18" / "config.json").read_text())
    monkeypatch.setattr(lgam.train, "git_revision", lambda: {"git_commit": "f" * 40, "git_dirty": False})
    assert _train(tiny_data, run, *args, "--stop-after", "2", "--resume") == 0
    assert _train(tiny_data, run, *args, "--resume") == 0
    config = json.loads((run / "resnet18" / "config.json").read_text())
    assert config["git_commit"] == "f" * 40 and config["resumed_from_epoch"] == 2
    sessions = config["earlier_sessions"]
    assert [s["resumed_from_epoch"] for s in sessions] == [0, 1]  # oldest first, none dropped
    assert sessions[0]["git_commit"] == first["git_commit"] and sessions[0]["argv"] == first["argv"]
    assert "earlier_sessions" not in sessions[1]  # a flat list, not nested configs


def test_resuming_a_finished_run_leaves_its_files_alone(one_epoch_run, tiny_data, tmp_path, monkeypatch):
    """A resume with nothing left to train (fair_runs.py again after a kill during lgam evaluate)
    rewrote config.json: its commit then named a session that trained no epoch."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    def files() -> dict[str, bytes]:  # but the lock, which names the process holding it
        return {f.name: f.read_bytes() for f in (run / "resnet18").iterdir() if f.name != LOCK}

    before = files()
    monkeypatch.setattr(lgam.train, "git_revision", lambda: {"git_commit": "f" * 40, "git_dirty": False})
    assert _train(tiny_data, run, *ONE_EPOCH, "--resume") == 0
    assert files() == before and "config.json" in before


def test_resume_on_another_kind_of_device_is_refused_before_anything_changes(tiny_data, tmp_path, capsys):
    """A run trained on a CPU resumed on a GPU (or back) raised torch's bare RuntimeError from
    Generator.set_state once the epoch began: the augmentation stream's state is 5 KB on a CPU,
    16 bytes on CUDA. Simulated here by a saved state of a CUDA generator's size."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lgam.runstate import STATE_META, STATE_TENSORS

    args = ("--model", "resnet18", "--epochs", "2", "--val-every", "0")
    run = tmp_path / "run"
    assert _train(tiny_data, run, *args, "--stop-after", "1") == 0
    path = run / "resnet18" / STATE_TENSORS
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[STATE_META])
    meta["generators"]["augment"] = [0] * 16
    save_file(load_file(str(path)), str(path), metadata={STATE_META: json.dumps(meta)})
    config = (run / "resnet18" / "config.json").read_bytes()
    assert _train(tiny_data, run, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert f"cannot resume {run / 'resnet18'} on cpu: its augmentation stream was saved on a GPU " \
           "(16-byte state, 5056 here)" in err and "Traceback" not in err
    assert (run / "resnet18" / "config.json").read_bytes() == config  # no session recorded
    assert [r["epoch"] for r in _log(run / "resnet18")] == [1]


def test_resume_refuses_a_log_that_lost_or_repeated_epochs(tiny_data, tmp_path, capsys):
    """The log is rewritten at every resume; a kill in that rewrite (or a second process) could
    leave it short or doubled, and the resume carried on from it: the run's record lost epochs."""
    run, args = tmp_path / "run", ("--model", "resnet18", "--epochs", "3", "--val-every", "0")
    assert _train(tiny_data, run, *args, "--stop-after", "2") == 0
    log = run / "resnet18" / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    for broken, shown in ((lines[1:], "[2]"), ([*lines, lines[1]], "[1, 2, 2]"), ([], "[]")):
        log.write_text("".join(broken))
        assert _train(tiny_data, run, *args, "--resume") == 2
        err = capsys.readouterr().err
        assert f"its state is after epoch 2, but log.jsonl holds the lines of epochs {shown}" in err, err
    log.write_text("".join(lines) + lines[0][:20])  # torn last line: a kill mid-append of epoch 3
    assert _train(tiny_data, run, *args, "--resume") == 0
    assert [r["epoch"] for r in _log(run / "resnet18")] == [1, 2, 3]


def test_a_line_of_a_log_that_is_not_json_is_named(tmp_path):
    """A torn line blocked a resume with json's bare message, naming no file."""
    from lgam.runstate import read_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": \n{"epoch": 3}\n')
    with pytest.raises(TrainError, match=r"log.jsonl, line 2, is not a JSON record"):
        read_log(tmp_path, 3)
    log.write_text('{"epoch": 1}\n{"epo')
    assert read_log(tmp_path, 1) == [{"epoch": 1}]  # a resume: the torn last line's epoch is not saved
    with pytest.raises(TrainError, match=r"line 2, is not a JSON record"):
        read_log(tmp_path)  # a finished run's whole log


def test_a_run_being_trained_is_refused_to_a_second_process(tiny_data, tmp_path, capsys):
    """Two fair_runs.py on one run folder appended to one log and overwrote each other's state."""
    from lgam.runstate import run_lock

    run = tmp_path / "run"
    with run_lock(run / "resnet18"):
        assert _train(tiny_data, run, *ONE_EPOCH) == 2
        err = capsys.readouterr().err
        assert f"{run / 'resnet18'} is being trained by another process (pid {os.getpid()})" in err
    assert not (run / "resnet18" / "state.json").exists()
    assert _train(tiny_data, run, *ONE_EPOCH) == 0  # released when its holder ends


def test_a_file_system_without_locks_trains_unlocked_and_says_so(tiny_data, tmp_path, capsys, monkeypatch):
    """Where flock fails (some NFS/SMB mounts: ENOLCK) the run stopped with a bare OS error."""
    import lgam.runstate

    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(lgam.runstate.fcntl, "flock", no_locks)
    assert _train(tiny_data, tmp_path / "run", *ONE_EPOCH) == 0
    assert "cannot be locked ([Errno 37] No locks available)" in capsys.readouterr().err


def test_resume_on_other_software_or_hardware_warns(tiny_data, tmp_path, capsys, monkeypatch):
    """The same weights as an uninterrupted run need the same torch, thread count and kernels."""
    run, args = tmp_path / "run", ("--model", "resnet18", "--epochs", "2", "--val-every", "0")
    assert _train(tiny_data, run, *args, "--stop-after", "1") == 0
    (run / "resnet18" / ".state.safetensors.x1y2.tmp").write_bytes(b"half a state")
    capsys.readouterr()
    monkeypatch.setattr(lgam.train, "device_summary", lambda device: "cpu: another CPU, 64 threads")
    assert _train(tiny_data, run, *args, "--resume") == 0
    err = capsys.readouterr().err
    assert "warning: resuming" in err and "now 'cpu: another CPU, 64 threads'" in err
    assert "its weights will differ slightly from an uninterrupted run's" in err
    assert not list((run / "resnet18").glob(".*.tmp"))  # a kill's leftovers removed


def test_resume_lists_every_changed_setting(one_epoch_run, tiny_data, capsys):
    assert _train(tiny_data, one_epoch_run, *ONE_EPOCH, "--resume", "--seed", "3", "--set", "lr=0.1") == 2
    err = capsys.readouterr().err
    assert "--set lr was 0.02, now 0.1; --seed was 0, now 3; use the same settings or a new --out" in err


def test_resume_checks_a_state_saved_without_its_settings(one_epoch_run, tiny_data, tmp_path, capsys):
    """A state.json from before it held its settings (recipe and seed only) resumes, and a changed
    --stem is still named (from config.json) instead of failing while loading the weights."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    state = json.loads((run / "resnet18" / "state.json").read_text())
    settings = state.pop("settings")
    state.update(recipe=settings["recipe"], seed=settings["seed"])
    (run / "resnet18" / "state.json").write_text(json.dumps(state))
    assert _train(tiny_data, run, *ONE_EPOCH, "--resume", "--stem", "imagenet") == 2
    assert "--stem was 'cifar', now 'imagenet'" in capsys.readouterr().err
    assert _train(tiny_data, run, *ONE_EPOCH, "--resume") == 0


def test_train_error_is_a_value_error_and_an_lgam_error():
    assert issubclass(TrainError, ValueError) and issubclass(TrainError, lgam.errors.LgamError)
    with pytest.raises(TrainError, match="unknown recipe"):
        make_recipe("slow")


def _cli_error(data: Path, out: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lgam.train", "--data", str(data), "--out", str(out),
                           *TINY, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_single_process(tiny_data, tmp_path):
    """2 gloo processes x 4 images == 1 process with 2 accumulated micro-batches of 4: the same
    global batches, augmentation and per-4-image BatchNorm statistics, so the parameters agree up
    to float32 summation order (bit-identical on this CPU; the tolerance allows another reduction
    order). A plain single-process run normalises over all 8 images and drifts away at once (loss
    0.99 vs 1.05 after epoch 1, 0.44 vs 1.19 after epoch 2; weights differ by O(1)). Running statistics are not compared: DDP keeps
    rank 0's, which saw only its own slices."""
    args = ["--model", "resnet18", "--epochs", "2", "--val-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lgam.train", "--data", str(tiny_data), "--out", str(tmp_path / "ddp"), *TINY, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert _train(tiny_data, tmp_path / "single", *args, "--set", "accum_steps=2") == 0
    a, b = _log(tmp_path / "single" / "resnet18"), _log(tmp_path / "ddp" / "resnet18")
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    wa, wb = _weights(tmp_path / "single" / "resnet18"), _weights(tmp_path / "ddp" / "resnet18")
    params = [k for k in wa if k.startswith("model.") and not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) == 62
    for k in params:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k


def _validate_on_two_ranks(rank: int, port: int, errors) -> None:
    """One gloo rank of :func:`test_ddp_validation_uses_rank_0s_running_statistics`."""
    import types

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.nn.BatchNorm1d(2).eval()
        model.running_mean.copy_(torch.tensor([0.0, 5.0 * rank]))  # rank 1's slices moved its mean
        images = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
        labels = torch.tensor([0] * 4 + [1] * 4)  # right under rank 0's statistics
        run = types.SimpleNamespace(val=(images, labels, lambda x: x), recipe=types.SimpleNamespace(batch_size=4),
                                    rank=rank, world=2, channels_last=False, autocast=False)
        errors[rank] = lgam.train._top1_err(run, model)
    finally:
        dist.destroy_process_group()


def test_ddp_validation_uses_rank_0s_running_statistics():
    """Each rank validated its share of the images with its own BatchNorm statistics (DDP sends
    rank 0's before each training step, then every rank updates them from its own slice), so the
    logged error was of no one model; now every rank uses rank 0's, as the checkpoint does."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").Manager().dict()
    mp.spawn(_validate_on_two_ranks, args=(port, errors), nprocs=2, join=True)
    assert dict(errors) == {0: 0.0, 1: 0.0}


@pytest.mark.slow
def test_throughput_benchmark_runs():
    """Each model's float32 and fast path in interleaved rounds; "fast vs resnet18" divides by
    resnet18's time whatever the order of --models (it divided by the first model's)."""
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--models", "resnet18_lgam",
                           "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--threads", "1",
                           "--rounds", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 2 and rows[0].startswith("| resnet18_lgam |") and rows[1].endswith("| 1.00x |")
    assert all(float(row.split("|")[3]) > 0 for row in rows)
    assert "2 interleaved round(s)" in proc.stdout


def test_a_diverged_run_stops_without_saving_a_nan_state(tiny_data, tmp_path, capsys):
    """A NaN loss trained on for the rest of the schedule without a word."""
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--model", "resnet18", "--epochs", "3", "--val-every", "0",
                  "--set", "lr=1e30") == 2
    err = capsys.readouterr().err
    assert "resnet18: the training loss is nan in epoch 1: the run diverged (no state was saved" in err
    assert not (run / "resnet18" / "state.safetensors").exists()


def test_the_other_models_train_on_when_one_diverges(tiny_data, tmp_path, capsys, monkeypatch):
    record = lgam.train._epoch_record

    def nan_for_lgam_from_epoch_2(run, tr, epoch, *args):
        r = record(run, tr, epoch, *args)
        return {**r, "loss": float("nan")} if tr.name == "resnet18_lgam" and epoch >= 1 else r

    monkeypatch.setattr(lgam.train, "_epoch_record", nan_for_lgam_from_epoch_2)
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    assert _train(tiny_data, run, "--model", "resnet18", "resnet18_lgam", "--epochs", "3",
                  "--val-every", "0", "--checkpoints-dir", str(ckpt)) == 2
    out, err = capsys.readouterr()
    assert f"resnet18_lgam: the training loss is nan in epoch 2: the run diverged ({run / 'resnet18_lgam'} " \
           "keeps the state after epoch 1" in err
    assert [r["epoch"] for r in _log(run / "resnet18")] == [1, 2, 3]
    assert [r["epoch"] for r in _log(run / "resnet18_lgam")] == [1]
    # the finished model's checkpoint is saved (it was dropped with the diverged one's error)
    assert f"saved resnet18 to {ckpt}" in out and "saved resnet18_lgam" not in out
    assert set(load_manifest(ckpt)["models"]) == {"resnet18"}


def test_resume_past_an_epoch_no_model_trained_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """resnet18 at epoch 3, resnet18_lgam diverged at 1: on --resume, epoch 2 had no model to train
    and was skipped without drawing its batch order and crops, so resnet18 trained epoch 4 on
    epoch 3's. Each resumed model now starts from the random streams it saved."""
    record = lgam.train._epoch_record

    def nan_for_lgam_from_epoch_2(run, tr, epoch, *args):
        r = record(run, tr, epoch, *args)
        return {**r, "loss": float("nan")} if tr.name == "resnet18_lgam" and epoch >= 1 else r

    monkeypatch.setattr(lgam.train, "_epoch_record", nan_for_lgam_from_epoch_2)
    args = ("--model", "resnet18", "resnet18_lgam", "--epochs", "4", "--val-every", "0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(tiny_data, straight, *args) == 2
    assert _train(tiny_data, split, *args, "--stop-after", "3") == 2
    assert [r["epoch"] for r in _log(split / "resnet18")] == [1, 2, 3]
    assert _train(tiny_data, split, *args, "--resume") == 2  # lgam diverges again; resnet18 ends
    a, b = _weights(straight / "resnet18"), _weights(split / "resnet18")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _log(straight / "resnet18")] == [r["loss"] for r in _log(split / "resnet18")]


def test_the_divergence_error_survives_pickling():
    """Raised in a worker (multiprocessing, a test runner) it is pickled back; a required second
    argument made unpickling raise TypeError instead."""
    import pickle

    e = pickle.loads(pickle.dumps(lgam.train.Diverged("resnet18_lgam: nan", {"resnet18": [{"epoch": 1}]})))
    assert isinstance(e, TrainError) and str(e) == "resnet18_lgam: nan" and e.records == {"resnet18": [{"epoch": 1}]}


def test_validation_on_a_folder_of_class_folders_is_refused(tiny_data, tmp_path, capsys):
    """ROOT/<class>/<image> gives val the training images themselves: lgam train scored its own
    training set as validation without a word."""
    flat = tiny_data / "train"
    assert _train(flat, tmp_path / "out", *ONE_EPOCH, "--val-every", "1") == 2
    assert "its val split would be the training images themselves" in capsys.readouterr().err
    assert _train(flat, tmp_path / "out", *ONE_EPOCH) == 0  # --val-every 0: no validation


def test_val_shards_with_other_classes_are_refused(tiny_data, tmp_path, capsys):
    """Without a classes.tsv each split's shards give their own class list: a val split lacking a
    class labelled its classes one off from training's, and the val error was wrong, silently."""
    import tarfile

    data = tmp_path / "shards"
    data.mkdir()
    for split, classes in (("train", CLASSES), ("val", CLASSES[1:])):
        with tarfile.open(data / f"{split}-00.tar", "w") as tar:
            for c in classes:
                for f in sorted((tiny_data / split / c).iterdir()):
                    tar.add(f, arcname=f"{split}/{c}/{f.name}")
    assert run_module("lgam.train", ["--data", str(data), "--out", str(tmp_path / "out"), *TINY,
                                     *ONE_EPOCH, "--val-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "data error: the val data's classes ['blue', 'green']... are not the training data's" in err


def test_holdout_and_skip_init_reach_config_and_checkpoint(tiny_data, tmp_path):
    """--holdout N trains on the rest (same images set aside for every seed) and says so in the
    run's files and the manifest; a skip_init recipe's gains are in the saved architecture."""
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    assert _train(tiny_data, out, "--model", "resnet18_se", "--epochs", "1", "--holdout", "2",
                  "--set", "skip_init=true", "--set", "skip_gain_lr=0.1", "--checkpoints-dir", str(ckpt)) == 0
    groups = json.loads((out / "resnet18_se" / "state.json").read_text())["param_groups"]
    assert groups[-1]["lr_scale"] == 0.1 and groups[-1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])
    config = json.loads((out / "resnet18_se" / "config.json").read_text())
    assert config["train_images"] == 3 * 6 and config["args"]["holdout"] == 2
    assert config["recipe"]["skip_init"] is True
    entry = json.loads((ckpt / "manifest.json").read_text())["models"]["resnet18_se"]
    assert entry["extra"]["holdout_per_class"] == 2 and entry["extra"]["train_images"] == 18
    assert entry["arch_kwargs"]["skip_init"] is True
    from lgam.checkpoints import load_checkpoint, load_manifest

    model = load_checkpoint(ckpt, "resnet18_se")[0]
    trained = _weights(out / "resnet18_se")["model.layer1.0.skip_gain"]
    assert float(model.layer1[0].skip_gain.detach()) == pytest.approx(float(trained), rel=1e-3)  # float16
    assert float(trained) != 0.0  # one epoch moved it


def test_branch_rms_is_applied_when_a_run_starts(tiny_data, tmp_path):
    """``--set branch_rms=0.5`` (the cpu preset's block init): the trainer rescales every branch's
    last BN from a batch of training images before the first step — plain ResNet's bn2 scales start
    at 0.5, not 1 — and the run's config records it."""
    assert _train(tiny_data, tmp_path / "a", "--model", "resnet18", "--epochs", "1", "--set", "branch_rms=0.5") == 0
    assert _train(tiny_data, tmp_path / "b", "--model", "resnet18", "--epochs", "1") == 0
    scaled, standard = (_weights(tmp_path / r / "resnet18") for r in "ab")
    bn2 = [k for k in scaled if k.endswith("bn2.weight")]
    assert len(bn2) == 8
    assert all(abs(scaled[k].float().mean() - 0.5) < 0.1 for k in bn2)  # a few small steps from 0.5
    assert all(abs(standard[k].float().mean() - 1.0) < 0.1 for k in bn2)
    config = json.loads((tmp_path / "a" / "resnet18" / "config.json").read_text())
    assert config["recipe"]["branch_rms"] == 0.5


@pytest.mark.parametrize("args,message", [
    (("--holdout", "8"), "class 'blue' has 8 images: cannot hold out 8"),
    (("--holdout", "3", "--set", "batch_size=16"), "15 training images are fewer than one batch (16)"),
    (("--set", "batch_size=32"), "24 training images are fewer than one batch (32)"),
])
def test_holdout_and_batch_size_are_refused_before_decoding(tiny_data, tmp_path, monkeypatch, capsys,
                                                            args, message):
    """Known from the file listing, so found before a real data set's minutes of decoding."""
    def no_decoding(*_):
        raise AssertionError("decoded an image before refusing")

    monkeypatch.setattr(lgam.data, "_decode", no_decoding)
    assert _train(tiny_data, tmp_path, "--model", "resnet18", *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["branch_rms=0.5", "zero_init_residual=true", "residual_bn_scale=0.5"])
def test_a_branch_init_on_blocks_without_a_last_bn_is_refused_not_skipped(setting):
    """WRN's pre-activation blocks name no last BN: the cpu recipe's branch_rms was skipped there
    without a word (a WRN LGAM then trains from the init that stalls at chance)."""
    from lgam.recipes import TrainError
    from lgam.train import init_blocks, make_recipe

    recipe = make_recipe("paper", [setting])
    wrn = lgam.create_model("wrn16_10_lgam", num_classes=3)
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(TrainError, match=rf"sets {setting.split('=')[0]}.*wrn16_10_lgam's blocks have none"):
        init_blocks(wrn, recipe, images)
    assert init_blocks(wrn, make_recipe("paper", []), images) is None  # nothing asked: fine
    resnet = lgam.create_model("resnet18_lgam", num_classes=3)
    init_blocks(resnet, recipe, torch.randn(4, 3, 32, 32))  # ResNet blocks have one


@pytest.mark.slow
def test_a_run_begun_before_the_branch_init_check_still_resumes(tiny_data, tmp_path, monkeypatch, capsys):
    """The check once ran on --resume too: a WRN run started with branch_rms (then skipped without
    a word) could not be finished, and --set branch_rms=0 changes the settings a resume checks."""
    import lgam.train

    args = ("--model", "wrn16_10", "--stem", "cifar", "--epochs", "2", "--set", "branch_rms=0.5")
    monkeypatch.setattr(lgam.train, "check_branch_init", lambda model, recipe: None)  # the old code
    assert _train(tiny_data, tmp_path, *args, "--stop-after", "1") == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert _train(tiny_data, tmp_path / "fresh", *args) == 2  # a fresh run is refused
    assert "sets branch_rms" in capsys.readouterr().err
    assert _train(tiny_data, tmp_path, *args, "--resume") == 0
    assert len(_log(tmp_path / "wrn16_10")) == 2
