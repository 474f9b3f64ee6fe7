"""Write ``sample.pgm`` and ``sample.json`` here: ``python -m example_app.make_samples``.

Both hold the same 28 x 28 grayscale drawing of a "7" (white ink on black, like MNIST), anti-aliased
from two line segments, so the curl examples in ``README.md`` have something to send. The output is
deterministic; rerunning it rewrites identical files.
"""

from __future__ import annotations

import math
from pathlib import Path

SIDE = 28
# The strokes of a "7" as (x0, y0, x1, y1) in pixel coordinates, and their half-width in pixels.
STROKES = ((7.0, 6.0, 21.0, 6.0), (21.0, 6.0, 12.0, 22.0))
HALF_WIDTH = 1.4
HERE = Path(__file__).resolve().parent


def draw_seven() -> list[list[int]]:
    """Return 28 rows of 28 pixel values from 0 (background) to 255 (ink)."""
    rows = []
    for y in range(SIDE):
        row = []
        for x in range(SIDE):
            distance = min(_distance_to_segment(x, y, *stroke) for stroke in STROKES)
            coverage = min(1.0, max(0.0, HALF_WIDTH + 0.5 - distance))
            row.append(round(255 * coverage))
        rows.append(row)
    return rows


def pgm_bytes(rows: list[list[int]]) -> bytes:
    """Encode rows of 0-255 values as a binary PGM (P5) file with maxval 255."""
    header = f"P5\n# a hand-drawn 7 for the flask_torchpool example\n{SIDE} {SIDE}\n255\n"
    return header.encode("ascii") + bytes(value for row in rows for value in row)


def json_text(rows: list[list[int]]) -> str:
    """Encode rows as ``{"inputs": [[784 floats]]}``, one image row per line for readability."""
    lines = (", ".join(f"{value / 255:.9g}" for value in row) for row in rows)
    return '{"inputs": [[\n  ' + ",\n  ".join(lines) + "\n]]}\n"


def _distance_to_segment(x: float, y: float, x0: float, y0: float, x1: float, y1: float) -> float:
    dx, dy = x1 - x0, y1 - y0
    t = max(0.0, min(1.0, ((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy)))
    return math.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def main() -> None:
    """Write both sample files."""
    rows = draw_seven()
    (HERE / "sample.pgm").write_bytes(pgm_bytes(rows))
    (HERE / "sample.json").write_text(json_text(rows))


if __name__ == "__main__":
    main()
