"""``python -m edge_ser`` is ``edge-ser``."""
import sys

from .cli import main

sys.exit(main())
