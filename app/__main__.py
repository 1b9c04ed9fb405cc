"""``python -m app [--checkpoints DIR] [--device auto|cpu|cuda] [--host H] [--port P]``."""
import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
