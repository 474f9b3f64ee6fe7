"""Serve the example app on 127.0.0.1: ``python -m example_app`` (port ``$PORT``, default 5000).

Werkzeug's threaded server runs each request in its own thread, so concurrent requests wait on the
pool's workers, not on each other. The reloader stays off even when ``FLASK_DEBUG`` is set: it would
run the app in two processes and start a pool in each.
"""

from __future__ import annotations

import os
import sys

from example_app.app import create_app, pool


def main() -> None:
    """Read ``$PORT``, build the app and serve until interrupted, then shut the pool down."""
    port_text = os.environ.get("PORT", "5000")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        sys.exit(f"PORT must be a TCP port number from 1 to 65535, got {port_text!r}")
    app = create_app()
    try:
        app.run(host="127.0.0.1", port=int(port_text), threaded=True, use_reloader=False)
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
