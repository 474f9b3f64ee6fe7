"""``python -m flask_torchpool.attach --app IMPORT``: run a pool server (see :mod:`.server`)."""

from __future__ import annotations

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
