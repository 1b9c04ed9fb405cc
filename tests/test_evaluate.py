"""lgam evaluate: known error on a tiny set, manifest update, table, class-list guard."""
import numpy as np
import pytest
import torch
from PIL import Image

import lgam
from lgam.checkpoints import load_manifest, save_checkpoint
from lgam.cli import main
from lgam.data import DataError
from lgam.evaluate import best_input_size, evaluate_checkpoints, format_table, latency_setup

CLASSES = ["a", "b", "c"]


@pytest.fixture()
def setup(tmp_path):
    data = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        d = data / "val" / name
        d.mkdir(parents=True)
        for i in range(c + 1):  # 1 + 2 + 3 = 6 images
            Image.fromarray(np.full((20, 20, 3), 40 * c + i, np.uint8)).save(d / f"{i}.png")
    ckpt = tmp_path / "ckpt"
    model = lgam.create_model("resnet18", num_classes=3, stem="cifar").eval()
    with torch.no_grad():  # always predicts class 0 -> error = 5/6
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    save_checkpoint(model, ckpt, "always_a", classes=CLASSES, input_size=32,
                    metrics={"train_img_per_s": 123.0})
    return data, ckpt


def _sizes_seen(monkeypatch) -> list[int]:
    """The sizes lgam.evaluate resizes val images to (its constant model's error cannot tell)."""
    import lgam.evaluate

    seen, real = [], lgam.evaluate.resize_normalize
    monkeypatch.setattr(lgam.evaluate, "resize_normalize",
                        lambda images, size, *a, **k: seen.append(size) or real(images, size, *a, **k))
    return seen


def test_known_error_and_manifest_update(setup, monkeypatch):
    data, ckpt = setup
    seen = _sizes_seen(monkeypatch)
    rows = evaluate_checkpoints(ckpt, data, sizes=(32, 16), latency_reps=1)
    assert sorted(set(seen)) == [16, 32]  # each size's error is measured at that size
    assert rows[0]["val_top1_err_32"] == rows[0]["val_top1_err_16"] == pytest.approx(100 * 5 / 6, abs=0.01)
    m = load_manifest(ckpt)["models"]["always_a"]["metrics"]
    assert m["val_top1_err_32"] == pytest.approx(83.33) and m["params"] == 11_170_371
    assert m["train_img_per_s"] == 123.0 and m["val_images"] == 6 and m["cpu_latency_ms_224"] > 0
    table = format_table(rows, (32, 16))
    assert "| always_a | 32 | 83.33 | 83.33 | 83.33 | — | 11.170 |" in table and "| 123 |" in table
    # a latency says what it ran with: threads, CPU, LGAM's path
    assert m["cpu_latency_setup"] == latency_setup() and f"{torch.get_num_threads()} threads" in m["cpu_latency_setup"]
    assert f"CPU ms measured with {latency_setup()}." in table


def test_the_app_size_is_always_evaluated(setup):
    data, ckpt = setup  # input_size 32 is not among sizes
    (row,) = evaluate_checkpoints(ckpt, data, sizes=(16,), latency_reps=1)
    assert row["input_size"] == 32 and {"val_top1_err_16", "val_top1_err_32"} <= row.keys()


def test_limit_leaves_the_manifest_alone(setup, capsys):
    data, ckpt = setup
    assert main(["evaluate", "--checkpoints", str(ckpt), "--data", str(data), "--sizes", "16",
                 "--latency-reps", "1", "--limit", "3"]) == 0
    assert "manifest is left as it is" in capsys.readouterr().err
    assert "val_top1_err_16" not in load_manifest(ckpt)["models"]["always_a"]["metrics"]
    assert main(["evaluate", "--checkpoints", str(ckpt), "--data", str(data), "--limit", "3",
                 "--choose-input-size"]) == 2
    assert "needs the full val split" in capsys.readouterr().err


def test_choose_input_size_by_measurement(setup, capsys):
    data, ckpt = setup
    rows = [{"val_top1_err_224": 30.0, "val_top1_err_160": 25.0, "val_top1_err_128": 27.0},
            {"val_top1_err_224": 31.0, "val_top1_err_160": 26.0, "val_top1_err_128": 24.0}]
    assert best_input_size(rows, (224, 160, 128)) == (128, {224: 30.5, 160: 25.5, 128: 25.5})  # tie: smaller
    assert best_input_size(rows[:1], (224, 160, 128))[0] == 160
    assert main(["evaluate", "--checkpoints", str(ckpt), "--data", str(data), "--sizes", "32", "16",
                 "--latency-reps", "1", "--choose-input-size"]) == 0
    assert "input_size -> 16 px" in capsys.readouterr().out  # a tie (5/6 at both): the smaller
    assert load_manifest(ckpt)["models"]["always_a"]["input_size"] == 16


def test_cli_writes_table(setup, tmp_path, capsys):
    data, ckpt = setup
    out = tmp_path / "t.md"
    assert main(["evaluate", "--checkpoints", str(ckpt), "--data", str(data), "--sizes", "32",
                 "--latency-reps", "1", "--out", str(out), "--no-update"]) == 0
    assert "| always_a | 32 | 83.33 | 83.33 |" in out.read_text() and "83.33" in capsys.readouterr().out
    assert "val_top1_err_32" not in load_manifest(ckpt)["models"]["always_a"]["metrics"]
    assert main(["evaluate", "--checkpoints", str(ckpt), "--data", str(data), "--models", "nope"]) == 2
    assert "it has ['always_a']" in capsys.readouterr().err


def test_class_list_mismatch_is_an_error(setup):
    data, ckpt = setup
    (data / "val" / "d").mkdir()
    Image.new("RGB", (20, 20)).save(data / "val" / "d" / "0.png")
    with pytest.raises(DataError, match="labels would not match"):
        evaluate_checkpoints(ckpt, data, sizes=(32,), latency_reps=1)


def test_a_checkpoint_with_class_ids_is_checked_by_id_not_by_name(setup, tmp_path):
    """Display names were compared: two classes sharing a name in swapped order passed, and a
    model whose names were its ids was refused on the same data with a classes.tsv."""
    data, _ = setup
    model = lgam.create_model("resnet18", num_classes=3, stem="cifar").eval()
    for wnids, ok in ((CLASSES, True), (["b", "a", "c"], False)):
        ckpt = tmp_path / f"ckpt_{ok}"
        save_checkpoint(model, ckpt, "m", classes=["same name"] * 3, input_size=32, extra={"wnids": wnids})
        if ok:
            evaluate_checkpoints(ckpt, data, sizes=(32,), latency_reps=1)
        else:
            with pytest.raises(DataError, match="labels would not match"):
                evaluate_checkpoints(ckpt, data, sizes=(32,), latency_reps=1)


def test_pack_mask_round_trip():
    from lgam.evaluate import pack_mask, unpack_mask

    mask = torch.tensor([True, False, False, True, True, False, True, False, True, True, False])
    assert torch.equal(unpack_mask(pack_mask(mask), len(mask)), mask)
    assert pack_mask(torch.tensor([True] + [False] * 7)) == "80"


def test_evaluate_runs_on_val_and_the_held_out_training_images(tmp_path, capsys, monkeypatch):
    """lgam evaluate --runs: a run folder's model (SkipInit gains included) on val and on the images
    its --holdout kept out of training, at every size, with the misses packed for paired tests."""
    import json

    from lgam.cli import run_module
    from lgam.evaluate import unpack_mask

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for split, n in (("train", 6), ("val", 3)):
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
                img[..., c] += 150
                Image.fromarray(img).save(data / split / name / f"{i}.png")
    # display names apart from the folder ids, as ImageNet-20's wnids and names: the class check
    # once compared the run's ids with val's names and refused every real run
    (data / "classes.tsv").write_text("index\twnid\tname\n" + "".join(
        f"{i}\t{c}\tclass {c}\n" for i, c in enumerate(CLASSES)))
    out = tmp_path / "run"
    assert run_module("lgam.train", [
        "--data", str(data), "--out", str(out), "--model", "resnet18", "--stem", "cifar", "--epochs", "1",
        "--holdout", "2", "--val-every", "0", "--no-progress", "--device", "cpu", "--recipe", "fast",
        "--set", "batch_size=4", "--set", "train_size=16", "--set", "bf16=false", "--set", "channels_last=false",
        "--set", "skip_init=true"]) == 0
    seen = _sizes_seen(monkeypatch)
    assert main(["evaluate", "--runs", str(out / "resnet18"), "--data", str(data), "--sizes", "16", "24"]) == 0
    assert sorted(set(seen)) == [16, 24]
    metrics = json.loads((out / "resnet18" / "metrics.json").read_text())
    assert metrics["model"] == "resnet18" and metrics["seed"] == 0 and metrics["holdout_per_class"] == 2
    assert metrics["val_images"] == 9 and metrics["holdout_images"] == 6
    for s in (16, 24):
        wrong = unpack_mask(metrics[f"val_misses_{s}"], 9)
        assert metrics[f"val_top1_err_{s}"] == pytest.approx(100 * wrong.double().mean().item(), abs=0.01)
    # the held-out error picks the shipped input size: it is the run's model on exactly the
    # images --holdout 2 kept out of training, at each size
    from lgam.data import load_split, split_holdout
    from lgam.evaluate import load_run_model, misses

    model, held = load_run_model(out / "resnet18"), split_holdout(load_split(data, "train"), 2)[1]
    assert len(held) == 6
    val = load_split(data, "val")
    for s in (16, 24):
        want = round(100 * misses(model, held, s).double().mean().item(), 2)
        assert metrics[f"holdout_top1_err_{s}"] == want
        assert torch.equal(unpack_mask(metrics[f"val_misses_{s}"], 9), misses(model, val, s))
    _evaluate_runs_refusals(out / "resnet18", data, tmp_path, capsys)
    # a folder of class folders (data/train: no val/): its "val" would be the training images, so
    # the run gets its held-out errors only, the same images as above
    capsys.readouterr()
    assert main(["evaluate", "--runs", str(out / "resnet18"), "--data", str(data / "train"), "--sizes", "16", "24"]) == 0
    printed = capsys.readouterr()
    assert "held-out errors only" in printed.err and f"{out / 'resnet18'}: held-out 16 px" in printed.out
    flat = json.loads((out / "resnet18" / "metrics.json").read_text())
    assert flat["val_images"] == 0 and not [k for k in flat if k.startswith("val_") and k != "val_images"]
    assert [flat[f"holdout_top1_err_{s}"] for s in (16, 24)] == [metrics[f"holdout_top1_err_{s}"] for s in (16, 24)]
    import shutil

    no_holdout = tmp_path / "no_holdout"  # nothing to score it on: refused
    shutil.copytree(out / "resnet18", no_holdout)
    config = json.loads((no_holdout / "config.json").read_text())
    config["args"]["holdout"] = 0
    (no_holdout / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", "--runs", str(no_holdout), "--data", str(data / "train")]) == 2
    assert "a run without --holdout has no other images to be scored on" in capsys.readouterr().err


def test_evaluate_runs_holds_out_what_a_limited_run_held_out(tmp_path, monkeypatch):
    """A run trained with --limit held out images of its limited train split; --runs reloaded the
    full split and scored other images, some of them trained on."""
    import lgam.data
    import lgam.evaluate
    from lgam.cli import run_module

    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for name in CLASSES:
        for split, n in (("train", 8), ("val", 2)):
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    data / split / name / f"{i}.png")
    held = []
    real = lgam.data.split_holdout

    def recording(split, per_class):
        rest, out = real(split, per_class)
        held.append(out.images.clone())
        return rest, out

    monkeypatch.setattr(lgam.data, "split_holdout", recording)
    monkeypatch.setattr(lgam.evaluate, "split_holdout", recording)
    out = tmp_path / "run"
    assert run_module("lgam.train", [
        "--data", str(data), "--out", str(out), "--model", "resnet18", "--stem", "cifar", "--epochs", "1",
        "--holdout", "3", "--limit", str(5 * len(CLASSES)), "--val-every", "0", "--no-progress",
        "--device", "cpu", "--recipe", "fast", "--set", "batch_size=2", "--set", "train_size=16",
        "--set", "bf16=false", "--set", "channels_last=false"]) == 0
    assert run_module("lgam.evaluate", ["--runs", str(out / "resnet18"), "--data", str(data), "--sizes", "16"]) == 0
    assert len(held) == 2 and held[0].shape[0] == 3 * len(CLASSES)
    assert torch.equal(held[0], held[1]), "evaluate scored other images than the run held out"


def _evaluate_runs_refusals(run, data, tmp_path, capsys):
    """What ``--runs`` once let through: options it ignored (--limit scored every image, --out
    wrote nothing), an unfinished run (its numbers would enter Table 4), other classes (labels
    silently wrong), a folder that is no run (a traceback after decoding val): each now an error,
    exit 2, before any image is decoded; metrics.json is left as it was."""
    import json
    import shutil

    def refused(argv, message):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    before = (run / "metrics.json").read_bytes()
    args = ["evaluate", "--runs", str(run), "--data", str(data), "--sizes", "16"]
    refused(args + ["--limit", "2", "--out", str(tmp_path / "t.md")], "--limit, --out do not apply")
    refused(["evaluate", "--runs", str(tmp_path), "--data", str(data)], "not an lgam train run folder")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    config["recipe"]["epochs"] = 2
    (unfinished / "config.json").write_text(json.dumps(config))
    refused(["evaluate", "--runs", str(unfinished), "--data", str(data)], "has finished 1 of its 2 epochs")
    other = tmp_path / "other"
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            shutil.copytree(data / split / name, other / split / f"x{name}")
    refused(["evaluate", "--runs", str(run), "--data", str(other)], "the labels would not match")
    assert (run / "metrics.json").read_bytes() == before


def test_evaluate_runs_messages(tmp_path, capsys):
    from lgam.evaluate import _finished_run_config
    from lgam.errors import UsageError

    with pytest.raises(UsageError, match="not an lgam train run folder"):
        _finished_run_config(tmp_path)
    assert main(["evaluate", "--runs", str(tmp_path), "--data", str(tmp_path), "--limit", "3",
                 "--no-update"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: with --runs, --limit, --no-update do not apply") and "Traceback" not in err


def test_val_images_of_other_sizes_are_counted_and_named(setup, capsys):
    """A folder of mixed sizes is decoded to the first image's square, then resized again to each
    input size (the app resizes once): evaluate says so instead of silently differing."""
    data, ckpt = setup
    evaluate_checkpoints(ckpt, data, sizes=(16,), latency_reps=1, update=False)
    assert "note:" not in capsys.readouterr().err  # every image 20 x 20
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(data / "val" / "c" / "9.png")
    split = lgam.data.load_split(data, "val")
    assert split.resized == 1 and split.images.shape[-2:] == (20, 20)
    evaluate_checkpoints(ckpt, data, sizes=(16,), latency_reps=1, update=False)
    assert "note: 1 of 7 val images are not 20x20 px" in capsys.readouterr().err
