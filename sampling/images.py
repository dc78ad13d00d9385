"""Image output: [-1, 1] floats to uint8, PNG files, and captioned grids."""

import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255] (rounded, clipped)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(image).save(path)


def captioned_grid(images: np.ndarray, captions: Sequence[str], per_row: int, *, scale: int = 2,
                   label_width: int = 180) -> np.ndarray:
  """A grid with one row per caption: the caption on the left, its `per_row` samples beside it.

  images: uint8 [len(captions) * per_row, H, W, C], grouped by caption.
  """
  n, h, w, _ = images.shape
  rows = n // per_row
  cell_h, cell_w = h * scale, w * scale
  font = ImageFont.load_default()
  canvas = Image.new('RGB', (label_width + per_row * (cell_w + 2), rows * (cell_h + 2)), (40, 40, 40))
  draw = ImageDraw.Draw(canvas)
  for r in range(rows):
    y = r * (cell_h + 2)
    lines = textwrap.wrap(captions[r], width=max(label_width // 6, 8))[:max(cell_h // 11, 1)]
    for i, line in enumerate(lines):
      draw.text((4, y + 2 + 11 * i), line, fill=(230, 230, 230), font=font)
    for c in range(per_row):
      img = Image.fromarray(images[r * per_row + c]).resize((cell_w, cell_h), Image.NEAREST)
      canvas.paste(img, (label_width + c * (cell_w + 2), y))
  return np.asarray(canvas)
