"""Datasets as decoded uint8 tensors, device-side augmentation, and the one preprocessing path.

Sources :func:`load_split` reads (every image decoded once into a ``(N, 3, S, S)`` uint8 tensor):

- an ImageFolder tree: ``ROOT/<split>/<class>/<image>`` (or ``ROOT/<class>/<image>``, the same
  images for every split: :func:`is_flat_tree`, which ``lgam train`` refuses to validate on);
- gzipped or plain tar shards holding ``<split>/<class>/<image>`` members: a folder of
  ``<split>-*.tar.gz`` shards (the layout of ``shared/data/imagenet20``) or a list of shard paths;
  dot-files and dot-folders (``.ipynb_checkpoints``, macOS's ``._*``) are left out of both; shards
  with a ``SHA256SUMS`` beside them are checked against it before they are read;
- torchvision's CIFAR-10/100 python format (``cifar-10-batches-py``, ``cifar-100-python``).

Class order is the sorted class-folder (wnid) order, the same for every split; a ``classes.tsv``
(``index wnid name ...``) beside the data fixes the order and gives display names. A corrupt image
raises :class:`DataError` naming the file, or is skipped and listed with ``skip_corrupt=True``.

:func:`preprocess` (PIL images -> normalised batch) is what the app uses; ``lgam evaluate`` and
training's validation resize the decoded tensors with :func:`resize_normalize`, the same
computation when the images are decoded at their own size (every ImageNet-20 val image is
224x224; images of mixed sizes are first decoded to one size, the first image's or
``--decode-size``). :class:`DeviceAugment` does random-resized-crop + flip + normalise on the
tensor's device.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import pickle
import sys
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import LgamError
from .imageio import load_image, to_rgb

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DataError", "DecodedSplit", "load_split", "DeviceAugment",
    "preprocess", "resize_normalize", "read_classes_tsv", "fetch", "DATASETS", "split_holdout",
    "check_holdout", "read_classes_column", "image_groups", "check_sums", "CHECKSUMS", "is_flat_tree",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}


class DataError(LgamError, ValueError):
    """Unreadable data: the message names the file or folder and what is wrong."""


@dataclass
class DecodedSplit:
    """A split decoded once: ``images (N, 3, S, S)`` uint8, ``labels (N,)`` int64."""

    images: Tensor
    labels: Tensor
    classes: list[str]  # display names, index = label
    wnids: list[str]  # folder names / ids, index = label
    skipped: list[str] = field(default_factory=list)  # unreadable files (skip_corrupt=True)
    # images not stored at S x S, resized to it by load_split (split_holdout's parts do not keep it)
    resized: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_ids(self) -> list[str]:
        """What fixes the labels: the folder ids (``wnids``), else the display names."""
        return list(self.wnids or self.classes)


# ------------------------------------------------------------------------------------------------
# class lists


def read_classes_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """``(wnids, names)`` from a ``classes.tsv`` with a header ``index wnid name ...``."""
    wnids, names = _read_classes_columns(path, "wnid", "name")
    return wnids, names


def read_classes_column(path: str | Path, column: str) -> list[str]:
    """One column of a ``classes.tsv`` (header ``index wnid name ...``, e.g. ``source``), in index
    order: ``[value of class 0, value of class 1, ...]``."""
    return _read_classes_columns(path, column)[0]


def _read_classes_columns(path: str | Path, *columns: str) -> list[list[str]]:
    """Several columns of a ``classes.tsv`` from one read, each in index order (checked as above)."""
    rows = [line.rstrip("\n").split("\t") for line in Path(path).read_text().splitlines() if line.strip()]
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    try:
        i_idx, i_wnid, i_name = header.index("index"), header.index("wnid"), header.index("name")
    except ValueError:
        raise DataError(f"{path}: expected a header with columns index, wnid, name; got {header}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r}; its columns: {', '.join(header)}")
    i_cols = [header.index(c) for c in columns]
    if any(len(r) <= max(i_idx, i_wnid, i_name, *i_cols) for r in body):
        raise DataError(f"{path}: a row has fewer fields than the header {header}")
    if not all(r[i_idx].isdigit() for r in body):
        raise DataError(f"{path}: an index is not a whole number: {[r[i_idx] for r in body][:5]}")
    body.sort(key=lambda r: int(r[i_idx]))
    if [int(r[i_idx]) for r in body] != list(range(len(body))):
        raise DataError(f"{path}: indices must be 0..{len(body) - 1}")
    if len({r[i_wnid] for r in body}) != len(body):
        raise DataError(f"{path}: a wnid is listed twice")
    return [[r[i] for r in body] for i in i_cols]


def _class_list(found: Iterable[str], tsv: Path | None) -> tuple[list[str], list[str]]:
    found = sorted(set(found))
    if tsv is None or not tsv.is_file():
        return found, found
    wnids, names = read_classes_tsv(tsv)
    unknown = sorted(set(found) - set(wnids))
    if unknown:
        raise DataError(f"class folders {unknown[:5]} are not in {tsv}")
    return wnids, names


# ------------------------------------------------------------------------------------------------
# sources -> (name, bytes-reader, wnid) samples


@dataclass
class _Sample:
    name: str  # shown in errors
    wnid: str
    read: Callable[[], bytes]
    key: str  # "<class>/<file>": the order within a class, the same for folders and shards


def _is_shard(p: Path) -> bool:
    return p.name.endswith((".tar", ".tar.gz", ".tgz"))


#: every split folder name: a member under another split's folder is not this split's
_SPLIT_FOLDERS = frozenset(a for aliases in SPLIT_ALIASES.values() for a in aliases)


def _hidden(parts: Sequence[str]) -> bool:
    """A dot-file or dot-folder (``.ipynb_checkpoints``, macOS's ``._photo.jpg`` in a tar)."""
    return any(part.startswith(".") and part not in (".", "..") for part in parts)


def _member_class(parts: Sequence[str], wanted: Sequence[str]) -> tuple[str, str] | None:
    """``(class, key)`` of a tar member under ``SPLIT/<class>/...`` (any depth below the class, as
    a folder's), or under ``<class>/<image>`` when its path has no split folder; ``None`` when it
    is another split's."""
    for i, part in enumerate(parts[:-2]):
        if part in _SPLIT_FOLDERS:
            return (parts[i + 1], "/".join(parts[i + 1:])) if part in wanted else None
    return parts[-2], "/".join(parts[-2:])


def _tar_samples(shards: Sequence[Path], split: str) -> list[_Sample]:
    """All ``<split>/<class>/<image>`` members (``<class>/<image>`` when the shard has no split
    folder; dot-files left out); the bytes are read eagerly, once, since gzip streams cannot seek
    cheaply."""
    samples = []
    wanted = SPLIT_ALIASES.get(split, (split,))
    for shard in shards:
        try:
            with tarfile.open(shard, "r:*") as tar:
                for m in tar:
                    parts = Path(m.name).parts
                    if not m.isfile() or not m.name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    if len(parts) < 2:
                        raise DataError(f"{shard}: member {m.name} is not inside a class folder")
                    found = _member_class(parts, wanted)
                    if found is None or _hidden(found[1].split("/")):  # from the class folder down
                        continue
                    f = tar.extractfile(m)
                    data = f.read() if f else b""
                    samples.append(_Sample(f"{shard.name}:{m.name}", found[0], lambda d=data: d, found[1]))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read tar shard {shard}: {e}") from e
    return samples


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not _hidden([p.name]))


def _folder_samples(root: Path) -> list[_Sample]:
    samples = []
    for cls in _class_folders(root):
        for f in sorted(cls.rglob("*")):
            rel = f.relative_to(root)
            if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(rel.parts):
                samples.append(_Sample(str(f), cls.name, f.read_bytes, rel.as_posix()))
    return samples


#: beside shards: ``<sha256>  <file name>`` per line (``sha256sum``'s output), checked before reading
CHECKSUMS = "SHA256SUMS"


def check_sums(files: Sequence[Path]) -> None:
    """:class:`DataError` for a file whose SHA-256 differs from its line in the ``SHA256SUMS``
    beside it (files without one, or without a line in it, are not checked): a truncated plain
    tar otherwise reads as a shorter archive, and its missing images go unnoticed."""
    for folder in {f.parent for f in files}:
        sums = folder / CHECKSUMS
        if not sums.is_file():
            continue
        expected = _read_sums(sums)
        for f in files:
            want = expected.get(f.name)
            if f.parent == folder and want is not None:
                got = _sha256(f)
                if got != want.strip().lower():
                    raise DataError(f"{f} does not match {sums} (sha256 {got[:12]}..., expected "
                                    f"{want.strip()[:12]}...): the file is damaged or another version; "
                                    "download it again")


def _read_sums(sums: Path) -> dict[str, str]:
    """``SHA256SUMS``: file name (its last part; ``sha256sum -b``'s ``*`` dropped) -> hash."""
    expected = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if digest and name:
            expected[PurePosixPath(name).name] = digest.lower()
    return expected


def _missing_listed_shards(root: Path, split: str) -> list[str]:
    """The shards of ``split`` that ``root``'s ``SHA256SUMS`` lists and the folder lacks: a
    deleted shard otherwise only means fewer images."""
    sums = root / CHECKSUMS
    if not sums.is_file():
        return []
    wanted = SPLIT_ALIASES.get(split, (split,))
    return sorted(name for name in _read_sums(sums) if _is_shard(Path(name))
                  and name.split("-")[0] in wanted and not (root / name).is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_source(data: str | Path | Sequence[str | Path], split: str):
    """-> ("cifar", dir) | ("samples", samples, classes.tsv or None, all class names seen)."""
    if isinstance(data, (list, tuple)):
        shards = [Path(p) for p in data]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise DataError(f"shard files not found: {missing}")
        check_sums(shards)
        samples = _tar_samples(shards, split)
        return "samples", samples, shards[0].parent / "classes.tsv", None
    root = Path(data)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if root.is_file() and _is_shard(root):
        return _find_source([root], split)
    if (root / "batches.meta").is_file() or (root / "meta").is_file() and (root / "train").is_file():
        return ("cifar", root)
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (root / sub).is_dir():
            return ("cifar", root / sub)
    wanted = SPLIT_ALIASES.get(split, (split,))
    shards = sorted(p for p in root.iterdir() if _is_shard(p) and p.name.split("-")[0] in wanted)
    missing = _missing_listed_shards(root, split)
    if missing:
        raise DataError(f"{root / CHECKSUMS} lists {missing}, which {root} lacks: download them again")
    if shards:
        check_sums(shards)
        return "samples", _tar_samples(shards, split), root / "classes.tsv", None
    split_dirs = [root / s for s in wanted if (root / s).is_dir()]
    if split_dirs:
        # every split's class folders, so labels agree across splits even if one lacks a class
        seen = {p.name for s in ("train", "val", "test") if (root / s).is_dir()
                for p in _class_folders(root / s)}
        return "samples", _folder_samples(split_dirs[0]), root / "classes.tsv", seen
    if is_flat_tree(root):
        return "samples", _folder_samples(root), root / "classes.tsv", None
    raise DataError(
        f"no {split!r} data in {root}: expected {split}/<class>/<image> folders, "
        f"{split}-*.tar.gz shards, or a CIFAR python folder"
    )


def is_flat_tree(data: str | Path | Sequence[str | Path]) -> bool:
    """Whether ``data`` is a folder of class folders with no split folders or shards
    (``ROOT/<class>/<image>``): every split reads the same images from it, so training must not
    take its validation images from there. A folder whose subfolders are split names (only
    ``train/``, say) is not one: its other splits have no data."""
    if isinstance(data, (list, tuple)) or not Path(data).is_dir():
        return False
    root = Path(data)
    folders = _class_folders(root)
    return (bool(folders) and not any(p.name in _SPLIT_FOLDERS for p in folders)
            and not any(_is_shard(p) for p in root.iterdir()))


# ------------------------------------------------------------------------------------------------
# decoding


def _first_size(samples: Sequence[_Sample], skip_corrupt: bool) -> int:
    """The height of the first image that decodes (with ``skip_corrupt``, past unreadable ones):
    every image is decoded to that size when no size is given."""
    for sample in samples:
        try:
            return _decode(sample, None)[0].shape[1]
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if not skip_corrupt:
                raise DataError(f"cannot read image {sample.name}: {e} (pass skip_corrupt=True / "
                                "--skip-corrupt to skip unreadable images)") from e
    raise DataError("no image could be read")


def _decode(sample: _Sample, size: int | None) -> tuple[np.ndarray, bool]:
    """``(image (3, S, S) uint8, whether it was resized to S x S)``. Decoded as the app decodes an
    upload (:func:`lgam.imageio.load_image`: EXIF rotation, alpha on white, 16-bit scaled), so a
    model trains and is validated on what it is shown later; no size limit but Pillow's own."""
    data = io.BytesIO(sample.read())
    data.name = sample.name  # for the message of an unreadable one
    rgb = load_image(data, max_bytes=sys.maxsize - 1, max_pixels=sys.maxsize)
    resized = size is not None and rgb.size != (size, size)
    if resized:
        rgb = rgb.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1), resized


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python format is pickle: allow only the numpy types it holds."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read CIFAR batch {path}: {e}") from e


def _load_cifar(root: Path, split: str, size: int | None, limit: int | None) -> DecodedSplit:
    if (root / "batches.meta").is_file():  # CIFAR-10
        names = _load_cifar_batch(root / "batches.meta")["label_names"]
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        key = "labels"
    else:  # CIFAR-100
        names = _load_cifar_batch(root / "meta")["fine_label_names"]
        files = [root / ("train" if split == "train" else "test")]
        key = "fine_labels"
    data, labels = [], []
    for f in files:
        batch = _load_cifar_batch(f)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += list(batch[key])
    images = torch.from_numpy(np.concatenate(data))
    y = torch.tensor(labels, dtype=torch.int64)
    if y.numel() and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"{root}: labels outside 0..{len(names) - 1}")
    if limit is not None:
        idx = _spread(len(y), limit)
        images, y = images[idx], y[idx]
    if size is not None and size != 32:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                               antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return DecodedSplit(images.contiguous(), y, list(names), list(names))


def _spread(n: int, limit: int) -> Tensor:
    """``limit`` indices spread evenly over ``range(n)`` (keeps classes balanced in sorted lists)."""
    if limit >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, limit).round().long()


def _ordered_samples(source: tuple, data: object, split: str, limit: int | None
                     ) -> tuple[list[_Sample], list[str], list[str], dict[str, int]]:
    """A ``"samples"`` source's images in label order, then file order (every reader's order),
    ``limit`` spread over them: ``(samples, wnids, names, wnid -> label)``."""
    _, samples, tsv, seen = source
    if not samples:
        raise DataError(f"no {split!r} images found in {data}")
    wnids, names = _class_list(seen or (s.wnid for s in samples), tsv)
    index = {w: i for i, w in enumerate(wnids)}
    samples.sort(key=lambda s: (index[s.wnid], s.key))
    if limit is not None:
        samples = [samples[i] for i in _spread(len(samples), limit).tolist()]
    return samples, wnids, names, index


def image_groups(data: str | Path | Sequence[str | Path], split: str, column: str) -> list[str]:
    """Each image's value of ``column`` in the ``classes.tsv`` beside the data (e.g. ``source``:
    which dataset a class came from; ``name``: the class), in :func:`load_split`'s order, with no
    image decoded: one entry per image, to break a result on the split down by that column."""
    source = _find_source(data, split)
    if source[0] == "cifar" or source[2] is None or not source[2].is_file():
        raise DataError(f"no classes.tsv beside {data}: nothing to group its images by")
    samples, *_ = _ordered_samples(source, data, split, None)
    values = dict(zip(*_read_classes_columns(source[2], "wnid", column)))
    return [values[s.wnid] for s in samples]


def load_split(
    data: str | Path | Sequence[str | Path],
    split: str = "train",
    size: int | None = None,
    skip_corrupt: bool = False,
    limit: int | None = None,
    workers: int | None = None,
    check: Callable[[dict[str, int]], None] | None = None,
) -> DecodedSplit:
    """Decode every image of ``split`` once. ``size``: resize each image to ``size x size`` on
    decode (default: the first image's size, others resized to it). ``limit``: at most that many
    images, spread evenly over the sorted list. ``check``: called with each class's number of
    images (class id, its folder name -> count; every class, in label order, after ``limit``)
    before anything is decoded (image folders and shards), to refuse what would fail after minutes
    of decoding. Ids, not display names: two classes may share a name (ImageNet's two cranes)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    source = _find_source(data, split)
    if source[0] == "cifar":
        return _load_cifar(source[1], split, size, limit)
    samples, wnids, names, index = _ordered_samples(source, data, split, limit)
    if check is not None:
        counts = dict.fromkeys(wnids, 0)
        for sample in samples:
            counts[sample.wnid] += 1
        check(counts)
    if size is None:
        size = _first_size(samples, skip_corrupt)

    # each image decoded straight into its row: a list of arrays and their stack held the
    # decoded set twice at the peak (~3 GB for ImageNet-20's training images at 160 px)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    rows = images.numpy()  # the same memory

    resized = [False] * len(samples)

    def decode(i: int) -> str | None:
        try:
            rows[i], resized[i] = _decode(samples[i], size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if skip_corrupt:
                return samples[i].name
            raise DataError(f"cannot read image {samples[i].name}: {e} (pass skip_corrupt=True / "
                            "--skip-corrupt to skip unreadable images)") from e
        return None

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        failed = list(pool.map(decode, range(len(samples))))
    skipped = [name for name in failed if name is not None]
    keep = [i for i, name in enumerate(failed) if name is None]
    if not keep:
        raise DataError(f"none of the {len(samples)} {split!r} images in {data} could be read")
    if skipped:
        images = images[keep]
    labels = torch.tensor([index[samples[i].wnid] for i in keep], dtype=torch.int64)
    return DecodedSplit(images, labels, names, wnids, skipped, sum(resized[i] for i in keep))


def check_holdout(counts: Mapping[str, int], per_class: int) -> None:
    """Raise :class:`DataError` unless ``per_class`` images can be held out of every class of
    ``counts`` (class id -> images) with at least one left to train on."""
    if per_class < 0:
        raise DataError(f"holdout must be >= 0 images per class, got {per_class}")
    for name, n in counts.items():
        if per_class and n <= per_class:
            raise DataError(f"class {name!r} has {n} images: cannot hold out {per_class} and train on "
                            "the rest")


def split_holdout(split: DecodedSplit, per_class: int) -> tuple[DecodedSplit, DecodedSplit]:
    """``(rest, held_out)``: ``per_class`` images of every class set aside from ``split``, spread
    evenly over each class's images in their (file-name) order, so the slice depends on the data
    alone, never on a seed: every run that holds out the same number holds out the same images.
    A slice to choose settings on (the app's input size) without looking at val."""
    check_holdout({cid: int((split.labels == c).sum()) for c, cid in enumerate(split.class_ids)}, per_class)
    held = torch.zeros(len(split), dtype=torch.bool)
    for c in range(len(split.classes)):
        idx = (split.labels == c).nonzero().flatten()
        held[idx[_spread(len(idx), per_class)]] = per_class > 0

    def part(mask: Tensor) -> DecodedSplit:
        return DecodedSplit(split.images[mask], split.labels[mask], split.classes, split.wnids, split.skipped)

    # nothing held out: the split itself, not a copy of its images through a mask
    return (split if per_class == 0 else part(~held)), part(held)


# ------------------------------------------------------------------------------------------------
# preprocessing and augmentation


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x / 255.0 - m) / s


def resize_normalize(images: Tensor, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(B, 3, size, size)``: the whole image resized to a
    square (bilinear, antialiased), then normalised."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return _normalise(x, mean, std)


def preprocess(images: Sequence[Image.Image] | Image.Image, size: int,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """PIL images (any mode and size; one image is a batch of one) -> float32 ``(B, 3, size,
    size)``: RGB (:func:`lgam.imageio.to_rgb`), whole image resized to a square, normalised (the
    app's path; it ends in :func:`resize_normalize`, as ``lgam evaluate``'s decoded images do).
    Very large images are first reduced by an integer factor per side (box filter) to at most ~2x
    the target: each side on its own, as the image is squeezed to a square anyway (a 50-MP strip
    10 px high was once left whole, ~600 MB as float)."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ValueError("preprocess needs at least one image")
    wrong = next((type(im).__name__ for im in images if not isinstance(im, Image.Image)), None)
    if wrong:
        raise TypeError(f"preprocess takes PIL images, got a {wrong}: a uint8 (B, 3, H, W) tensor goes "
                        "through resize_normalize instead, a file through lgam.imageio.load_image")
    out = []
    for img in images:
        img = to_rgb(img)  # as the app's loader: alpha on white, 16-bit scaled; an RGB image as it is
        k = tuple(max(1, side // (2 * size)) for side in img.size)
        if max(k) >= 2:
            img = img.reduce(k)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
        out.append(resize_normalize(t, size, mean, std))
    return torch.cat(out)


class DeviceAugment:
    """Augmentation on the images' device. ``train=True``: random-resized-crop + horizontal flip;
    ``train=False``: :func:`resize_normalize`. The crop's area share is uniform in ``scale`` and
    its aspect ratio log-uniform in ``ratio``, as torchvision's ``RandomResizedCrop`` draws them,
    but one draw per image: a side that would overrun the image is clamped to it (torchvision
    draws again, up to ten times, then takes a centre crop), so large crops are somewhat more
    frequent. The crop is resampled bilinearly without antialiasing (torchvision antialiases).

    ``__call__(images uint8 (B, 3, S, S), generator) -> float32 (B, 3, out_size, out_size)``;
    the randomness comes only from ``generator`` (on the images' device), so runs are repeatable.
    """

    def __init__(self, out_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, train: bool = True,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        if out_size < 1:
            raise ValueError(f"out_size must be positive, got {out_size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.out_size, self.mean, self.std, self.train = out_size, mean, std, train
        self.scale, self.ratio = scale, ratio

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.train:
            return resize_normalize(images, self.out_size, self.mean, self.std)
        b, dev = images.shape[0], images.device
        u = torch.rand(b, 5, generator=generator, device=dev)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (w / 2 + (1 - w) * u[:, 2]) * 2 - 1  # crop centre in [-1, 1] coordinates
        cy = (h / 2 + (1 - h) * u[:, 3]) * 2 - 1
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [b, 3, self.out_size, self.out_size], align_corners=False)
        x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
        return _normalise(x, self.mean, self.std)


# ------------------------------------------------------------------------------------------------
# fetching public datasets (for users with internet; never called by the tests)

#: name -> (URL, archive name); Imagenette/Imagewoof are fast.ai's ImageNet subsets
DATASETS = {
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz", "imagenette2-160.tgz"),
    "imagewoof": ("https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz", "imagewoof2-160.tgz"),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz"),
}


def extract(archive: str | Path, root: str | Path) -> None:
    """Extract a tar archive under ``root``, refusing members that would land outside it."""
    root = Path(root).resolve()
    with tarfile.open(archive, "r:*") as tar:
        for m in tar.getmembers():
            if not (root / m.name).resolve().is_relative_to(root) or m.issym() or m.islnk():
                raise DataError(f"{archive}: unsafe member {m.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: the stdlib's own check, as well
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)  # every member was checked above


def fetch(name: str, root: str | Path) -> Path:
    """Download and extract dataset ``name`` (see :data:`DATASETS`) into ``root``; returns the
    folder to pass as ``--data``."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    url, fname = DATASETS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / fname
    if not archive.exists():
        print(f"downloading {url} -> {archive}", file=sys.stderr)
        tmp = archive.with_suffix(archive.suffix + ".part")
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, archive)
    extract(archive, root)
    folder = fname.removesuffix(".tgz").removesuffix(".tar.gz").replace("-python", "")
    candidates = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
    return root / candidates.get(name, folder)


def sample(data: str | Path | Sequence[str | Path], out: str | Path, n: int = 6,
           split: str = "val", max_size: int = 224) -> list[Path]:
    """Write ``n`` images of ``split``, spread over its classes, as ``OUT/NN_<class>.jpg`` (at most
    ``max_size`` px, as stored otherwise); e.g. the inputs of a README figure. Returns the files."""
    images = load_split(data, split, limit=n)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, label) in enumerate(zip(images.images, images.labels.tolist())):
        im = Image.fromarray(image.permute(1, 2, 0).numpy())
        im.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
        name = "".join(ch if ch.isalnum() else "_" for ch in images.classes[label])
        files.append(out / f"{i:02d}_{name}.jpg")
        im.save(files[-1], quality=90)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lgam.data", description="fetch or sample a dataset")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and extract a dataset")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("--root", default="data")
    s = sub.add_parser("sample", help="write N images of a split, spread over its classes, as JPEG")
    s.add_argument("data", help="dataset root or shard folder (as lgam train --data)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("-n", type=int, default=6, help="number of images (default 6)")
    s.add_argument("--split", default="val")
    s.add_argument("--max-size", type=int, default=224, help="longest side in px (default 224)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch(args.name, args.root))
        else:
            print("\n".join(map(str, sample(args.data, args.out, args.n, args.split, args.max_size))))
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
