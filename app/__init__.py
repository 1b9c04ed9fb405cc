"""Gradio app: the paper's Figure 5 live (``python -m app``). Thin UI over :mod:`lgam.engine`."""
from __future__ import annotations

from .ui import OWN_TOP1, build_app, default_examples, run_compare, run_export
from .server import create_app, launch, parse_args, startup_summary

__all__ = ["OWN_TOP1", "build_app", "create_app", "default_examples", "launch", "parse_args",
           "run_compare", "run_export", "startup_summary"]
