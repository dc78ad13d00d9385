"""Image output: [-1, 1] floats to uint8, PNG files, and captioned grids in screen-sized pages."""

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAGE_COLOUR = (20, 20, 20)
BLOCK_COLOUR = (40, 40, 40)  # Behind a caption and between its samples.
TEXT_COLOUR = (230, 230, 230)
SPACE = 8  # Pixels between blocks and around a page.
GAP = 2  # Pixels between the samples of a block.
PAD = 4  # Pixels around a caption's text.


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255] (rounded, clipped)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(image).save(path)


def page_names(stem: str, count: int) -> list[str]:
  """Names of `count` pages: stem, stem_2, stem_3, ..."""
  return [stem] + [f'{stem}_{k}' for k in range(2, count + 1)]


def save_pages(pages: Sequence[np.ndarray], directory: str, stem: str = 'grid') -> list[str]:
  """Writes DIRECTORY/STEM.png, STEM_2.png, ...; returns their paths."""
  paths = [os.path.join(directory, f'{name}.png') for name in page_names(stem, len(pages))]
  for page, path in zip(pages, paths):
    save_png(page, path)
  return paths


def captioned_pages(images: np.ndarray, captions: Sequence[str], per_row: int, *,
                    max_width: int = 1600, max_height: int = 1000, min_cell: int = 64,
                    max_cell: int = 128, label_width: int = 180,
                    font_size: int = 12) -> list[np.ndarray]:
  """Captioned grids of samples, in pages of at most max_width x max_height pixels.

  images: uint8 [len(captions) * per_row, H, W, C], grouped by caption.

  Layout. Each caption makes a block: the caption on the left (light text on dark, wrapped to
  the label width: `label_width`, or the widest caption's when narrower), its `per_row`
  samples beside it in one row, left to right. A block is as tall as a sample, or as its
  wrapped caption when that is taller. Blocks follow each other in reading order: several side
  by side on a line when they are narrow, lines one under another, lines grouped into pages.
  The layout takes the fewest pages, then the fewest blocks per line that still needs no more
  pages (one block per line, i.e. prompts as rows and samples as columns, whenever that fits),
  then spreads the lines evenly over the pages. Samples are upscaled (nearest neighbour) by a
  whole factor, at least 1x and enough for `min_cell`-pixel cells; up to `max_cell` pixels when
  that takes no more pages. All pages have the same width; their heights differ by about a line
  at most. Only a block wider than max_width (many or large samples, which are never shrunk) or
  a caption taller than max_height makes a page larger than the bounds.

  Returns the pages, uint8 [height, width, 3].
  """
  images = np.asarray(images)
  if images.ndim == 3 or images.shape[-1] == 1:  # Greyscale: draw as RGB.
    images = np.repeat(images.reshape(images.shape[:3] + (1,)), 3, axis=-1)
  n = len(captions)
  if images.shape[0] != n * per_row:
    raise ValueError(f'{images.shape[0]} images for {n} captions x {per_row} per caption.')
  if n == 0:
    return []
  h, w = images.shape[1:3]
  font = ImageFont.load_default(size=font_size)
  line_height = font.getbbox('Ag')[3] + 3
  label_w = min(label_width, math.ceil(max(font.getlength(c) for c in captions)) + 2 * PAD)
  wrapped = [_wrap(c, font, label_w - 2 * PAD) for c in captions]
  text_h = [2 * PAD + len(lines) * line_height for lines in wrapped]

  def layout(scale):
    block_w = label_w + per_row * (w * scale + GAP) - GAP
    heights = [max(h * scale, t) for t in text_h]
    most = min(n, max(1, (max_width - SPACE) // (block_w + SPACE)))
    best = None
    for cols in range(1, most + 1):
      lines = [list(range(i, min(i + cols, n))) for i in range(0, n, cols)]
      line_h = [max(heights[b] for b in line) for line in lines]
      pages = _paginate(line_h, max_height)
      if best is None or len(pages) < len(best[2]):
        best = (cols, block_w, [[(lines[i], line_h[i]) for i in page] for page in pages])
      if len(pages) == 1:
        break
    return best

  side = max(h, w)
  smallest = max(1, math.ceil(min_cell / side))
  scale, (cols, block_w, pages) = smallest, layout(smallest)
  for larger in range(max(smallest, max_cell // side), smallest, -1):
    candidate = layout(larger)
    if len(candidate[2]) <= len(pages):
      scale, (cols, block_w, pages) = larger, candidate
      break

  page_w = cols * (block_w + SPACE) + SPACE
  cells = [Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST) for img in images]
  out = []
  for page in pages:
    canvas = Image.new('RGB', (page_w, sum(lh + SPACE for _, lh in page) + SPACE), PAGE_COLOUR)
    draw = ImageDraw.Draw(canvas)
    y = SPACE
    for line, lh in page:
      for k, b in enumerate(line):
        x = SPACE + k * (block_w + SPACE)
        draw.rectangle((x, y, x + block_w - 1, y + lh - 1), fill=BLOCK_COLOUR)
        for i, text in enumerate(wrapped[b]):
          draw.text((x + PAD, y + PAD + i * line_height), text, fill=TEXT_COLOUR, font=font)
        for c in range(per_row):
          canvas.paste(cells[b * per_row + c], (x + label_w + c * (w * scale + GAP), y))
      y += lh + SPACE
    out.append(np.asarray(canvas))
  return out


def _wrap(text: str, font, width: int) -> list[str]:
  """Greedy word wrap to `width` pixels; a word longer than a line is broken."""
  lines = []
  for word in text.split():
    if lines and font.getlength(f'{lines[-1]} {word}') <= width:
      lines[-1] = f'{lines[-1]} {word}'
      continue
    while len(word) > 1 and font.getlength(word) > width:
      k = len(word) - 1
      while k > 1 and font.getlength(word[:k]) > width:
        k -= 1
      lines.append(word[:k])
      word = word[k:]
    lines.append(word)
  return lines


def _paginate(line_heights: Sequence[int], max_height: int) -> list[list[int]]:
  """Lines -> pages (lists of line indices): the fewest pages of at most max_height pixels
  (a line taller than that gets a page of its own), the lines spread evenly when they fit so."""
  pages, used = [[]], SPACE
  for i, lh in enumerate(line_heights):  # Greedy: the fewest pages.
    if pages[-1] and used + lh + SPACE > max_height:
      pages.append([])
      used = SPACE
    pages[-1].append(i)
    used += lh + SPACE
  count, lines = len(pages), len(line_heights)
  sizes = [lines // count + (k < lines % count) for k in range(count)]
  starts = np.cumsum([0] + sizes)
  even = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
  fits = all(SPACE + sum(line_heights[i] + SPACE for i in page) <= max_height for page in even)
  return even if fits else pages
