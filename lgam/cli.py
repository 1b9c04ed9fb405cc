"""The ``lgam`` console command: ``lgam <command> ...``.

Each command lives in its own module, which provides ``configure_parser(parser)`` and
``main(args) -> int``; the same module runs as ``python -m lgam.<module>``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("lgam.params", "parameter/GMAC table next to the paper's Tables 1, 3 and 4"),
    "train": ("lgam.train", "train one or several models"),
    "evaluate": ("lgam.evaluate", "top-1 error, params, GMACs and latency of checkpoints"),
    "figure5": ("lgam.figure", "the paper's Figure 5 (Grad-CAM grid) for any images"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).main(args) or 0


def run_module(module: str, argv: list[str] | None = None) -> int:
    """Entry for ``python -m lgam.<module>``: same arguments as ``lgam <command>``."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=mod.__doc__)
    mod.configure_parser(parser)
    return mod.main(parser.parse_args(argv)) or 0


if __name__ == "__main__":
    sys.exit(main())
