"""flask_torchpool against the usual ways to serve a PyTorch model, over real HTTP, in one run.

    python benchmarks/http.py [--quick] [--duration S] [--workloads ...] [--servers ...]

See ``benchmarks/peers/harness.py`` (or ``--help``) for what it measures and how; this file is only
the entry point, and a guard: run as ``python benchmarks/SCRIPT.py``, every script here has
``benchmarks/`` first on ``sys.path``, where this file's name would shadow the standard library's
``http`` package for everything that imports it (``urllib.request``, and so ``torch``).
"""

import os
import sys

if __name__ == "http":
    # Imported as `http` by mistake (see above): put the standard library's package in our place. The
    # import system hands the importer whatever sys.modules["http"] holds once this body has run.
    import importlib.machinery
    import importlib.util

    _spec = importlib.machinery.PathFinder.find_spec("http", [os.path.dirname(os.__file__)])
    if _spec is None or _spec.loader is None:  # pragma: no cover - a Python without its stdlib
        raise ImportError("the standard library's http package cannot be found")
    _stdlib_http = importlib.util.module_from_spec(_spec)
    sys.modules["http"] = _stdlib_http
    _spec.loader.exec_module(_stdlib_http)
else:
    _here = os.path.dirname(os.path.abspath(__file__))
    # Run as a script: take benchmarks/ off sys.path (so `http` is the standard library's) and put the
    # repository root, where `benchmarks` and `flask_torchpool` are found, in its place.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    if os.path.dirname(_here) not in sys.path:
        sys.path.insert(0, os.path.dirname(_here))

    if __name__ == "__main__":
        from benchmarks.peers.harness import main

        sys.exit(main())
