"""Exact scoring of images against Shapes captions (spec: docs/shapes.md, "Scoring").

An image is read as connected components: channels thresholded at 128 give one of
7 palette codes or black; 4-connected components per code smaller than 2% of S*S
are dropped; each component's fill (area / bounding-box area) names its shape.

Per-image metrics (`score_image`), each a bool, or None where undefined:
  count:      the number of components equals the number of caption objects.
  colour:     every caption object's colour is present as a component (as a
              multiset: "a red square left of a red circle" needs two red components).
  shape:      among caption objects whose colour was found, each has a component of
              that colour with the caption's shape (multiset matching per colour);
              None when no caption colour was found.
  left_right: two-object captions only, and only when both caption objects are found
              (colour and shape) as distinct components: some such pair has the
              left object's centroid strictly left of the right object's. None otherwise.
  full:       the components are exactly the caption's objects (same multiset of
              colour-shape pairs, hence same count) and, for two objects, left_right.
`aggregate` averages each metric over the images where it is defined, over all
images and over the images whose caption names a held-out pair.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from data import randomness, shapes

METRICS = ('full', 'colour', 'shape', 'count', 'left_right')
MIN_AREA_FRACTION = 0.02
_CODE_TO_COLOUR = {
    int(r >= 128) * 4 + int(g >= 128) * 2 + int(b >= 128): name
    for name, (r, g, b) in shapes.COLOURS.items()
}
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_OBJECT = rf"a ({'|'.join(shapes.COLOURS)}) ({'|'.join(shapes.SHAPES)})"
_SINGLE_RE = re.compile(_OBJECT)
_TWO_RE = re.compile(rf"{_OBJECT} to the (left|right) of {_OBJECT}")


@dataclasses.dataclass(frozen=True)
class Component:
  """A connected component: colour name, shape name ('unknown' if no fill band), centroid x."""
  colour: str
  shape: str
  centroid_x: float
  area: int
  fill: float


def parse_caption(caption: str) -> list[tuple[str, str]]:
  """(colour, shape) of each caption object in left-to-right order; ValueError if unparsable."""
  text = ' '.join(caption.strip().lower().split())
  if m := _SINGLE_RE.fullmatch(text):
    return [(m[1], m[2])]
  if m := _TWO_RE.fullmatch(text):
    first, second = (m[1], m[2]), (m[4], m[5])
    return [first, second] if m[3] == 'left' else [second, first]
  raise ValueError(
      f'Cannot parse Shapes caption {caption!r}: expected "a <colour> <shape>" or '
      '"a <colour> <shape> to the left|right of a <colour> <shape>" with colours '
      f'{tuple(shapes.COLOURS)} and shapes {shapes.SHAPES}.')


def shape_from_fill(fill: float) -> str:
  """Spec thresholds: square >= 0.92 > circle >= 0.66 > triangle >= 0.30 > unknown."""
  if fill >= 0.92:
    return 'square'
  if fill >= 0.66:
    return 'circle'
  if fill >= 0.30:
    return 'triangle'
  return 'unknown'


def components(image: np.ndarray) -> list[Component]:
  """Connected components (4-connectivity, per colour code, area >= 2% of S*S) of a uint8 image."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f'Expected a square RGB image [S, S, 3], got shape {image.shape}.')
  bits = image >= 128
  codes = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2] * 1
  min_area = MIN_AREA_FRACTION * image.shape[0] * image.shape[1]
  found = []
  for code, colour in sorted(_CODE_TO_COLOUR.items()):
    labels, _ = ndimage.label(codes == code, structure=_FOUR_CONNECTED)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
      mask = labels[box] == k
      area = int(mask.sum())
      if area < min_area:
        continue
      fill = area / mask.size
      cx = box[1].start + float(np.nonzero(mask)[1].mean()) + 0.5
      found.append(Component(colour, shape_from_fill(fill), cx, area, fill))
  return found


def _has_held_out_pair(pairs: Iterable[tuple[str, str]]) -> bool:
  return any(p in shapes.HELD_OUT_PAIRS for p in pairs)


def _multiset_overlap(a: Iterable[Any], b: Iterable[Any]) -> int:
  return sum((collections.Counter(a) & collections.Counter(b)).values())


def score_image(image: np.ndarray, caption: str) -> dict[str, Any]:
  """Per-image metrics (see module docstring) plus 'held_out' and 'num_objects' of the caption."""
  wanted = parse_caption(caption)
  comps = components(image)
  got = [(c.colour, c.shape) for c in comps]
  colours_wanted = [c for c, _ in wanted]
  colours_got = [c.colour for c in comps]
  colour_ok = _multiset_overlap(colours_wanted, colours_got) == len(wanted)
  # Shape given colour: per colour, the found objects (min of wanted/got) must all match in shape.
  found_per_colour = {
      c: min(colours_wanted.count(c), colours_got.count(c)) for c in set(colours_wanted)}
  num_found = sum(found_per_colour.values())
  shape_ok = None
  if num_found:
    shape_ok = all(
        _multiset_overlap([p for p in wanted if p[0] == c], [p for p in got if p[0] == c]) >= n
        for c, n in found_per_colour.items())
  left_right = None
  if len(wanted) == 2:
    lefts = [c for c in comps if (c.colour, c.shape) == wanted[0]]
    rights = [c for c in comps if (c.colour, c.shape) == wanted[1]]
    pairs = [(a, b) for a in lefts for b in rights if a is not b]
    if pairs:
      left_right = any(a.centroid_x < b.centroid_x for a, b in pairs)
  exact = collections.Counter(got) == collections.Counter(wanted)
  return {
      'full': bool(exact and left_right is not False),
      'colour': colour_ok,
      'shape': shape_ok,
      'count': len(comps) == len(wanted),
      'left_right': left_right,
      'held_out': _has_held_out_pair(wanted),
      'num_objects': len(wanted),
  }


def _summarise(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  summary: dict[str, Any] = {'n': len(scores)}
  for m in METRICS:
    defined = [bool(s[m]) for s in scores if s[m] is not None]
    summary[m] = float(np.mean(defined)) if defined else None
    summary[f'n_{m}'] = len(defined)
  return summary


def aggregate(scores: Sequence[Mapping[str, Any]],
              captions: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  """Accuracies over `score_image` dicts: {'all': ..., 'held_out': ...}.

  Each group maps every metric in METRICS to its mean over the images where it is
  defined (None if none) and 'n_<metric>' to that number of images; 'n' is the
  number of images. 'held_out' restricts to captions naming a held-out pair, read
  from `captions` when given (one per score), else from each score's 'held_out'.
  """
  if captions is None:
    held = [bool(s['held_out']) for s in scores]
  elif len(captions) != len(scores):
    raise ValueError(f'aggregate got {len(scores)} scores but {len(captions)} captions.')
  else:
    held = [_has_held_out_pair(parse_caption(c)) for c in captions]
  return {
      'all': _summarise(scores),
      'held_out': _summarise([s for s, h in zip(scores, held) if h]),
  }


def benchmark_prompts(num_two_object: int = 42, seed: int = 0) -> list[str]:
  """The fixed evaluation prompts: all 21 single-object prompts, then `num_two_object` two-object ones.

  Two-object prompts are distinct ordered (left, right) pairs of distinct
  colour-shape objects drawn from all 21 (held-out pairs included) without
  replacement, deterministically from `seed`; forms alternate 'left', 'right'.
  """
  ordered = [(a, b) for a in shapes.ALL_PAIRS for b in shapes.ALL_PAIRS if a != b]
  if not 0 <= num_two_object <= len(ordered):
    raise ValueError(
        f'num_two_object must be in [0, {len(ordered)}], got {num_two_object}.')
  if seed < 0:
    raise ValueError(f'benchmark_prompts seed must be non-negative, got {seed}.')
  order = np.argsort(randomness.uniforms((0x5052, seed), len(ordered)), kind='stable')
  singles = [shapes.object_phrase(c, s) for c, s in shapes.ALL_PAIRS]
  doubles = [
      shapes.two_object_caption(*ordered[k], ('left', 'right')[i % 2])
      for i, k in enumerate(order[:num_two_object])
  ]
  return singles + doubles


def read_manifest(folder: str) -> list[dict[str, Any]]:
  """Entries of `folder/manifest.jsonl`, each with at least 'file' and 'prompt'."""
  path = os.path.join(folder, 'manifest.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'No manifest at {path}: a samples folder needs manifest.jsonl with one JSON '
        'object per line holding "file" (PNG path relative to the folder) and "prompt".')
  entries = []
  with open(path) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno} is not valid JSON ({e}).') from e
      if not isinstance(entry, dict) or 'file' not in entry or 'prompt' not in entry:
        raise ValueError(f'{path}:{lineno} needs a JSON object with "file" and "prompt".')
      entries.append(entry)
  if not entries:
    raise ValueError(f'{path} lists no samples.')
  return entries


def load_image(path: str) -> np.ndarray:
  """uint8 [S, S, 3] RGB pixels of an image file; FileNotFoundError/ValueError name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Sample image {path} (listed in manifest.jsonl) does not exist.')
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except OSError as e:
    raise ValueError(f'Cannot read sample image {path}: {e}') from e


def score_folder(folder: str) -> dict[str, dict[str, Any]]:
  """Scores every (PNG, prompt) listed in `folder/manifest.jsonl`; returns `aggregate` of the scores."""
  from runtime import console  # pylint: disable=g-import-not-at-top
  scores = []
  entries = read_manifest(folder)
  bar = console.progress(len(entries), 'score', 'img', disable=len(entries) < 100)
  for entry in entries:
    bar.update(1)
    path = os.path.join(folder, entry['file'])
    image = load_image(path)
    try:
      scores.append(score_image(image, entry['prompt']))
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e
  bar.close()
  return aggregate(scores)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A small text table of `aggregate` results: one row per metric, one column per group."""
  groups = list(results)
  rows = [f"{'metric':<12}" + ''.join(f'{g:>18}' for g in groups)]
  for m in METRICS + ('n',):
    cells = []
    for g in groups:
      value = results[g][m]
      if m == 'n':
        cells.append(f'{value:>18d}')
      elif value is None:
        cells.append(f"{'-':>18}")
      else:
        cells.append(f"{100 * value:>10.1f}% ({results[g]['n_' + m]:>4d})")
    rows.append(f'{m:<12}' + ''.join(cells))
  return '\n'.join(rows)
