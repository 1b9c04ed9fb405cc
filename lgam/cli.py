"""The ``lgam`` console command: ``lgam COMMAND [options]``.

Each command lives in its own module, which provides ``configure_parser(parser)`` and
``main(args) -> int``; the same module runs as ``python -m lgam.<module>`` with the same arguments.
Only the chosen command's module is imported. A :class:`lgam.errors.LgamError` from any command is
caught here, once: ``error: <message>`` on stderr, exit status 2. ``lgam`` alone prints the help on
stderr and exits with status 2.

The modules' docstrings are reStructuredText (for readers of the code); ``--help`` shows them as
plain text (:func:`plain_text`) with each option's default (:class:`HelpFormatter`).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import re
import sys

from .errors import LgamError

__all__ = ["COMMANDS", "HelpFormatter", "plain_text", "run_module", "main"]

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("lgam.params", "parameter/GMAC table next to the paper's Tables 1, 3 and 4"),
    "train": ("lgam.train", "train one or several models"),
    "evaluate": ("lgam.evaluate", "top-1 error, params, GMACs and latency of checkpoints"),
    "figure5": ("lgam.figure", "the paper's Figure 5 (Grad-CAM grid) for any images"),
    "curves": ("lgam.curves", "validation-error and loss curves of trained models"),
    "gates": ("lgam.gatestats", "per-stage statistics of the attention modules' gates"),
    "table4": ("lgam.table4", "Table 4 over several seeds: mean ± std, paired differences, McNemar"),
}

# :role:`text` and :domain:role:`text` -> text; a leading "~" keeps the last dotted part
_ROLE = re.compile(r":(?:[\w-]+:)+`(~?)([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=\S)\*(?![\w*])")


def _role_text(match: re.Match) -> str:
    tilde, text = match.groups()
    return text.rsplit(".", 1)[-1] if tilde else text


def plain_text(doc: str | None) -> str:
    """A reStructuredText docstring as plain text for ``--help``: dedented, roles
    (``:class:`x.Y``` -> ``x.Y``; ``:func:`~x.f``` -> ``f``), inline literals, ``**strong**`` and
    ``*emphasis*`` reduced to their text; line breaks and indented examples kept."""
    if not doc:
        return ""
    text = inspect.cleandoc(doc)
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    return _EMPHASIS.sub(r"\1", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (line breaks and indented examples kept) and each option's
    default after its help, as :class:`argparse.ArgumentDefaultsHelpFormatter` does (also for an
    option without help), except where there is nothing to show (``None``, ``False``, an empty
    list) or the help already names its default. Help texts are shown as :func:`plain_text`."""

    def add_argument(self, action: argparse.Action) -> None:
        if not action.help and _has_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = plain_text(action.help or "")
        if "%(default)" in help_ or "default" in help_.lower() or not _has_default(action):
            return help_
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{help_} (default: {shown.replace('%', '%%')})"


def _has_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should show the action's default: an option (or an optional positional)
    whose default says something (not ``None``, ``False``, ``""`` or an empty list)."""
    default = action.default
    if default is argparse.SUPPRESS or default is None or default is False:
        return False
    if isinstance(default, (str, list, tuple)) and len(default) == 0:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def _top_parser() -> argparse.ArgumentParser:
    epilog = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="lgam", description=plain_text(__doc__).splitlines()[0],
        epilog="commands:\n" + epilog + "\n\n'lgam COMMAND --help' for a command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("--version", action="version", version=_version())
    return parser


def _version() -> str:
    from . import __version__

    return f"lgam {__version__}"


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a batch size, an image size, a dpi, a count); 0 or
    a negative one is argparse's usage error, not a traceback from deep inside the command."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_module(module: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` with ``module``'s ``configure_parser`` and call its ``main``."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module}",
                                     description=plain_text(mod.__doc__),
                                     formatter_class=HelpFormatter)
    mod.configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return mod.main(args) or 0
    except (LgamError, OSError) as e:  # the user's input or files (a folder given for an output
        print(f"error: {e}", file=sys.stderr)  # file, no permission): the message, no traceback
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a command is required: say which there are, and fail
        _top_parser().print_help(sys.stderr)
        return 2
    if argv[0].startswith("-"):
        _top_parser().parse_args(argv)  # prints help/version (or the error) and exits
    command = argv[0]
    if command not in COMMANDS:
        _top_parser().parse_args([command])  # exits with "invalid choice"
    return run_module(COMMANDS[command][0], argv[1:], prog=f"lgam {command}")


if __name__ == "__main__":
    sys.exit(main())
