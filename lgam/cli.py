"""The ``lgam`` console command: ``lgam <command> ...``.

Each command lives in its own module, which provides ``configure_parser(parser)`` and
``main(args) -> int``; the same module runs as ``python -m lgam.<module>`` with the same arguments.
Only the chosen command's module is imported. A :class:`lgam.errors.LgamError` from any command is
caught here, once: ``error: <message>`` on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LgamError

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("lgam.params", "parameter/GMAC table next to the paper's Tables 1, 3 and 4"),
    "train": ("lgam.train", "train one or several models"),
    "evaluate": ("lgam.evaluate", "top-1 error, params, GMACs and latency of checkpoints"),
    "figure5": ("lgam.figure", "the paper's Figure 5 (Grad-CAM grid) for any images"),
    "curves": ("lgam.curves", "validation-error and loss curves of trained models"),
}


def _top_parser() -> argparse.ArgumentParser:
    epilog = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="lgam", description=__doc__.splitlines()[0],
        epilog="commands:\n" + epilog + "\n\n'lgam COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("--version", action="version", version=_version())
    return parser


def _version() -> str:
    from . import __version__

    return f"lgam {__version__}"


def run_module(module: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` with ``module``'s ``configure_parser`` and call its ``main``."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return mod.main(args) or 0
    except LgamError as e:  # the user's input or files: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv or ["--help"])  # prints help/version (or the error) and exits
    command = argv[0]
    if command not in COMMANDS:
        _top_parser().parse_args([command])  # exits with "invalid choice"
    return run_module(COMMANDS[command][0], argv[1:], prog=f"lgam {command}")


if __name__ == "__main__":
    sys.exit(main())
