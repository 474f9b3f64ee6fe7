"""``python -m flask_torchpool.server --app IMPORT [--socket PATH]``: run the host's pool server.

What auto mode and the gunicorn hook start (``flask --app IMPORT torchpool serve`` is the same for
people). The server itself is :mod:`flask_torchpool.attach.server`.
"""

from __future__ import annotations

import sys

from .attach.server import main

if __name__ == "__main__":
    sys.exit(main())
