"""Number formatting shared by the tables and messages lgam prints."""
from __future__ import annotations

from typing import Any

__all__ = ["DASH", "format_bytes", "format_or_dash"]

#: what a table shows where there is no number
DASH = "—"


def format_or_dash(value: Any, spec: str = "", suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or :data:`DASH` for ``None``."""
    return DASH if value is None else format(value, spec) + suffix


def format_bytes(n: int) -> str:
    """``"3.2 MiB"`` from a MiB up, ``"512 bytes"`` below."""
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"
