"""The one base class of the errors lgam raises for a person to read.

Every user-facing error (bad data, a broken checkpoint, an unusable image, a bad request to the CAM
engine, a training setting that does not match) derives from :class:`LgamError`; its message says
what is wrong and what to do. The ``lgam`` command catches it once (:func:`lgam.cli.run_module`)
and prints ``error: <message>`` with exit status 2 - no traceback. Anything else is a bug.
"""
from __future__ import annotations

__all__ = ["LgamError", "UsageError"]


class LgamError(Exception):
    """A problem with the user's input or files; ``str(err)`` is the message for the user."""


class UsageError(LgamError, ValueError):
    """A bad argument: an output name with an unsupported suffix, a model or file that is not
    there, an option out of range."""
