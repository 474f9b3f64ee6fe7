"""The servers that ``benchmarks/http.py`` compares, each a script or app factory run as a subprocess.

``common`` holds what every server does the same way: read the workload from the environment, decode a
raw float32 body with ``torch.frombuffer``, encode a small JSON answer. ``flask_app`` serves the model
in-process (plain Flask, gunicorn sync workers) or through flask_torchpool; ``litserve_app`` serves it
with LitServe; ``raw`` runs the model alone, without HTTP, for the limit every server is measured against.
"""
