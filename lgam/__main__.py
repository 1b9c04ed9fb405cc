"""``python -m lgam ...`` is the ``lgam`` console command."""
import sys

from .cli import main

sys.exit(main())
