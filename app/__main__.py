"""``python -m app [--checkpoints DIR] [--device auto|cpu|cuda] [--host H] [--port P]``.

SIGTERM (``docker stop``, a Space restart) stops the server as Ctrl-C does: as PID 1 in a container
Python would otherwise ignore it and be killed after the grace period.
"""
import signal
import sys

from .server import main


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # Gradio's launch loop closes the server on it


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a signal before the server was up
        sys.exit(0)
