"""Number formatting shared by the tables lgam prints."""
from __future__ import annotations

from typing import Any

__all__ = ["DASH", "format_or_dash"]

#: what a table shows where there is no number
DASH = "—"


def format_or_dash(value: Any, spec: str = "", suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or :data:`DASH` for ``None``."""
    return DASH if value is None else format(value, spec) + suffix
