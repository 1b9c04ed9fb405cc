"""``python -m app [--checkpoints DIR] [--device auto|cpu|cuda] [--host H] [--port P]``.

SIGTERM (``docker stop``, a Space restart) stops the server as Ctrl-C does: as PID 1 in a container
Python would otherwise ignore it and be killed after the grace period.
"""
import logging
import os
import signal
import sys

from .server import main


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # Gradio's launch loop closes the server on it


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: once the server is closed nothing is left to
    write, and tearing down torch and Gradio's thread pools took 1.4 s of a 2.1 s stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    try:
        code = main()
    except KeyboardInterrupt:  # a signal before the server was up
        code = 0
    _exit_now(code)
