"""Images side by side: one picture of a run's outputs."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from hybridiff.files import write_atomic


def save_grid(paths: list[Path], out: Path, columns: int = 10, gap: int = 2) -> None:
    """Draw the images at ``paths`` in rows of ``columns`` (white gaps) and write a PNG."""
    images = [Image.open(p).convert("RGB") for p in paths]
    width, height = max(i.width for i in images), max(i.height for i in images)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for n, image in enumerate(images):
        grid.paste(image, ((n % columns) * (width + gap), (n // columns) * (height + gap)))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomic(out, buffer.getvalue())
