"""Data: ImageFolder, tar shards and CIFAR give the same decoded tensors; errors name the file."""
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lgam.data as D

WNIDS = ["n001", "n002", "n003"]


def _image(cls: int, i: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(cls * 100 + i)
    a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    a[..., cls] += 150  # class-dependent colour
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for split, n in (("train", 4), ("val", 2)):
        for c, w in enumerate(WNIDS):
            d = root / split / w
            d.mkdir(parents=True)
            for i in range(n):
                _image(c, i + (10 if split == "val" else 0)).save(d / f"img{i}.png")
    (root / "classes.tsv").write_text(
        "index\twnid\tname\tsource\n" + "".join(f"{i}\t{w}\tname {w}\tx\n" for i, w in enumerate(WNIDS)))
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    """The same tree as two gzipped shards per split, members round-robin like the shared data."""
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        files = sorted((folder / split).rglob("*.png"))
        for k in range(2):
            with tarfile.open(out / f"{split}-0{k}-of-02.tar.gz", "w:gz") as tar:
                for f in files[k::2]:
                    tar.add(f, arcname=f"{split}/{f.parent.name}/{f.name}")
    (out / "classes.tsv").write_text((folder / "classes.tsv").read_text())
    return out


@pytest.mark.parametrize("split, n", [("train", 12), ("val", 6)])
def test_imagefolder_and_tar_give_identical_tensors(folder, shards, split, n):
    a = D.load_split(folder, split)
    b = D.load_split(shards, split)
    c = D.load_split(sorted(shards.glob(f"{split}-*.tar.gz")), split)
    assert a.images.shape == (n, 3, 16, 16) and a.images.dtype == torch.uint8
    for other in (b, c):
        assert torch.equal(a.images, other.images) and torch.equal(a.labels, other.labels)
    assert a.classes == ["name n001", "name n002", "name n003"] and a.wnids == WNIDS
    assert a.labels.tolist() == sorted(a.labels.tolist())
    # labels follow the folder: the class's colour channel dominates
    assert torch.equal(a.images.float().mean((2, 3)).argmax(1), a.labels)


def test_labels_agree_across_splits_when_one_split_lacks_a_class(tmp_path):
    for split, classes in (("train", WNIDS), ("val", WNIDS[1:])):
        for c, w in enumerate(WNIDS):
            if w in classes:
                (tmp_path / split / w).mkdir(parents=True)
                _image(c, 0).save(tmp_path / split / w / "a.png")
    val = D.load_split(tmp_path, "val")
    assert val.wnids == WNIDS and val.labels.tolist() == [1, 2]


def _flat(root: Path, wnids=WNIDS) -> Path:
    for c, w in enumerate(wnids):
        (root / w).mkdir(parents=True)
        _image(c, 0).save(root / w / "a.png")
    return root


def test_a_folder_of_class_folders_is_every_split_and_says_so(tmp_path):
    """ROOT/<class>/<image> gives the same images to every split (evaluating on such a folder is
    fine; training's validation on it is refused by lgam train: test_train); a root with only
    train/ gave val one class called "train", and one with only val/ gave train one called "val"."""
    flat = _flat(tmp_path / "flat")
    assert D.is_flat_tree(flat)
    assert D.load_split(flat, "train").wnids == D.load_split(flat, "val").wnids == WNIDS
    only_train = _flat(tmp_path / "only_train" / "train")
    assert not D.is_flat_tree(only_train.parent)
    with pytest.raises(D.DataError, match="no 'val' data"):
        D.load_split(only_train.parent, "val")
    only_val = _flat(tmp_path / "only_val" / "val")
    with pytest.raises(D.DataError, match="no 'train' data"):
        D.load_split(only_val.parent, "train")


def test_dot_files_and_folders_are_not_classes_or_images(tmp_path):
    """An empty .ipynb_checkpoints became a class (every label shifted by one); macOS's ._a.png
    in a tar stopped the load."""
    root = _flat(tmp_path / "d" / "train")
    (root / ".ipynb_checkpoints").mkdir()
    (root / WNIDS[0] / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    with tarfile.open(tmp_path / "train-00.tar", "w") as tar:
        for f in sorted(root.rglob("*")):
            tar.add(f, arcname=f"train/{f.relative_to(root).as_posix()}", recursive=False)
    (tmp_path / "dotted").mkdir()
    with tarfile.open(tmp_path / "dotted" / "train-00.tar", "w") as tar:  # made from a dot-folder
        for f in sorted(root.rglob("*")):
            tar.add(f, arcname=f".data/train/{f.relative_to(root).as_posix()}", recursive=False)
    for source in (root.parent, tmp_path / "train-00.tar", tmp_path / "dotted" / "train-00.tar"):
        split = D.load_split(source, "train")
        assert split.wnids == WNIDS and len(split) == 3, source


def test_a_nested_folder_below_a_class_is_read_from_a_tar_as_from_a_folder(tmp_path):
    """Folders read class/sub/image (rglob); a shard skipped it without a word."""
    root = _flat(tmp_path / "d" / "train")
    (root / WNIDS[1] / "more").mkdir()
    _image(1, 5).save(root / WNIDS[1] / "more" / "b.png")
    with tarfile.open(tmp_path / "train-00.tar", "w") as tar:
        for f in sorted(root.rglob("*.png")):
            tar.add(f, arcname=f"train/{f.relative_to(root).as_posix()}")
    a, b = D.load_split(root.parent, "train"), D.load_split(tmp_path / "train-00.tar", "train")
    assert len(a) == len(b) == 4 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_skip_corrupt_also_skips_an_unreadable_first_image(tmp_path):
    """Without a size the first image sets it; when it was unreadable the load stopped, skipping on."""
    root = _flat(tmp_path / "d" / "train")
    (root / WNIDS[0] / "0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(D.DataError, match="0_broken.png.*--skip-corrupt"):
        D.load_split(root.parent, "train")
    split = D.load_split(root.parent, "train", skip_corrupt=True)
    assert len(split) == 3 and split.images.shape[-1] == 16


def test_training_images_are_decoded_as_the_app_decodes_an_upload(tmp_path):
    """A phone photo's EXIF rotation, a PNG's alpha and a 16-bit PNG were read by a bare
    ``convert("RGB")``: sideways, alpha dropped (black where transparent), 16-bit values clipped,
    so a model trained on other pixels than the app then showed it."""
    from lgam.imageio import load_image

    d = tmp_path / "data" / "train" / WNIDS[0]
    d.mkdir(parents=True)
    wide = _image(0, 1, 24).crop((0, 0, 24, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    wide.save(d / "a_rotated.jpg", exif=exif, quality=95)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3] = 200, 255  # red on top, the bottom half transparent
    Image.fromarray(rgba, "RGBA").save(d / "b_alpha.png")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(d / "c_sixteen.png")
    files = sorted(d.iterdir())
    got = D.load_split(tmp_path / "data", "train", size=16).images
    for i, f in enumerate(files):
        want = load_image(f).resize((16, 16), Image.BILINEAR, reducing_gap=None)
        np.testing.assert_array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(want), err_msg=f.name)
    assert (got[1, :, 12:] == 255).all() and (got[2] == round(40000 / 257)).all()


def test_size_limit_and_spread(folder):
    s = D.load_split(folder, "train", size=8, limit=6)
    assert s.images.shape == (6, 3, 8, 8) and s.labels.bincount().tolist() == [2, 2, 2]


def test_corrupt_image_is_named_or_skipped(folder, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "train" / WNIDS[1] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(D.DataError, match="broken.png"):
        D.load_split(root, "train")
    s = D.load_split(root, "train", skip_corrupt=True)
    assert len(s) == 12 and len(s.skipped) == 1 and s.skipped[0].endswith("broken.png")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_split(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no 'train' data"):
        D.load_split(tmp_path / "empty")
    with pytest.raises(D.DataError, match="shard files not found"):
        D.load_split([tmp_path / "x.tar.gz"])


def _cifar_dir(root: Path, hundred: bool) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    labels = [i % 4 for i in range(10)]
    dump = lambda obj, p: p.write_bytes(pickle.dumps(obj))  # noqa: E731
    if hundred:
        d = root / "cifar-100-python"
        d.mkdir()
        dump({"fine_label_names": [f"c{i}" for i in range(4)]}, d / "meta")
        dump({"data": data, "fine_labels": labels}, d / "train")
        dump({"data": data[:4], "fine_labels": labels[:4]}, d / "test")
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir()
        dump({"label_names": [f"c{i}" for i in range(4)]}, d / "batches.meta")
        dump({"data": data[:6], "labels": labels[:6]}, d / "data_batch_1")
        dump({"data": data[6:], "labels": labels[6:]}, d / "data_batch_2")
        dump({"data": data[:4], "labels": labels[:4]}, d / "test_batch")
    return data, labels


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_format(tmp_path, hundred):
    data, labels = _cifar_dir(tmp_path, hundred)
    s = D.load_split(tmp_path, "train")
    assert torch.equal(s.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert s.labels.tolist() == labels and s.classes == ["c0", "c1", "c2", "c3"]
    assert len(D.load_split(tmp_path, "val")) == 4


def test_cifar_reader_refuses_arbitrary_pickles(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": [Path("x")]}))
    with pytest.raises(D.DataError, match="is not allowed"):
        D.load_split(tmp_path)


def test_device_augment_is_seeded_and_crops_correctly():
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    aug = D.DeviceAugment(24)
    a = aug(imgs, torch.Generator().manual_seed(1))
    b = aug(imgs, torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 24, 24) and torch.equal(a, b)
    assert not torch.equal(a, aug(imgs, torch.Generator().manual_seed(2)))
    # full-image crop at the same size is the image itself or its mirror, each about half the time
    many = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    full = D.DeviceAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(many, torch.Generator().manual_seed(0))
    ref = D.resize_normalize(many, 32)
    flipped = 0
    for i in range(64):
        same = torch.allclose(full[i], ref[i], atol=1e-4)
        assert same or torch.allclose(full[i], ref[i].flip(-1), atol=1e-4)
        flipped += not same
    assert 16 <= flipped <= 48  # a binomial(64, 1/2): outside this once in ~41,000 seeds
    ev = D.DeviceAugment(16, train=False)(imgs)
    torch.testing.assert_close(ev, D.resize_normalize(imgs, 16))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_preprocess_any_mode_matches_the_tensor_path(mode):
    """Any mode as the app's loader reads it (lgam.imageio.load_image), then the tensor path."""
    from lgam.imageio import load_image

    img = _image(0, 0, 40).convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(1600).reshape(40, 40) * 40).astype(np.uint16))
    x = D.preprocess([img, Image.new("RGB", (1, 1))], 24)
    assert x.shape == (2, 3, 24, 24) and torch.isfinite(x).all()
    t = torch.from_numpy(np.array(load_image(img))).permute(2, 0, 1)[None]
    torch.testing.assert_close(x[:1], D.resize_normalize(t, 24))


def test_preprocess_scales_16_bit_and_puts_alpha_on_white():
    """convert("RGB") clipped 16-bit values at 255 and dropped alpha (black where transparent)."""
    sixteen = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    clear = Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA")  # fully transparent black
    x = D.preprocess([sixteen, clear], 8, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(x[0], torch.full((3, 8, 8), round(40000 / 257) / 255))  # [0, 1] scale
    torch.testing.assert_close(x[1], torch.ones(3, 8, 8))


def test_preprocess_takes_one_image_and_names_what_it_cannot():
    from lgam.data import preprocess

    img = Image.new("RGB", (40, 30), (10, 200, 30))
    assert torch.equal(preprocess(img, 16), preprocess([img], 16))
    with pytest.raises(TypeError, match="preprocess takes PIL images, got a Tensor: .*resize_normalize"):
        preprocess([torch.zeros(3, 8, 8)], 16)
    with pytest.raises(ValueError, match="at least one image"):
        preprocess([], 16)


@pytest.mark.parametrize("size", [(20000, 10), (10, 20000), (3000, 2000)])
def test_preprocess_reduces_each_long_side_before_the_float_copy(monkeypatch, size):
    """Only the uint8 image reaches full size: a strip is reduced along its long side too (it was
    left whole because its short side was short), and what the resize gets is the box-filtered
    image (within 4x the target a side)."""
    seen = []
    real = D.resize_normalize
    monkeypatch.setattr(D, "resize_normalize", lambda t, *a, **k: seen.append(t.shape) or real(t, *a, **k))
    img = Image.new("RGB", size, (90, 120, 30))
    x = D.preprocess([img], 32)
    assert x.shape == (1, 3, 32, 32)
    (_, _, h, w), = seen
    assert w <= 4 * 32 and h <= 4 * 32
    torch.testing.assert_close(x, real(torch.from_numpy(np.array(img.reduce(
        tuple(max(1, s // 64) for s in size)))).permute(2, 0, 1)[None], 32))


def test_extract_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(D.DataError, match="unsafe member"):
        D.extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_fetch_downloads_extracts_and_loads(tmp_path, monkeypatch):
    """The real download path, against a file:// URL of an archive the test builds."""
    src = tmp_path / "src"
    src.mkdir()
    _cifar_dir(src, hundred=False)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(D.DATASETS, "cifar10", (archive.as_uri(), "cifar-10-python.tar.gz"))
    folder = D.fetch("cifar10", tmp_path / "data")
    assert folder == tmp_path / "data" / "cifar-10-batches-py"
    assert len(D.load_split(folder, "train")) == 10
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.fetch("mnist", tmp_path)


def test_shared_imagenet20_val_shard(imagenet20_dir):
    s = D.load_split([imagenet20_dir / "val-00-of-02.tar.gz"], "val", limit=60)
    wnids, names = D.read_classes_tsv(imagenet20_dir / "classes.tsv")
    assert s.classes == names and s.wnids == wnids and s.images.shape[1:] == (3, 224, 224)
    assert s.labels.bincount(minlength=20).min() >= 1  # spread over all 20 classes


def test_sample_writes_images_spread_over_classes(shards, tmp_path, capsys):
    files = D.sample(shards, tmp_path / "s", n=3, split="val", max_size=8)
    assert [f.name[:3] for f in files] == ["00_", "01_", "02_"]
    names = {f.name[3:] for f in files}
    assert len(names) == 3 and all(n.startswith("name_") for n in names)  # three classes, by name
    assert all(max(Image.open(f).size) <= 8 for f in files)
    assert D.main(["sample", str(shards), "--out", str(tmp_path / "cli"), "-n", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert D.main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "data error" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_load_split_check_sees_each_class_count_before_decoding(source, folder, shards, monkeypatch):
    seen = []
    data = folder if source == "folder" else shards
    D.load_split(data, "train", check=seen.append)
    assert seen == [{w: 4 for w in WNIDS}]  # class ids (unique; display names may repeat), label order
    D.load_split(data, "train", limit=5, check=seen.append)
    assert list(seen[1].values()) == [2, 1, 2]  # after --limit's even spread
    monkeypatch.setattr(D, "_decode", lambda *_: pytest.fail("decoded before the check refused"))
    with pytest.raises(D.DataError, match="cannot hold out 4"):
        D.load_split(data, "train", check=lambda counts: D.check_holdout(counts, 4))


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_image_groups_follow_load_splits_order_without_decoding(source, folder, shards, tmp_path, monkeypatch):
    data = tmp_path / source
    if source == "folder":
        (data / "val").mkdir(parents=True)
        for w in WNIDS:
            (data / "val" / w).symlink_to(folder / "val" / w)
    else:
        data.mkdir()
        for f in shards.glob("val-*.tar.gz"):
            (data / f.name).symlink_to(f)
    # the index order differs from the sorted wnids: the labels, and so the groups, follow the index
    (data / "classes.tsv").write_text("index\twnid\tname\tsource\n0\tn003\tc\tdogs\n1\tn001\ta\tthings\n"
                                      "2\tn002\tb\tdogs\n")
    labels = D.load_split(data, "val").labels.tolist()
    by_label = D.read_classes_column(data / "classes.tsv", "source")
    assert by_label == ["dogs", "things", "dogs"]
    monkeypatch.setattr(D, "_decode", lambda *_: pytest.fail("image_groups decoded an image"))
    groups = D.image_groups(data, "val", "source")
    assert groups == [by_label[k] for k in labels] == ["dogs"] * 2 + ["things"] * 2 + ["dogs"] * 2
    assert D.image_groups(data, "val", "name") == ["c", "c", "a", "a", "b", "b"]
    with pytest.raises(D.DataError, match="no column 'breed'; its columns: index, wnid, name, source"):
        D.image_groups(data, "val", "breed")
    (data / "classes.tsv").unlink()
    with pytest.raises(D.DataError, match="no classes.tsv beside"):
        D.image_groups(data, "val", "source")


@pytest.mark.parametrize("text, message", [
    ("", "expected a header"),
    ("index\twnid\tname\n0\tn001\ta\n0\tn002\tb\n", "indices must be 0..1"),
    ("index\twnid\tname\nzero\tn001\ta\n", "not a whole number"),
    ("index\twnid\tname\n0\tn001\ta\n1\tn001\tb\n", "a wnid is listed twice"),
])
def test_a_malformed_classes_tsv_is_a_data_error(tmp_path, text, message):
    tsv = tmp_path / "classes.tsv"
    tsv.write_text(text)
    with pytest.raises(D.DataError, match=message):
        D.read_classes_column(tsv, "name")


def test_a_classes_tsv_row_short_of_the_header_is_named(tmp_path):
    tsv = tmp_path / "classes.tsv"
    tsv.write_text("index\twnid\tname\tsource\n0\tn001\ta\tx\n1\tn002\tb\n")
    assert D.read_classes_tsv(tsv) == (["n001", "n002"], ["a", "b"])
    with pytest.raises(D.DataError, match="fewer fields than the header"):
        D.read_classes_column(tsv, "source")


def test_holdout_checks_every_class_when_two_share_a_display_name():
    """ImageNet has two 'crane' classes: counted by name, the first one's 2 images were hidden by
    the second's 10, and holding out 3 emptied it without a word."""
    split = D.DecodedSplit(torch.zeros(22, 3, 2, 2, dtype=torch.uint8), torch.tensor([0] * 2 + [1] * 10 + [2] * 10),
                           ["crane", "crane", "dog"], ["n02012849", "n03126707", "n02084071"])
    with pytest.raises(D.DataError, match="class 'n02012849' has 2 images: cannot hold out 3"):
        D.split_holdout(split, 3)


def test_split_holdout_sets_aside_the_same_images_per_class(folder):
    full = D.load_split(folder, "train")
    rest, held = D.split_holdout(full, 1)
    assert held.labels.bincount().tolist() == [1, 1, 1] and rest.labels.bincount().tolist() == [3, 3, 3]
    assert rest.classes == held.classes == full.classes and rest.wnids == full.wnids
    # disjoint and complete: every image lands in exactly one part
    keys = lambda s: {t.numpy().tobytes() for t in s.images}
    assert keys(rest).isdisjoint(keys(held)) and keys(rest) | keys(held) == keys(full)
    again = D.split_holdout(D.load_split(folder, "train"), 1)[1]  # data alone decides, not a seed
    assert torch.equal(again.images, held.images)
    rest0, held0 = D.split_holdout(full, 0)
    assert len(held0) == 0 and torch.equal(rest0.images, full.images)
    with pytest.raises(D.DataError, match="cannot hold out 4"):
        D.split_holdout(full, 4)
    with pytest.raises(D.DataError, match=">= 0"):
        D.split_holdout(full, -1)


def test_holding_out_nothing_keeps_the_images_where_they_are(folder):
    """split_holdout(split, 0) copied the whole tensor with a mask (1.4 GB for ImageNet-20's
    training images at 160 px)."""
    split = D.load_split(folder, "train")
    rest, held = D.split_holdout(split, 0)
    assert rest.images.data_ptr() == split.images.data_ptr() and len(rest) == 12 and len(held) == 0


def test_images_are_decoded_into_one_tensor_in_file_order(folder, monkeypatch):
    """Decoded straight into the final tensor (no list of arrays stacked after): the same images
    in the same order whatever order the worker threads finish in."""
    original = D._decode
    done = []

    def slow_first(sample, size):  # the first image finishes last
        if not done:
            done.append(sample.name)
            import time
            time.sleep(0.2)
        return original(sample, size)

    want = D.load_split(folder, "train", workers=1)
    monkeypatch.setattr(D, "_decode", slow_first)
    got = D.load_split(folder, "train", workers=4)
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert got.images.is_contiguous()


def test_shards_are_checked_against_sha256sums(shards, tmp_path):
    """A truncated plain tar reads as a shorter archive: its missing images went unnoticed. The
    shared data ships SHA256SUMS; a shard that does not match it is refused before reading."""
    import hashlib
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shards, root)
    names = sorted(p.name for p in root.glob("*.tar.gz"))
    sums = "".join(f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    (root / D.CHECKSUMS).write_text(sums.replace("  val-01", " *val-01"))  # sha256sum -b's form too
    assert len(D.load_split(root, "train")) == 12 and len(D.load_split(root, "val")) == 6
    damaged = root / "val-01-of-02.tar.gz"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert len(D.load_split(root, "train")) == 12  # another split's shard is not read, nor checked
    for source in (root, sorted(root.glob("val-*.tar.gz"))):
        with pytest.raises(D.DataError, match=r"val-01-of-02.tar.gz does not match .*SHA256SUMS"):
            D.load_split(source, "val")


def test_a_shard_that_sha256sums_lists_must_be_there(shards, tmp_path):
    """A deleted shard only meant fewer images; lines naming a path (./x, data/x) matched nothing."""
    import hashlib
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shards, root)
    names = sorted(p.name for p in root.glob("*.tar.gz"))
    (root / D.CHECKSUMS).write_text("".join(
        f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  ./{n}\n" for n in names))
    (root / "val-01-of-02.tar.gz").write_bytes(b"damaged")
    with pytest.raises(D.DataError, match="val-01-of-02.tar.gz does not match"):
        D.load_split(root, "val")
    (root / "val-01-of-02.tar.gz").unlink()
    with pytest.raises(D.DataError, match=r"lists \['val-01-of-02.tar.gz'\], which .* lacks"):
        D.load_split(root, "val")
    assert len(D.load_split(root, "train")) == 12
