"""The Shapes benchmark: procedural captioned scenes (renderer, scene sampler, captions).

Implements the Shapes specification in docs/shapes.md. Pure numpy.

Coordinates: x is the column, y the row, both in pixels with the origin at the
top-left corner of the canvas; pixel (row i, column j) has its centre at
(x, y) = (j + 0.5, i + 0.5) and belongs to a shape when that centre lies inside
it (boundary included). A box is (x0, y0, L): the square [x0, x0+L] x [y0, y0+L].

Scenes are a pure function of (split, index, S): every random number comes from
the raw 64-bit stream of a Philox bit generator keyed by a SeedSequence of those
three integers. Only the bit stream is used (numpy guarantees it across
versions), never `Generator` distribution methods (which numpy may change).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from data import randomness

COLOURS: dict[str, tuple[int, int, int]] = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'magenta': (255, 0, 255),
    'cyan': (0, 255, 255),
    'white': (255, 255, 255),
}
SHAPES: tuple[str, ...] = ('square', 'circle', 'triangle')
# Colour-shape pairs never seen in the training split (compositional generalisation).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {('green', 'triangle'), ('yellow', 'circle'), ('magenta', 'square')})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))
SPLITS: tuple[str, ...] = ('train', 'test')
IMAGE_SIZES: tuple[int, ...] = (16, 32, 64)

# Box side L as a fraction of S (spec: "Scenes and captions").
ONE_OBJECT_SIDE = (0.30, 0.45)
TWO_OBJECT_SIDE = (0.25, 0.40)

_SCENE_STREAM = 0x5348  # Domain tag so scene streams never collide with other uses.
_NUM_UNIFORMS = 10  # Fixed draw count per scene: layout never depends on earlier choices.


@dataclasses.dataclass(frozen=True)
class Object:
  """One filled shape: palette colour, shape name, box top-left (x0, y0) and side L in pixels."""
  colour: str
  shape: str
  x0: float
  y0: float
  side: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects in left-to-right order, and the caption form ('left' or 'right') for two objects."""
  objects: tuple[Object, ...]
  form: str = 'left'


def allowed_pairs(split: str) -> tuple[tuple[str, str], ...]:
  """Colour-shape pairs a split draws from: 18 for 'train', all 21 for 'test'."""
  if split == 'train':
    return tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
  if split == 'test':
    return ALL_PAIRS
  raise ValueError(f"Unknown Shapes split {split!r}: use one of {SPLITS}.")


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) of every pixel centre, each [S, S] (row-major: y varies along axis 0)."""
  c = np.arange(size, dtype=np.float64) + 0.5
  return np.meshgrid(c, c, indexing='xy')


def shape_mask(shape: str, x0: float, y0: float, side: float, size: int) -> np.ndarray:
  """Boolean [S, S] mask of the pixels whose centre lies inside the shape (spec: "Shapes")."""
  x, y = _pixel_centres(size)
  if shape == 'square':
    return (x >= x0) & (x <= x0 + side) & (y >= y0) & (y <= y0 + side)
  if shape == 'circle':
    r = side / 2
    return (x - (x0 + r))**2 + (y - (y0 + r))**2 <= r * r
  if shape == 'triangle':
    # Apex at (x0 + L/2, y0), base on y = y0 + L: half-width grows as (y - y0) / 2.
    return (y <= y0 + side) & (2 * np.abs(x - (x0 + side / 2)) <= y - y0)
  raise ValueError(f"Unknown shape {shape!r}: use one of {SHAPES}.")


def render_object(canvas: np.ndarray, colour: str, shape: str, x0: float, y0: float,
                  L: float) -> np.ndarray:  # pylint: disable=invalid-name
  """Paints a filled shape of a palette colour into a uint8 [S, S, 3] canvas in place; returns it."""
  if colour not in COLOURS:
    raise ValueError(f"Unknown colour {colour!r}: use one of {tuple(COLOURS)}.")
  canvas[shape_mask(shape, x0, y0, L, canvas.shape[0])] = COLOURS[colour]
  return canvas


def check_sizes(image_size: int, num_train: int = 1, num_test: int = 1) -> None:
  """ValueError naming the data.* field unless S is in IMAGE_SIZES and the counts are positive."""
  if image_size not in IMAGE_SIZES:
    raise ValueError(
        f'data.image_size must be one of {IMAGE_SIZES} for Shapes, got {image_size!r}.')
  for field, n in (('data.num_train', num_train), ('data.num_test', num_test)):
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f'{field} must be a positive integer, got {n!r}.')


def sample_scene(split: str, index: int, size: int) -> Scene:
  """The scene of example `index` of `split` at side `size` (spec: "Scenes and captions")."""
  check_sizes(size)
  pairs = allowed_pairs(split)
  if index < 0:
    raise ValueError(f"Shapes example index must be non-negative, got {index}.")
  u = randomness.uniforms((_SCENE_STREAM, SPLITS.index(split), size, index), _NUM_UNIFORMS)
  num_objects = 1 if u[0] < 0.5 else 2
  form = 'left' if u[1] < 0.5 else 'right'
  lo, hi = ONE_OBJECT_SIDE if num_objects == 1 else TWO_OBJECT_SIDE
  first = pairs[int(u[2] * len(pairs))]
  rest = [p for p in pairs if p != first]  # The two objects differ in colour or shape.
  chosen = (first, rest[int(u[3] * len(rest))])[:num_objects]
  # Horizontal ranges for the box's left edge: whole canvas, or left / right half.
  halves = [(0.0, float(size))] if num_objects == 1 else [(0.0, size / 2), (size / 2, float(size))]
  objects = []
  for k, ((colour, shape), (left, right)) in enumerate(zip(chosen, halves)):
    side = (lo + (hi - lo) * u[4 + 3 * k]) * size
    x0 = left + (right - left - side) * u[5 + 3 * k]
    y0 = (size - side) * u[6 + 3 * k]
    objects.append(Object(colour, shape, float(x0), float(y0), float(side)))
  return Scene(tuple(objects), form)


def render_scene(scene: Scene, size: int) -> np.ndarray:
  """uint8 [S, S, 3] image of a scene on a black background."""
  canvas = np.zeros((size, size, 3), np.uint8)
  for o in scene.objects:
    render_object(canvas, o.colour, o.shape, o.x0, o.y0, o.side)
  return canvas


def object_phrase(colour: str, shape: str) -> str:
  return f'a {colour} {shape}'


def caption(scene: Scene, rng_or_index: np.random.Generator | int | None = None) -> str:
  """Caption of a scene: `a {c} {s}` or, for two objects, the 'left' or 'right' form.

  The form is the scene's own (drawn with it) unless `rng_or_index` overrides it:
  a Generator flips a fair coin, an int picks 'left' when even and 'right' when odd.
  """
  if len(scene.objects) == 1:
    return object_phrase(scene.objects[0].colour, scene.objects[0].shape)
  if len(scene.objects) != 2:
    raise ValueError(f'A Shapes scene has one or two objects, got {len(scene.objects)}.')
  form = scene.form
  if isinstance(rng_or_index, np.random.Generator):
    form = 'left' if rng_or_index.random() < 0.5 else 'right'
  elif rng_or_index is not None:
    form = 'left' if int(rng_or_index) % 2 == 0 else 'right'
  left, right = scene.objects
  return two_object_caption((left.colour, left.shape), (right.colour, right.shape), form)


def two_object_caption(left: tuple[str, str], right: tuple[str, str], form: str) -> str:
  """`a {left} to the left of a {right}` ('left') or `a {right} to the right of a {left}` ('right')."""
  if form == 'left':
    return f'{object_phrase(*left)} to the left of {object_phrase(*right)}'
  if form == 'right':
    return f'{object_phrase(*right)} to the right of {object_phrase(*left)}'
  raise ValueError(f"Caption form must be 'left' or 'right', got {form!r}.")


def example(split: str, index: int, size: int) -> tuple[np.ndarray, str]:
  """(uint8 [S, S, 3] image, caption) of example `index` of `split` at side `size`."""
  scene = sample_scene(split, index, size)
  return render_scene(scene, size), caption(scene)
