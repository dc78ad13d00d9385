"""Shapes renderer and scene sampler against the spec (docs/shapes.md) and brute-force references."""
import collections
import math
import os

import numpy as np
import pytest

from data import shapes

PALETTE = {(0, 0, 0)} | set(shapes.COLOURS.values())


def brute_force_mask(shape, x0, y0, side, size):
  """Pixel-by-pixel reference, written independently of shapes.shape_mask (half-planes, hypot)."""
  mask = np.zeros((size, size), bool)
  ax, ay = x0 + side / 2, y0                      # triangle apex
  bx, by, cx, cy = x0, y0 + side, x0 + side, y0 + side  # base corners
  def cross(px, py, qx, qy, rx, ry):
    return (qx - px) * (ry - py) - (qy - py) * (rx - px)
  for i in range(size):
    for j in range(size):
      px, py = j + 0.5, i + 0.5
      if shape == 'square':
        inside = x0 <= px <= x0 + side and y0 <= py <= y0 + side
      elif shape == 'circle':
        inside = math.hypot(px - (x0 + side / 2), py - (y0 + side / 2)) <= side / 2
      else:
        d = (cross(ax, ay, bx, by, px, py), cross(bx, by, cx, cy, px, py),
             cross(cx, cy, ax, ay, px, py))
        inside = all(v <= 0 for v in d) or all(v >= 0 for v in d)
      mask[i, j] = inside
  return mask


@pytest.mark.parametrize('shape', shapes.SHAPES)
def test_shape_masks_match_pixel_centre_brute_force(shape):
  rng = np.random.default_rng(1)
  for _ in range(12):
    size = int(rng.choice(shapes.IMAGE_SIZES))
    side = rng.uniform(0.25, 0.45) * size
    x0, y0 = rng.uniform(0, size - side, 2)
    got = shapes.shape_mask(shape, x0, y0, side, size)
    np.testing.assert_array_equal(got, brute_force_mask(shape, x0, y0, side, size))


@pytest.mark.parametrize('shape,area_fraction', [
    ('square', 1.0), ('circle', math.pi / 4), ('triangle', 0.5)])
def test_mask_area_approaches_closed_form_area(shape, area_fraction):
  size, side = 64, 25.3
  mask = shapes.shape_mask(shape, 20.2, 17.7, side, size)
  exact = area_fraction * side**2
  # Rasterising by pixel centres errs by at most about the perimeter in pixels.
  assert abs(mask.sum() - exact) < 4 * side
  rows, cols = np.nonzero(mask)
  assert rows.min() >= 17 and rows.max() <= 17.7 + side
  assert cols.min() >= 20 and cols.max() <= 20.2 + side


def test_triangle_apex_on_top_base_on_bottom():
  mask = shapes.shape_mask('triangle', 0.0, 0.0, 64.0, 64)
  widths = mask.sum(axis=1)
  assert widths[0] <= 2 and widths[-1] == 64
  assert np.all(np.diff(widths) >= 0)


def test_render_object_uses_the_named_colour_and_rejects_unknown_names():
  canvas = np.zeros((16, 16, 3), np.uint8)
  shapes.render_object(canvas, 'magenta', 'square', 2.0, 3.0, 5.0)
  assert (canvas[3:8, 2:7] == (255, 0, 255)).all()
  assert canvas.reshape(-1, 3).any(axis=1).sum() == 25
  with pytest.raises(ValueError, match='pink'):
    shapes.render_object(canvas, 'pink', 'square', 0, 0, 4)
  with pytest.raises(ValueError, match='hexagon'):
    shapes.render_object(canvas, 'red', 'hexagon', 0, 0, 4)


@pytest.mark.parametrize('size', shapes.IMAGE_SIZES)
def test_scenes_follow_the_spec(size):
  counts = collections.Counter()
  for index in range(300):
    scene = shapes.sample_scene('test', index, size)
    image = shapes.render_scene(scene, size)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    assert {tuple(p) for p in image.reshape(-1, 3)} <= PALETTE
    objs = scene.objects
    counts[len(objs)] += 1
    lo, hi = shapes.ONE_OBJECT_SIDE if len(objs) == 1 else shapes.TWO_OBJECT_SIDE
    for o in objs:
      assert lo * size <= o.side <= hi * size
      assert 0 <= o.x0 and o.x0 + o.side <= size and 0 <= o.y0 and o.y0 + o.side <= size
    if len(objs) == 2:
      left, right = objs
      assert left.x0 + left.side <= size / 2 <= right.x0
      assert (left.colour, left.shape) != (right.colour, right.shape)
  assert set(counts) == {1, 2} and abs(counts[1] - 150) < 45  # About half each.


def test_two_object_scene_paints_each_object_in_its_half():
  scene = next(s for s in (shapes.sample_scene('test', i, 32) for i in range(50))
               if len(s.objects) == 2 and s.objects[0].colour != s.objects[1].colour)
  image = shapes.render_scene(scene, 32)
  left, right = (np.all(image == shapes.COLOURS[o.colour], axis=-1) for o in scene.objects)
  assert left.any() and right.any()
  assert not left[:, 16:].any() and not right[:, :16].any()


def test_scenes_are_a_pure_function_of_split_index_and_size():
  for split in shapes.SPLITS:
    for index in (0, 7, 123456):
      a, b = shapes.example(split, index, 32), shapes.example(split, index, 32)
      np.testing.assert_array_equal(a[0], b[0])
      assert a[1] == b[1]
  # Different indices, splits and sizes give different scenes.
  captions = {shapes.example('train', i, 32)[1] for i in range(40)}
  assert len(captions) > 20
  assert shapes.sample_scene('train', 3, 32) != shapes.sample_scene('test', 3, 32)
  assert shapes.sample_scene('train', 3, 32) != shapes.sample_scene('train', 3, 64)


def test_held_out_pairs_never_in_train_and_all_pairs_in_test():
  def pairs(split, n):
    return collections.Counter((o.colour, o.shape) for i in range(n)
                               for o in shapes.sample_scene(split, i, 32).objects)
  train, test = pairs('train', 5000), pairs('test', 2000)
  assert not set(train) & shapes.HELD_OUT_PAIRS
  assert set(train) == set(shapes.ALL_PAIRS) - shapes.HELD_OUT_PAIRS
  assert set(test) == set(shapes.ALL_PAIRS)
  # Uniform over the allowed pairs: every pair within 30% of its expected count.
  expected = sum(train.values()) / 18
  assert all(abs(c - expected) < 0.3 * expected for c in train.values())


def test_captions_name_objects_in_both_forms():
  forms = collections.Counter()
  for index in range(200):
    scene = shapes.sample_scene('test', index, 32)
    text = shapes.caption(scene)
    if len(scene.objects) == 1:
      o = scene.objects[0]
      assert text == f'a {o.colour} {o.shape}'
      continue
    (c1, s1), (c2, s2) = ((o.colour, o.shape) for o in scene.objects)
    assert text in (f'a {c1} {s1} to the left of a {c2} {s2}',
                    f'a {c2} {s2} to the right of a {c1} {s1}')
    forms['left' if 'left' in text else 'right'] += 1
  assert min(forms.values()) > 25  # Both forms, with roughly equal chance.


def test_caption_form_override():
  scene = shapes.Scene((shapes.Object('red', 'square', 1, 1, 5), shapes.Object('blue', 'circle', 20, 1, 5)))
  assert shapes.caption(scene) == 'a red square to the left of a blue circle'
  assert shapes.caption(scene, 1) == 'a blue circle to the right of a red square'
  assert shapes.caption(scene, 2) == 'a red square to the left of a blue circle'
  rng = np.random.default_rng(0)
  assert {shapes.caption(scene, rng) for _ in range(20)} == {
      shapes.caption(scene, 0), shapes.caption(scene, 1)}


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='data.image_size'):
    shapes.sample_scene('train', 0, 24)
  with pytest.raises(ValueError, match='valid'):
    shapes.sample_scene('valid', 0, 32)
  with pytest.raises(ValueError, match='non-negative'):
    shapes.sample_scene('train', -1, 32)


@pytest.mark.full  # Two processes building TFDS data: ~10 s.
def test_two_processes_prepare_the_same_data_dir_at_once(tmp_path):
  """Sweep members (or hosts) started together: one writes the TFDS Shapes data, the other waits
  for it and finds it written (without the file lock, TFDS's rename collided)."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys; from data import shapes_tfds; '
          'b = shapes_tfds.prepare(sys.argv[1], 16, 64, 16); '
          "print(len(b.as_data_source('train')))")
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'tfds')], cwd=root,
                            env={**os.environ, 'PYTHONPATH': root}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  assert [o.strip().splitlines()[-1] for o, _ in outs] == ['64', '64']
