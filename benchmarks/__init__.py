"""Benchmarks for flask_torchpool; run them from the repository root (``python benchmarks/...``).

A package so that pool workers can import ``benchmarks.models:identity_factory`` by name.
"""
