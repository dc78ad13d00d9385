"""Captioned grid pages: screen-sized, prompts as rows and samples as columns, wrapped captions."""

import os

import numpy as np
from PIL import Image

from configs import shapes, specs
from sampling import from_checkpoint, images

MAX_W, MAX_H = 1600, 1000
SPACE = images.SPACE  # Page margin.


def solid_images(n, size=32):
  """n solid images, image i of colour (200, 255 - i, i): distinct, and never grey like text."""
  i = np.arange(n)
  colours = np.stack([np.full(n, 200), 255 - i, i], axis=-1).astype(np.uint8)
  return np.broadcast_to(colours[:, None, None, :], (n, size, size, 3)).copy()


def cells(page):
  """{i: (bounding box (top, left, bottom, right), pixel count)} of the images on a page."""
  r, g, b = (page[..., k].astype(int) for k in range(3))
  ys, xs = np.nonzero((r == 200) & (g + b == 255))
  ids = b[ys, xs]
  out = {}
  for i in np.unique(ids):
    y, x = ys[ids == i], xs[ids == i]
    out[int(i)] = ((y.min(), x.min(), y.max() + 1, x.max() + 1), len(y))
  return out


def where(page, i):
  """Bounding box and pixel count of image i's colour on a page (None, 0 when absent)."""
  return cells(page).get(i, (None, 0))


def text_lines(region):
  """Runs of consecutive pixel rows with light (text) pixels."""
  rows = np.any(region.min(axis=-1) > 120, axis=1)
  return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])


def captions(n):
  return [f'a shape number {i} to the left of another shape' for i in range(n)]


def test_63_prompts_of_one_sample_fit_one_screen_page():
  pages = images.captioned_pages(solid_images(63), captions(63), 1)
  assert len(pages) == 1  # (One block per line would be 4,158 px tall.)
  (page,) = pages
  assert page.dtype == np.uint8 and page.shape[2] == 3
  assert page.shape[0] <= MAX_H and page.shape[1] <= MAX_W
  found = cells(page)
  assert sorted(found) == list(range(63))
  boxes = [found[i][0] for i in range(63)]
  assert all(b[2] - b[0] >= 64 for b in boxes)  # Upscaled to >= 64 px cells.
  per_line = len({b[1] for b in boxes})
  assert 4 <= per_line <= 8  # Several blocks side by side ...
  assert [b[0] for b in boxes] == sorted(b[0] for b in boxes)  # ... in reading order.
  assert boxes[1][0] == boxes[0][0] and boxes[1][1] > boxes[0][1]


def test_4_prompts_of_4_samples_are_rows_and_columns_on_one_page():
  pages = images.captioned_pages(solid_images(16), captions(4), 4)
  assert len(pages) == 1
  page = pages[0]
  assert page.shape[0] <= MAX_H and page.shape[1] <= MAX_W
  found = cells(page)
  boxes = {(r, c): found[4 * r + c] for r in range(4) for c in range(4)}
  (top, left, bottom, right), _ = boxes[0, 0]
  side = bottom - top
  assert side >= 64 and side % 32 == 0 and right - left == side  # Whole-factor upscaling.
  for (r, c), (box, count) in boxes.items():
    assert count == side * side  # One whole solid cell: the image, once.
    assert box[0] == boxes[r, 0][0][0] and box[1] == boxes[0, c][0][1]  # Row r, column c.
    if r:
      assert box[0] >= boxes[r - 1, c][0][2]  # Prompt r under prompt r - 1.
    if c:
      assert box[1] >= boxes[r, c - 1][0][3]  # Sample c right of sample c - 1.
  for r in range(4):  # Each row's caption on its left.
    (top, _, bottom, _), _ = boxes[r, 0]
    assert text_lines(page[top:bottom, SPACE:left]) >= 1


def test_long_caption_is_wrapped_within_its_block():
  long = ('a red circle to the left of a blue square above a green triangle beside a yellow '
          'star under a white moon next to a cyan hexagon and a magenta supercalifragilistic')
  pages = images.captioned_pages(solid_images(2), ['a red square', long], 1, max_cell=64,
                                 label_width=180)
  assert len(pages) == 1
  page = pages[0]
  (top0, left0, bottom0, _), _ = where(page, 0)
  (top1, left1, bottom1, right1), _ = where(page, 1)
  assert left0 == left1 <= SPACE + 180 and top1 >= bottom0  # One block per line; same label.
  assert text_lines(page[top0:bottom0, SPACE:left0]) == 1  # The short caption: one line.
  label = page[top1:, SPACE:left1]
  assert text_lines(label) >= 5  # Wrapped over several lines, not cut at the label's edge:
  text_rows = np.nonzero(np.any(label.min(axis=-1) > 120, axis=1))[0]
  assert top1 + text_rows.max() >= bottom1  # the block grew below its sample to hold them all,
  assert top1 + text_rows.max() < page.shape[0] - SPACE  # and the page holds the block.
  assert not np.any(page[top1:, right1:].min(axis=-1) > 120)  # Nothing right of the block.


def test_200_prompts_take_several_pages_with_every_image_once():
  pages = images.captioned_pages(solid_images(200), captions(200), 1)
  assert 2 <= len(pages) <= 4
  assert all(p.shape[0] <= MAX_H and p.shape[1] <= MAX_W for p in pages)
  assert len({p.shape[1] for p in pages}) == 1  # Same width on every page.
  found = {}
  for k, page in enumerate(pages):
    for i, (box, count) in cells(page).items():
      assert (box[2] - box[0]) * (box[3] - box[1]) == count  # One solid cell on the page.
      found.setdefault(i, []).append((k, count))
  assert sorted(found) == list(range(200))
  assert all(len(v) == 1 for v in found.values())  # Every image on exactly one page ...
  assert len({v[0][1] for v in found.values()}) == 1  # ... at one cell size,
  assert [v[0][0] for _, v in sorted(found.items())] == sorted(v[0][0] for v in found.values())
  counts = [sum(v[0][0] == k for v in found.values()) for k in range(len(pages))]
  per_line = len({box[1] for box, _ in cells(pages[0]).values()})
  assert max(counts) - min(counts) < 2 * per_line  # and the pages evenly filled (+-1 line).


def test_page_counts_follow_the_layout():
  """The quickstart's 63 prompts x 4 samples at 32 px: two pages; 8 px images are upscaled."""
  pages = images.captioned_pages(solid_images(252), captions(63), 4)
  assert len(pages) == 2 and all(p.shape[0] <= MAX_H and p.shape[1] <= MAX_W for p in pages)
  small = images.captioned_pages(solid_images(6, size=8), captions(3), 2)
  box, count = where(small[0], 0)
  assert box[2] - box[0] >= 64 and count == (box[2] - box[0]) ** 2


class FakeGenerator:
  """Stands in for generate.Generator: solid images, no network (sample_to_folder's files only)."""

  def __init__(self, settings):
    self.spec = settings.diffusion
    self.image_size = 16
    self.vae = None
    self.calls = 0
    self.compile_seconds = 0.0

  def __call__(self, unet_params, text_params, prompts, *, seed, settings, negative_prompt=''):
    del unet_params, text_params, seed, settings, negative_prompt
    start, self.calls = self.calls, self.calls + len(prompts)
    return solid_images(start + len(prompts), size=16)[start:] / 127.5 - 1.0


def test_sample_to_folder_writes_one_grid_file_per_page(tmp_path):
  settings = specs.build(shapes.get_config('tiny'))
  loaded = from_checkpoint.Loaded(settings, FakeGenerator(settings), None, None, step=0)
  prompts = captions(150)
  summary = from_checkpoint.sample_to_folder(loaded, str(tmp_path), prompts, settings.sampler,
                                             batch_size=150)
  names = [os.path.basename(p) for p in summary['grids']]
  assert len(names) >= 2 and names == ['grid.png'] + [f'grid_{k}.png'
                                                      for k in range(2, len(names) + 1)]
  assert sorted(f for f in os.listdir(tmp_path) if f.startswith('grid')) == sorted(names)
  for path in summary['grids']:
    width, height = Image.open(path).size
    assert width <= MAX_W and height <= MAX_H
