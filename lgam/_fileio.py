"""Atomic file writes (a kill mid-write leaves the previous file, never a torn one) and figure output."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (0o644 under the usual
    022). Read once, at import: ``os.umask`` can only be read by setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move the temporary file over ``path``. The file gets the
    permissions a plain ``open()`` would give (``mkstemp`` makes it 0o600, which a container user
    other than the writer cannot read)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """A command's ``--out`` text file: its folder made, then written in one replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def atomic_write_json(path: Path, obj: Any, indent: int = 2) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=indent) + "\n"))


#: figure formats matplotlib writes from the output file's suffix
FIGURE_FORMATS = (".png", ".pdf", ".svg")


def save_figure(fig: Any, path: str | Path, dpi: int = 150) -> Path:
    """Save a matplotlib ``Figure`` to ``path`` (:data:`FIGURE_FORMATS` by suffix); returns it."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise UsageError(f"output must end in one of {', '.join(FIGURE_FORMATS)}, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
