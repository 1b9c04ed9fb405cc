"""Checkpoints: float16 safetensors + manifest; sha256 and architecture checks; split files."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lgam
from lgam.checkpoints import (
    PART_LIMIT,
    CheckpointError, load_checkpoint, load_manifest, save_checkpoint, update_metrics,
)

CLASSES = [f"class{i}" for i in range(20)]


def _trained_like(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = lgam.create_model(name, num_classes=20)
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 64, 64))  # BN statistics away from their defaults
    return m.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = _trained_like("resnet18")
    entry = save_checkpoint(model, d, classes=CLASSES, input_size=224, recipe={"lr": 0.1}, seed=3,
                            epochs=2, metrics={"val_top1_err_224": 12.5})
    return d, model, entry


def test_round_trip_is_float16_close(saved):
    d, model, entry = saved
    loaded, e = load_checkpoint(d, "resnet18")
    assert not loaded.training and e == entry
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    assert ((loaded(x) - ref).norm() / ref.norm()).item() < 2e-3
    # exact against the float16-rounded weights
    half = lgam.create_model("resnet18", num_classes=20).eval()
    half.load_state_dict({k: v.half().float() if v.is_floating_point() and "running" not in k else v
                          for k, v in model.state_dict().items()})
    torch.testing.assert_close(loaded(x), half(x), rtol=0, atol=0)


def test_manifest_records_everything(saved):
    d, _, entry = saved
    m = load_manifest(d)["models"]["resnet18"]
    assert m["arch"] == "resnet18" and m["arch_kwargs"] == {"num_classes": 20, "stem": "imagenet"}
    assert m["classes"] == CLASSES and m["input_size"] == 224 and m["dtype"] == "float16"
    assert m["seed"] == 3 and m["epochs"] == 2 and m["recipe"] == {"lr": 0.1}
    assert m["metrics"] == {"val_top1_err_224": 12.5} and len(m["mean"]) == len(m["std"]) == 3
    assert set(m["sha256"]) == set(m["files"]) | {m["index"]}
    assert all(len(h) == 64 for h in m["sha256"].values())


def test_storage_dtypes_and_no_pickle(saved):
    d, _, entry = saved
    assert not [p for p in d.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".bin")]
    tensors = {}
    for f in entry["files"]:
        tensors.update(load_file(str(d / f)))
    assert tensors["conv1.weight"].dtype == torch.float16
    assert tensors["bn1.running_var"].dtype == torch.float32
    assert tensors["bn1.num_batches_tracked"].dtype == torch.int64


def test_large_checkpoint_is_split_and_loads_transparently(saved):
    d, _, entry = saved  # resnet18 in float16 is ~22 MB: parts of at most PART_LIMIT
    n = len(entry["files"])
    assert n >= 3 and entry["index"] == "resnet18.safetensors.index.json"
    assert entry["files"] == [f"resnet18-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all((d / f).stat().st_size <= PART_LIMIT < 10**7 for f in entry["files"])
    index = json.loads((d / entry["index"]).read_text())
    assert set(index["weight_map"].values()) == set(entry["files"])


def test_small_checkpoint_is_one_file_and_parts_follow_the_limit(tmp_path):
    small = lgam.create_model("resnext29_32x4d", num_classes=10)  # 4.8M params: ~9.2 MiB in fp16
    e = save_checkpoint(small, tmp_path, classes=[str(i) for i in range(10)], max_part_bytes=10 * 2**20)
    assert e["files"] == ["resnext29_32x4d.safetensors"] and e["index"] is None
    load_checkpoint(tmp_path, "resnext29_32x4d")
    big = lgam.create_model("resnet18", num_classes=20)
    e = save_checkpoint(big, tmp_path, "r18_parts", classes=CLASSES, max_part_bytes=5 * 2**20)
    assert len(e["files"]) == 5 and e["files"][-1] == "r18_parts-00005-of-00005.safetensors"
    assert all((tmp_path / f).stat().st_size <= 5 * 2**20 for f in e["files"])
    load_checkpoint(tmp_path, "r18_parts")
    with pytest.raises(CheckpointError, match="larger than a part"):
        save_checkpoint(big, tmp_path, "r18_tiny_parts", classes=CLASSES, max_part_bytes=2**20)
    assert set(load_manifest(tmp_path)["models"]) == {"resnext29_32x4d", "r18_parts"}


def test_saving_a_model_leaves_another_models_files_alone(tmp_path):
    """Saving "m" deleted every m-*-of-*.safetensors: the parts of a model saved as "m-ft" too.
    A model saved again in another number of parts keeps only the new files, once the manifest
    names them (a stale index was left when parts became one file)."""
    model = lgam.create_model("resnet18", num_classes=20)
    save_checkpoint(model, tmp_path, "m-ft", classes=CLASSES, max_part_bytes=5 * 2**20)
    save_checkpoint(model, tmp_path, "m", classes=CLASSES, max_part_bytes=5 * 2**20)
    e = save_checkpoint(model, tmp_path, "m", classes=CLASSES, max_part_bytes=10 * 2**20)
    load_checkpoint(tmp_path, "m-ft")
    load_checkpoint(tmp_path, "m")
    own = sorted(f.name for f in tmp_path.iterdir() if f.name.startswith("m-0") or f.name.startswith("m."))
    assert own == sorted([*e["files"], e["index"]]) and len(e["files"]) == 3
    e = save_checkpoint(model, tmp_path, "m", classes=CLASSES, max_part_bytes=100 * 2**20)
    assert e["files"] == ["m.safetensors"] and e["index"] is None and not (tmp_path / "m.safetensors.index.json").exists()
    assert not list(tmp_path.glob("m-0*")) and len(list(tmp_path.glob("m-ft-*"))) == 5


def test_tampered_file_is_rejected(saved, tmp_path):
    d, model, _ = saved
    part = tmp_path / save_checkpoint(model, tmp_path, classes=CLASSES)["files"][-1]
    data = bytearray(part.read_bytes())
    data[-10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(tmp_path, "resnet18")


def test_missing_file_unknown_name_and_bad_manifest(saved, tmp_path):
    d, model, _ = saved
    first = save_checkpoint(model, tmp_path, classes=CLASSES)["files"][0]
    with pytest.raises(CheckpointError, match=r"no model 'resnet18_se' .* it has \['resnet18'\]"):
        load_checkpoint(tmp_path, "resnet18_se")
    (tmp_path / first).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(tmp_path, "resnet18")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="manifest.json is a file: give the folder that holds manifest.json"):
        load_manifest(tmp_path / "manifest.json")  # told to pass it as --checkpoints-dir before


def _save_with_edited_entry(model, directory, edit) -> None:
    save_checkpoint(model, directory, classes=CLASSES)
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest["models"]["resnet18"])
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_architecture_mismatch_is_reported(saved, tmp_path):
    _save_with_edited_entry(saved[1], tmp_path, lambda e: e.update(arch="resnet18_se"))
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        load_checkpoint(tmp_path, "resnet18")


@pytest.mark.parametrize("field,value", [("input_size", "160px"), ("input_size", 0), ("input_size", None),
                                         ("input_size", True), ("mean", [0.5, 0.5]), ("std", [0.2, 0, 0.2]),
                                         ("mean", "0.5"), ("std", [0.2, float("nan"), 0.2])])
def test_preprocessing_fields_are_checked_when_the_model_loads(saved, tmp_path, field, value):
    """A hand-edited input size or normalisation made the app exit at start-up with a traceback
    (its warm-up preprocesses for every model outside the per-model error handling): it is this
    model's CheckpointError, so only this model becomes unavailable."""
    _save_with_edited_entry(saved[1], tmp_path, lambda e: e.update({field: value}))
    with pytest.raises(CheckpointError, match=f"resnet18: manifest field {field} must be"):
        load_checkpoint(tmp_path, "resnet18")


def test_manifest_cannot_point_outside_its_folder(saved, tmp_path):
    _save_with_edited_entry(saved[1], tmp_path,
                            lambda e: e["sha256"].update({"../../etc/passwd": "0" * 64}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_checkpoint(tmp_path, "resnet18")


def test_update_metrics_and_bad_save_arguments(saved, tmp_path):
    d, model, _ = saved
    save_checkpoint(model, tmp_path, classes=CLASSES)
    update_metrics(tmp_path, "resnet18", {"val_top1_err_160": 20.0})
    assert load_manifest(tmp_path)["models"]["resnet18"]["metrics"] == {"val_top1_err_160": 20.0}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["models"]["resnet18"]["metrics"]  # a hand-written entry: update_metrics raised KeyError
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    update_metrics(tmp_path, "resnet18", {"val_top1_err_160": 19.0})
    assert load_manifest(tmp_path)["models"]["resnet18"]["metrics"] == {"val_top1_err_160": 19.0}
    with pytest.raises(CheckpointError, match="3 class names given for a model with 20 classes"):
        save_checkpoint(model, tmp_path, classes=["a", "b", "c"])
    with pytest.raises(CheckpointError, match="lgam.create_model"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path, classes=CLASSES)
    before = sorted(tmp_path.iterdir())
    for bad in ("../escape", "sub/name", "sub\\name", ".hidden"):
        with pytest.raises(CheckpointError, match="must be a plain file name"):
            save_checkpoint(model, tmp_path, bad, classes=CLASSES)
    assert sorted(tmp_path.iterdir()) == before  # refused before anything was written
    assert not list(tmp_path.parent.glob("escape*"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask, monkeypatch):
    """Atomic writes (mkstemp makes 0600 files) end with the mode a plain open() would give, so a
    container user can read a mounted checkpoints folder."""
    import lgam._fileio as fileio

    old = os.umask(umask)
    try:
        monkeypatch.setattr(fileio, "FILE_MODE", fileio._file_mode())
        model = lgam.create_model("resnet18", num_classes=len(CLASSES))
        entry = save_checkpoint(model, tmp_path, classes=CLASSES)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in [*entry["sha256"], "manifest.json"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_permission_problems_are_named_as_such(saved, monkeypatch):
    d, _, entry = saved
    real_read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(CheckpointError, match=r"permission denied reading .*manifest\.json \(mode \d+, owner uid"):
        load_manifest(d)
    monkeypatch.undo()
    real_open = open

    def denied_open(path, *args, **kwargs):
        if str(path).endswith(entry["files"][0]):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied_open)
    with pytest.raises(CheckpointError, match="permission denied reading .*-00001-of-"):
        load_checkpoint(d, "resnet18")
