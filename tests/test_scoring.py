"""Shapes scorer: exact renders score as the spec says, corruptions fail the right metric, CLI works."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from evaluation import shapes_scorer as scoring
from data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_samples(folder, images, prompts):
  """A samples folder as sample.py writes it: PNGs plus manifest.jsonl (file, prompt, extras)."""
  with open(os.path.join(folder, 'manifest.jsonl'), 'w') as manifest:
    for i, (image, prompt) in enumerate(zip(images, prompts)):
      Image.fromarray(image).save(os.path.join(folder, f'{i:05d}.png'))
      manifest.write(json.dumps({'file': f'{i:05d}.png', 'prompt': prompt, 'seed': i}) + '\n')


def two_object_scene(first, second, size=32):
  """Left object `first`, right object `second`, well separated, mid-sized."""
  return shapes.Scene((shapes.Object(*first, 0.1 * size, 0.3 * size, 0.35 * size),
                       shapes.Object(*second, 0.55 * size, 0.3 * size, 0.35 * size)))


def test_exact_renders_score_as_the_spec_says_at_32px():
  scores = [scoring.score_image(*shapes.example('test', i, 32)) for i in range(2000)]
  result = scoring.aggregate(scores)['all']
  assert result['full'] >= 0.99 and result['colour'] >= 0.99 and result['count'] >= 0.99
  assert result['left_right'] == 1.0 and 800 < result['n_left_right'] < 1200
  held = scoring.aggregate(scores)['held_out']
  assert 0 < held['n'] < 2000 and held['full'] >= 0.98


def test_exact_renders_at_16px_blur_the_fill_thresholds():
  scores = [scoring.score_image(*shapes.example('test', i, 16)) for i in range(2000)]
  result = scoring.aggregate(scores)['all']
  # Spec: "about 88%"; the shape bands fail, not colour or count.
  assert 0.84 <= result['full'] <= 0.92
  assert result['colour'] >= 0.99 and result['count'] >= 0.99 and result['shape'] < 0.93


def test_fill_bands_follow_the_spec():
  cases = {0.29: 'unknown', 0.30: 'triangle', 0.5: 'triangle', 0.659: 'triangle', 0.66: 'circle',
           np.pi / 4: 'circle', 0.919: 'circle', 0.92: 'square', 1.0: 'square'}
  for fill, name in cases.items():
    assert scoring.shape_from_fill(fill) == name, fill


def test_components_use_4_connectivity_and_drop_specks():
  image = np.zeros((32, 32, 3), np.uint8)
  image[2:8, 2:8] = (255, 0, 0)
  image[8:14, 8:14] = (255, 0, 0)   # Touches the first square only diagonally.
  image[20, 20] = (0, 255, 0)       # A speck below 2% of the canvas.
  comps = scoring.components(image)
  assert [(c.colour, c.shape, c.area) for c in comps] == [('red', 'square', 36)] * 2
  image[8, 7] = (255, 0, 0)          # Now 4-connected: one component of fill 73/144.
  (comp,) = scoring.components(image)
  assert comp.area == 73 and comp.shape == 'triangle'


def test_thresholding_tolerates_off_palette_values():
  image, text = shapes.example('test', 3, 32)
  noisy = np.clip(image.astype(int) * 0.7 + 30 + np.random.default_rng(0).integers(-20, 20, image.shape),
                  0, 255).astype(np.uint8)
  assert scoring.score_image(noisy, text)['full']


def test_corruptions_fail_the_right_metric():
  scene = two_object_scene(('red', 'square'), ('blue', 'circle'))
  text = shapes.caption(scene)
  image = shapes.render_scene(scene, 32)
  ok = scoring.score_image(image, text)
  assert ok == {'full': True, 'colour': True, 'shape': True, 'count': True, 'left_right': True,
                'held_out': False, 'num_objects': 2}

  recoloured = image.copy()
  recoloured[np.all(image == (255, 0, 0), axis=-1)] = (0, 255, 0)
  r = scoring.score_image(recoloured, text)
  assert not r['full'] and not r['colour'] and r['count'] and r['shape'] and r['left_right'] is None

  erased = image.copy()
  erased[:, 16:] = 0
  r = scoring.score_image(erased, text)
  assert not r['full'] and not r['count'] and not r['colour'] and r['shape']

  swapped = image[:, ::-1]
  r = scoring.score_image(swapped, text)
  assert not r['full'] and r['left_right'] is False and r['colour'] and r['shape'] and r['count']

  added = shapes.render_object(image.copy(), 'white', 'triangle', 12.0, 0.0, 8.0)
  r = scoring.score_image(added, text)
  assert not r['full'] and not r['count'] and r['colour'] and r['shape'] and r['left_right']

  reshaped = shapes.render_scene(two_object_scene(('red', 'triangle'), ('blue', 'circle')), 32)
  r = scoring.score_image(reshaped, text)
  assert not r['full'] and r['colour'] and not r['shape'] and r['count'] and r['left_right'] is None


def test_same_colour_objects_need_two_components():
  text = 'a red square to the left of a red circle'
  good = shapes.render_scene(two_object_scene(('red', 'square'), ('red', 'circle')), 32)
  assert scoring.score_image(good, text)['full']
  one = shapes.render_scene(shapes.Scene(
      (shapes.Object('red', 'square', 3.0, 9.0, 11.0),)), 32)
  r = scoring.score_image(one, text)
  assert not r['colour'] and r['shape'] and not r['count'] and r['left_right'] is None


def test_single_object_caption_has_no_left_right():
  image, _ = shapes.example('test', 0, 32)
  r = scoring.score_image(np.zeros_like(image), 'a cyan circle')
  assert r == {'full': False, 'colour': False, 'shape': None, 'count': False,
               'left_right': None, 'held_out': False, 'num_objects': 1}
  assert scoring.score_image(image, 'a yellow circle')['held_out']


def test_parse_caption_round_trips_every_caption_form():
  for pair in shapes.ALL_PAIRS:
    assert scoring.parse_caption(shapes.object_phrase(*pair)) == [pair]
    for other in shapes.ALL_PAIRS:
      for form in ('left', 'right'):
        text = shapes.two_object_caption(pair, other, form)
        assert scoring.parse_caption(text) == [pair, other], text
  assert scoring.parse_caption('  A Red   square ') == [('red', 'square')]
  for bad in ('a red hexagon', 'two red squares', 'a red square above a blue circle', ''):
    with pytest.raises(ValueError, match='Cannot parse'):
      scoring.parse_caption(bad)


def test_aggregate_counts_only_where_defined():
  t, f = True, False
  scores = [
      dict(full=t, colour=t, shape=t, count=t, left_right=t, held_out=t, num_objects=2),
      dict(full=f, colour=f, shape=None, count=f, left_right=None, held_out=f, num_objects=1),
      dict(full=f, colour=t, shape=f, count=t, left_right=None, held_out=f, num_objects=1),
      dict(full=f, colour=t, shape=t, count=t, left_right=f, held_out=t, num_objects=2),
  ]
  result = scoring.aggregate(scores)
  a, h = result['all'], result['held_out']
  assert (a['n'], a['full'], a['colour'], a['count']) == (4, 0.25, 0.75, 0.75)
  assert (a['shape'], a['n_shape']) == (2 / 3, 3)
  assert (a['left_right'], a['n_left_right']) == (0.5, 2)
  assert (h['n'], h['full'], h['shape'], h['left_right']) == (2, 0.5, 1.0, 0.5)
  captions = ['a yellow circle', 'a red square', 'a red square', 'a red square']
  assert scoring.aggregate(scores, captions)['held_out']['n'] == 1
  with pytest.raises(ValueError, match='captions'):
    scoring.aggregate(scores, captions[:2])
  empty = scoring.aggregate(scores[1:3])['held_out']
  assert empty['n'] == 0 and empty['full'] is None
  assert 'left_right' in scoring.format_table(result)


def test_benchmark_prompts_are_fixed_and_cover_all_pairs():
  prompts = scoring.benchmark_prompts()
  assert prompts == scoring.benchmark_prompts(num_two_object=42, seed=0)
  assert len(prompts) == 63 and len(set(prompts)) == 63
  assert prompts[:21] == [shapes.object_phrase(*p) for p in shapes.ALL_PAIRS]
  doubles = [scoring.parse_caption(p) for p in prompts[21:]]
  assert all(len(d) == 2 and d[0] != d[1] for d in doubles)
  assert sum(' to the left of ' in p for p in prompts) == 21
  assert sum(' to the right of ' in p for p in prompts) == 21
  held = [d for d in doubles if set(d) & shapes.HELD_OUT_PAIRS]
  assert 4 <= len(held) <= 20
  assert prompts != scoring.benchmark_prompts(seed=1)
  assert len(scoring.benchmark_prompts(num_two_object=420)) == 441
  with pytest.raises(ValueError, match='num_two_object'):
    scoring.benchmark_prompts(num_two_object=421)


def exact_sample_folder(folder, n=30):
  examples = [shapes.example('test', i, 32) for i in range(n)]
  write_samples(str(folder), [e[0] for e in examples], [e[1] for e in examples])
  return examples


def test_score_folder_and_its_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='manifest.jsonl'):
    scoring.score_folder(str(tmp_path))
  exact_sample_folder(tmp_path)
  result = scoring.score_folder(str(tmp_path))
  assert result['all']['n'] == 30 and result['all']['full'] == 1.0

  manifest = tmp_path / 'manifest.jsonl'
  lines = manifest.read_text().splitlines()
  manifest.write_text('\n'.join(lines + ['{"file": "missing.png", "prompt": "a red square"}']))
  with pytest.raises(FileNotFoundError, match='missing.png'):
    scoring.score_folder(str(tmp_path))
  manifest.write_text('\n'.join(lines + ['{"file": "00000.png"']))
  with pytest.raises(ValueError, match='manifest.jsonl:31'):
    scoring.score_folder(str(tmp_path))
  manifest.write_text('\n'.join(lines + ['{"file": "00000.png", "prompt": "a red blob"}']))
  with pytest.raises(ValueError, match='00000.png.*red blob'):
    scoring.score_folder(str(tmp_path))
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  manifest.write_text('{"file": "broken.png", "prompt": "a red square"}\n')
  with pytest.raises(ValueError, match='broken.png'):
    scoring.score_folder(str(tmp_path))


def test_evaluate_cli_end_to_end(tmp_path):
  examples = exact_sample_folder(tmp_path, n=20)
  # Corrupt two samples: an erased image and a mirrored two-object image.
  two = next(i for i, (_, text) in enumerate(examples) if ' of ' in text)
  write_samples(str(tmp_path), [np.zeros_like(examples[0][0]), examples[two][0][:, ::-1]] +
                        [e[0] for e in examples[2:]],
                        [examples[0][1], examples[two][1]] + [e[1] for e in examples[2:]])
  out = tmp_path / 'results.json'
  proc = subprocess.run([sys.executable, 'evaluate.py', '--samples', str(tmp_path), '--out', str(out)],
                        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
  assert 'full' in proc.stdout and 'held_out' in proc.stdout
  result = json.loads(out.read_text())
  assert result['all']['n'] == 20 and result['all']['full'] == pytest.approx(18 / 20)
  assert result['all']['left_right'] < 1.0
  assert result == scoring.score_folder(str(tmp_path))
