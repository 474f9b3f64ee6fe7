"""Sphinx configuration for flask_torchpool's documentation."""

from __future__ import annotations

import os
import sys

# Let autodoc import flask_torchpool from the checkout, installed or not.
sys.path.insert(0, os.path.abspath(".."))

project = "flask_torchpool"
author = "flask_torchpool contributors"
copyright = "flask_torchpool contributors"
version = "0.1"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
# No intersphinx: the docs must build without network access.

exclude_patterns = ["_build", "_contract.md", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Exceptions subclass werkzeug's HTTP exceptions; don't pull their docstrings in.
autodoc_inherit_docstrings = False

html_theme = "alabaster"
html_theme_options = {
    "description": "PyTorch worker pools for Flask",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
