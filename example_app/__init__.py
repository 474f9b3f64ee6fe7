"""A small Flask app that serves a digit classifier through flask_torchpool.

Run it with ``python -m example_app`` (see ``example_app/README.md``). This file imports nothing on
purpose: every spawned pool worker imports ``example_app`` to reach
``example_app.model:build_classifier`` and should not pay for Flask or the app while doing so.
"""
