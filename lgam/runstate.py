"""A training run's files in ``OUT/MODEL/`` and the resume state ``lgam train`` writes after every epoch.

``state.safetensors`` holds the model's weights (``model.NAME``) and the optimiser's tensors
(``optim.INDEX.NAME``); ``state.json`` the number of finished epochs, the optimiser's other state and
parameter groups, the states of the three random generators (batch order, augmentation, torch's
global generator) and the settings that shaped the weights (:data:`SETTINGS`). The tensors' file
carries that JSON too (its metadata), so one atomic replace writes a whole epoch's state: a kill
between the two files' writes once left epoch ``e``'s JSON beside epoch ``e+1``'s weights, and a
resume trained an epoch twice. ``state.json`` stays for people and for states written before;
no pickle anywhere.

On ``--resume`` :func:`check_settings` compares every saved setting with the new run's and raises
:class:`lgam.recipes.TrainError` naming each one that differs with both values, before any tensor is
loaded. States written before ``state.json`` held its settings are checked against its recipe and
seed and the run's ``config.json``. :func:`check_log` refuses a log that does not hold epochs
``1..e`` of a state after epoch ``e``; :func:`run_lock` keeps a second process off a run folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._fileio import atomic_write, atomic_write_json
from .models import model_config
from .recipes import TrainError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "STATE_TENSORS", "STATE_JSON", "LOG", "CONFIG", "LOCK", "RUNS", "SETTINGS", "generator_states",
    "restore_generators", "save_state", "load_state", "read_state_meta", "load_weights", "read_log",
    "check_log", "check_generators", "run_lock", "check_settings",
]

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STATE_META = "lgam_state"  # state.safetensors' metadata key holding state.json's content
LOG = "log.jsonl"  # one line per finished epoch
CONFIG = "config.json"  # the run's settings, command line, versions and machine
LOCK = ".lock"  # held by the process training the run (:func:`run_lock`)
RUNS = "runs"  # checkpoints/runs/MODEL/seedK/{config.json,log.jsonl,metrics.json}: every run's record

#: the settings that shape the weights -> how the user sets them; besides these, every field of the
#: recipe (``recipe.FIELD``: ``--set FIELD``, ``--epochs``). Not here: the device, --compile,
#: --val-size and --val-every, which change timing or what is measured, not the weights.
SETTINGS: dict[str, str] = {
    "model": "--model",
    "seed": "--seed",
    "stem": "--stem",
    "num_classes": "the number of classes (--data)",
    "classes": "the classes (--data)",
    "train_images": "the number of training images (--data, --limit, --skip-corrupt)",
    "image_size": "the training images' size (--decode-size)",
    "world_size": "the number of processes (torchrun --nproc_per_node)",
    "autocast": "the autocast dtype (--set bf16, on a device with native bf16)",
}


# ------------------------------------------------------------------------------ generators

def generator_states(shuffle: torch.Generator, augment: torch.Generator) -> dict[str, list[int]]:
    """The states of the batch-order and augmentation generators and of torch's global one."""
    return {"shuffle": shuffle.get_state().tolist(), "augment": augment.get_state().tolist(),
            "torch": torch.get_rng_state().tolist()}


def check_generators(states: dict[str, list[int]], augment: torch.Generator, directory: Path) -> None:
    """Refuse saved ``states`` the augmentation generator cannot take: a CPU generator's state is
    5 KB, a CUDA one's 16 bytes, so a run trained on one kind of device resumes only on that kind
    (torch raised a bare RuntimeError once the epoch began)."""
    saved, here = len(states["augment"]), augment.get_state().numel()
    if saved != here:
        kind = "a CPU" if saved == torch.Generator().get_state().numel() else "a GPU"
        raise TrainError(f"cannot resume {directory} on {augment.device.type}: its augmentation stream was "
                         f"saved on {kind} ({saved}-byte state, {here} here); resume it on that kind of "
                         "device, or start a new --out")


def restore_generators(states: dict[str, list[int]], shuffle: torch.Generator,
                       augment: torch.Generator) -> None:
    """Set the three generators to ``states`` (from :func:`generator_states`)."""
    shuffle.set_state(torch.tensor(states["shuffle"], dtype=torch.uint8))
    augment.set_state(torch.tensor(states["augment"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))


# ------------------------------------------------------------------------------ save, load

def save_state(directory: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
               settings: dict[str, Any], generators: dict[str, list[int]]) -> None:
    """Write ``state.safetensors`` and ``state.json`` for ``epoch`` finished epochs."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"epoch": epoch, "settings": settings, "param_groups": opt["param_groups"],
            "optim_scalars": scalars, "generators": generators}
    atomic_write(directory / STATE_TENSORS,
                 lambda tmp: save_file(tensors, tmp, metadata={STATE_META: json.dumps(meta)}))
    atomic_write_json(directory / STATE_JSON, meta)


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               settings: dict[str, Any], device: torch.device) -> tuple[int, dict[str, list[int]]]:
    """Check ``settings`` against the saved ones (:func:`check_settings`), then restore ``model``
    and ``optimizer``; returns the finished epochs and the saved generator states."""
    meta = read_state_meta(directory)
    check_settings(directory, _saved_settings(directory, meta), settings)
    tensors = load_file(str(directory / STATE_TENSORS), device=str(device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["epoch"], meta["generators"]


def read_state_meta(directory: Path) -> dict[str, Any]:
    """The saved state's epoch, optimiser scalars, generators and settings: from the tensors' own
    metadata (written with them in one replace), else (states written before) ``state.json``."""
    with safe_open(str(directory / STATE_TENSORS), framework="pt") as f:
        embedded = (f.metadata() or {}).get(STATE_META)
    return json.loads(embedded if embedded is not None else (directory / STATE_JSON).read_text())


def load_weights(directory: Path, device: str = "cpu") -> dict[str, Tensor]:
    """The model's ``state_dict`` from ``directory``'s ``state.safetensors``."""
    tensors = load_file(str(directory / STATE_TENSORS), device=device)
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


def read_log(directory: Path, epochs: int | None = None) -> list[dict[str, Any]]:
    """The log records of the first ``epochs`` epochs (all without it; none without a log): a line
    of an epoch whose state was never written (killed in between) is dropped, and with ``epochs``
    so is a torn last line (killed mid-append). Any other line that is not JSON is a
    :class:`TrainError` naming the file and line."""
    log = directory / LOG
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if epochs is not None and number == len(lines):
                break
            raise TrainError(f"{log}, line {number}, is not a JSON record ({e.msg}): mend or remove "
                             "that line") from None
    return [r for r in records if epochs is None or r["epoch"] <= epochs]


def check_log(directory: Path, records: list[dict[str, Any]], epochs: int) -> None:
    """Raise :class:`TrainError` unless ``records`` (:func:`read_log`'s) are epochs ``1..epochs``,
    each once, in order: a resume from a log that lost or repeated lines would carry on with a
    record that no longer says what the saved state went through."""
    found = [r.get("epoch") for r in records]
    if found != list(range(1, epochs + 1)):
        shown = found if len(found) <= 12 else [*found[:6], "...", *found[-5:]]
        raise TrainError(f"cannot resume {directory}: its state is after epoch {epochs}, but {LOG} holds "
                         f"the lines of epochs {shown}; restore {LOG} or start again with a new --out")


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on run folder ``directory`` (its :data:`LOCK` file) while training
    it: a second ``lgam train`` on the same folder would append to the same log and overwrite the
    state, so it is refused with :class:`TrainError`. The lock is the process's (``flock``): a
    killed run leaves none behind. Where there is no ``fcntl`` (Windows) nothing is locked."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise TrainError(f"{directory} is being trained by another process (pid "
                                 f"{f.read().strip() or 'unknown'}): wait for it, stop it, or choose "
                                 "another --out") from None
            except OSError as e:  # a file system without flock (some NFS/SMB/FUSE mounts)
                print(f"warning: {directory} cannot be locked ({e}): nothing keeps a second process "
                      "off it", file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


# ------------------------------------------------------------------------------ settings

def check_settings(directory: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise :class:`TrainError` naming every setting of ``now`` that differs from ``saved``
    (recipe fields one by one); a setting missing from either side is not compared."""
    saved, now = _flatten(saved), _flatten(now)
    differ = [key for key in now if key in saved and saved[key] != now[key]]
    if "num_classes" in differ and "classes" in differ:
        differ.remove("classes")  # the count says it
    if not differ:
        return
    changes = "; ".join(f"{_label(k)} was {_show(saved[k])}, now {_show(now[k])}" for k in differ)
    plural = "s" if len(differ) > 1 else ""
    raise TrainError(f"cannot resume {directory}: {changes}; use the same setting{plural} or a new --out")


def _flatten(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the recipe's fields in its place as ``recipe.FIELD``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update({f"recipe.{k}": v for k, v in value.items()} if key == "recipe" else {key: value})
    return flat


def _label(key: str) -> str:
    if key == "recipe.epochs":
        return "--epochs"
    if key.startswith("recipe."):
        return f"--set {key[7:]}"
    return SETTINGS.get(key, key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:76] + " ..."


def _saved_settings(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``state.json``'s settings; for a state written before it held them, its recipe and seed and
    what ``config.json`` recorded."""
    if "settings" in meta:
        return meta["settings"]
    config_file = directory / CONFIG
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    legacy = {k: config[k] for k in ("model", "num_classes", "train_images", "world_size") if k in config}
    if "bf16_autocast" in config:
        legacy["autocast"] = "bfloat16" if config["bf16_autocast"] else "float32"
    if "model" in config:  # config.json's stem is the --stem given (None: the model's own)
        legacy["stem"] = model_config(config["model"], stem=config.get("stem"))["stem"]
    return {**legacy, "recipe": meta["recipe"], "seed": meta["seed"]}
