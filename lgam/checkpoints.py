"""Checkpoints: float16 safetensors (no pickle anywhere) plus ``manifest.json``.

``manifest.json`` is ``{"format": 1, "models": {NAME: ENTRY}}``; an ENTRY records the files and
their sha256, the architecture (``arch`` + ``arch_kwargs`` for :func:`lgam.create_model`), the class
list, input size and normalisation, the training recipe, seed, epochs, git commit and metrics
(``val_top1_err_<size>`` in percent at each evaluated size, ``params``, ``gmacs_224``,
``cpu_latency_ms_224`` with ``cpu_latency_setup`` (threads, CPU, LGAM path), ``train_img_per_s``). A
checkpoint over :data:`PART_LIMIT` (9 MiB) is stored as ``NAME-00001-of-0000N.safetensors`` parts of
at most that size plus ``NAME.safetensors.index.json``, loaded as one. (The parts do not spare a
Hugging Face Space Git LFS: the Hub refuses binary files pushed without LFS/Xet whatever their size,
so ``scripts/space_upload.py`` uploads them through its API, and ``.gitattributes`` puts them in
LFS.)
Loading verifies every sha256 and the architecture, and raises :class:`CheckpointError` with a
message that says what is wrong and what to do.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._fileio import atomic_write, atomic_write_json
from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import LgamError
from .models import create_model

__all__ = [
    "CheckpointError", "MANIFEST", "PART_LIMIT", "save_checkpoint", "load_manifest", "load_checkpoint",
    "LoadedModels", "load_models",
    "update_metrics", "sha256_file",
]

MANIFEST = "manifest.json"
FORMAT = 1
#: largest file written (larger checkpoints are split into parts of at most this size)
PART_LIMIT = 9 * 2**20
_KEEP_FP32 = ("running_mean", "running_var")
_HEADER_ALLOWANCE = 64 * 1024  # room for each part's safetensors JSON header
_ENTRY_KEYS = ("files", "sha256", "arch", "arch_kwargs", "classes", "input_size", "mean", "std")


class CheckpointError(LgamError):
    """A checkpoint or manifest that cannot be used; the message says which and why."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git(*args: str) -> str | None:
    """``git ARGS`` run in the library's folder: its stdout, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> dict[str, Any]:
    """``{"git_commit": HEAD's hash, "git_dirty": whether the library's files differ from it}``
    (both None outside a git checkout, e.g. an installed wheel): what code made a number."""
    commit = _git("rev-parse", "HEAD") or None
    status = None if commit is None else _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _storage_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """float16 weights; BatchNorm running statistics float32; integer buffers unchanged."""
    out = {}
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if t.is_floating_point() and not key.endswith(_KEEP_FP32):
            t = t.to(torch.float16)
        elif t.is_floating_point():
            t = t.to(torch.float32)
        out[key] = t.contiguous()
    return out


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if n > max_bytes:
            raise CheckpointError(f"tensor {key!r} ({n} bytes) is larger than a part ({max_bytes} bytes)")
        if size + n > max_bytes and parts[-1]:
            parts.append({})
            size = 0
        parts[-1][key] = t
        size += n
    return parts


def save_checkpoint(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    *,
    classes: Sequence[str],
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    recipe: dict[str, Any] | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    max_part_bytes: int = PART_LIMIT,
) -> dict[str, Any]:
    """Write ``model`` (built by :func:`lgam.create_model`) to ``directory`` and record it in the
    manifest; returns the manifest entry. ``name`` defaults to ``model.model_name``."""
    arch = _checked_arch(model, name, classes)
    name = name or arch
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, index = _write_weights(_storage_dict(model), directory, name, arch, max_part_bytes)
    hashed = files + ([index] if index else [])
    entry: dict[str, Any] = {
        "files": files,
        "index": index,
        "sha256": {f: sha256_file(directory / f) for f in hashed},
        "arch": arch,
        "arch_kwargs": dict(model.model_kwargs),
        "classes": list(classes),
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "dtype": "float16",
        "recipe": recipe,
        "seed": seed,
        "epochs": epochs,
        "git_commit": git_revision()["git_commit"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": dict(metrics or {}),
    }
    if extra:
        entry["extra"] = extra
    manifest_path = directory / MANIFEST
    manifest = load_manifest(directory) if manifest_path.exists() else {"format": FORMAT, "models": {}}
    manifest["models"][name] = entry
    atomic_write_json(manifest_path, manifest)
    _remove_stale(directory, name, set(hashed))
    return entry


def _checked_arch(model: nn.Module, name: str | None, classes: Sequence[str]) -> str:
    """The model's registry name, after checking that ``model``, ``name`` and ``classes`` can be
    saved together."""
    arch = getattr(model, "model_name", None)
    if arch is None:
        raise CheckpointError("model has no model_name: build it with lgam.create_model(...)")
    name = name or arch
    if "/" in name or "\\" in name or name.startswith("."):
        raise CheckpointError(f"checkpoint name {name!r} must be a plain file name")
    n_classes = model.model_kwargs.get("num_classes")
    if n_classes is not None and len(classes) != n_classes:
        raise CheckpointError(f"{len(classes)} class names given for a model with {n_classes} classes")
    return arch


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, name: str, arch: str,
                   max_part_bytes: int) -> tuple[list[str], str | None]:
    """Write ``tensors`` as ``name.safetensors``, or as numbered parts with an index file when
    they exceed ``max_part_bytes``; returns the weight files and the index (or ``None``)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"format": "pt", "arch": arch}
    if total + _HEADER_ALLOWANCE <= max_part_bytes:
        files = [f"{name}.safetensors"]
        atomic_write(directory / files[0], lambda tmp: save_file(tensors, tmp, metadata=meta))
        return files, None
    parts = _split(tensors, max_part_bytes - _HEADER_ALLOWANCE)
    files = [f"{name}-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    for fname, part in zip(files, parts):
        atomic_write(directory / fname, lambda tmp, part=part: save_file(part, tmp, metadata=meta))
    index = f"{name}.safetensors.index.json"
    weight_map = {k: fname for fname, part in zip(files, parts) for k in part}
    atomic_write_json(directory / index,
                      {"metadata": {"total_size": total, "arch": arch}, "weight_map": weight_map}, 1)
    return files, index


def _remove_stale(directory: Path, name: str, keep: set[str]) -> None:
    """Delete model ``name``'s weight files of an earlier save that this save did not write (its
    single file, numbered parts, index), once the manifest names the new ones. Exactly its own:
    a glob ``NAME-*-of-*`` also took the parts of a model named ``NAME-ft``."""
    own = re.compile(re.escape(name) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for f in directory.iterdir():
        if own.fullmatch(f.name) and f.name not in keep:
            f.unlink()


def _permission_message(path: Path) -> str:
    try:
        st = path.stat()
        mode = f"mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}"
    except OSError:
        mode = "mode unknown"
    return (f"permission denied reading {path} ({mode}; this process runs as uid {os.getuid()}): "
            "make it readable, e.g. chmod a+r, or run as its owner")


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``directory/manifest.json``."""
    path = Path(directory) / MANIFEST
    if Path(directory).is_file():
        raise CheckpointError(f"{directory} is a file: give the folder that holds {MANIFEST}")
    if not path.is_file():
        raise CheckpointError(
            f"no {MANIFEST} in {directory}: train models with `lgam train ... --checkpoints-dir "
            f"{directory}` or point to a folder that has one"
        )
    try:
        text = path.read_text()
    except PermissionError as e:
        raise CheckpointError(_permission_message(path)) from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from version control") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
        manifest.get("models"), dict
    ):
        raise CheckpointError(f"{path} is not a format-{FORMAT} lgam manifest")
    for name, entry in manifest["models"].items():
        missing = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise CheckpointError(f"{path}: model {name!r} lacks {missing}")
        bad = [f for f in entry["sha256"] if Path(f).name != f]
        if bad:
            raise CheckpointError(f"{path}: model {name!r} names files outside its folder: {bad}")
    return manifest


def _check_preprocessing(name: str, entry: dict[str, Any]) -> None:
    """What the model's inputs are made with: ``input_size`` a whole number of pixels >= 1, ``mean``
    and ``std`` three finite numbers (``std`` above 0)."""
    size = entry["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{name}: manifest field input_size must be a whole number of pixels "
                              f">= 1, got {size!r}")
    for key in ("mean", "std"):
        v = entry[key]
        ok = isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok or (key == "std" and min(v) <= 0):
            raise CheckpointError(f"{name}: manifest field {key} must be three finite numbers (one per "
                                  f"RGB channel{', each above 0' if key == 'std' else ''}), got {v!r}")


def load_checkpoint(
    directory: str | Path, name: str, map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild model ``name`` from ``directory``: ``(model in eval mode, manifest entry)``.

    Verifies every file's sha256 (unless ``verify=False``) and that the weights fit the recorded
    architecture; weights come back as float32.
    """
    directory = Path(directory)
    models = load_manifest(directory)["models"]
    if name not in models:
        raise CheckpointError(f"no model {name!r} in {directory / MANIFEST}; it has {sorted(models)}")
    entry = models[name]
    _check_preprocessing(name, entry)
    for fname, digest in entry["sha256"].items():
        path = directory / fname
        if not path.is_file():
            raise CheckpointError(f"{name}: file {fname} is missing from {directory}")
        try:
            mismatch = verify and sha256_file(path) != digest
        except PermissionError as e:
            raise CheckpointError(f"{name}: {_permission_message(path)}") from e
        if mismatch:
            raise CheckpointError(
                f"{name}: {fname} does not match its sha256 in the manifest (corrupt, truncated or "
                "replaced); download or re-save it"
            )
    state: dict[str, torch.Tensor] = {}
    for fname in entry["files"]:
        try:
            state.update(load_file(str(directory / fname), device=str(map_location)))
        except PermissionError as e:
            raise CheckpointError(f"{name}: {_permission_message(directory / fname)}") from e
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{name}: cannot read {fname}: {e}") from e
    try:
        model = create_model(entry["arch"], **entry["arch_kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot build architecture {entry['arch']!r}: {e}") from e
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{name}: architecture mismatch between the weights and {entry['arch']!r} "
            f"{entry['arch_kwargs']}: {str(e).splitlines()[0]} ..."
        ) from e
    return model.to(map_location).eval(), entry


@dataclass
class LoadedModels:
    """What :func:`load_models` found. ``models``: name -> model, or the reason it is unusable;
    ``entries``: name -> manifest entry; ``classes``: the class names the loaded models share;
    ``problem``: why no model at all could be loaded (``None`` when at least one did)."""

    models: dict[str, nn.Module | str]
    entries: dict[str, dict[str, Any]]
    classes: list[str]
    problem: str | None = None


def load_models(directory: str | Path, names: Sequence[str]) -> LoadedModels:
    """Load ``names`` from ``directory``'s manifest, each on its own: a missing or broken model
    gets the reason in place of the model and the others load (the policy of an app that shows
    what it can). Models whose class list differs from the first loaded model's are refused."""
    names = list(names)
    try:
        manifest = load_manifest(directory)
    except CheckpointError as e:
        return LoadedModels({n: "no usable manifest" for n in names}, {}, [], str(e))
    entries: dict[str, dict[str, Any]] = dict(manifest["models"])
    models: dict[str, nn.Module | str] = {}
    classes: list[str] | None = None
    for n in names:
        models[n] = _load_one(directory, n, entries)
        if isinstance(models[n], nn.Module):
            entry_classes = list(entries[n].get("classes") or [])
            classes = entry_classes if classes is None else classes
            if entry_classes != classes:
                models[n] = "its class list differs from the other models'"
    problem = None
    if not any(isinstance(m, nn.Module) for m in models.values()):
        problem = f"no model could be loaded from {directory}: " + "; ".join(
            f"{n}: {why}" for n, why in models.items())
    return LoadedModels(models, entries, classes or [], problem)


def _load_one(directory: str | Path, name: str, entries: dict[str, dict[str, Any]]
              ) -> nn.Module | str:
    if name not in entries:
        return "not in the checkpoint manifest"
    try:
        model, entries[name] = load_checkpoint(directory, name, map_location="cpu")
    except CheckpointError as e:
        return f"checkpoint error: {e}"
    except Exception as e:  # noqa: BLE001 - any broken file makes this model unavailable only
        return f"cannot load: {type(e).__name__}: {e}"
    return model


def update_metrics(directory: str | Path, name: str, metrics: dict[str, Any],
                   input_size: int | None = None) -> None:
    """Merge ``metrics`` into model ``name``'s manifest entry; ``input_size`` (if given) becomes
    the size the app and ``lgam evaluate`` feed it."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    if name not in manifest["models"]:
        raise CheckpointError(f"no model {name!r} in {directory / MANIFEST}")
    manifest["models"][name].setdefault("metrics", {}).update(metrics)  # an entry may have none
    if input_size is not None:
        manifest["models"][name]["input_size"] = int(input_size)
    atomic_write_json(directory / MANIFEST, manifest)
