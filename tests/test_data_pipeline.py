"""Batch pipeline: deterministic shuffled epochs, process slices, exact resume, prefetch."""
import itertools
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from data import pipeline
from data import shapes
from tests import image_folders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      dataset='shapes_rendered', image_size=16, num_train=40, num_test=8, data_dir='',
      seed=3, global_batch_size=8, prefetch=0, crop='center', flip=False, upscale=True,
      on_bad_record='skip'))
  cfg.update(overrides)
  return cfg


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_global_batch_indices_are_a_pure_function_of_their_arguments():
  a = pipeline.global_batch_indices(5, 7, 16, 100)
  assert a.dtype == np.int64 and a.shape == (16,)
  np.testing.assert_array_equal(a, pipeline.global_batch_indices(5, 7, 16, 100))
  assert not np.array_equal(a, pipeline.global_batch_indices(6, 7, 16, 100))
  assert not np.array_equal(a, pipeline.global_batch_indices(5, 8, 16, 100))


def test_every_example_appears_once_per_epoch_and_epochs_are_reshuffled():
  n, b = 10, 4  # Batches straddle epoch boundaries.
  stream = np.concatenate([pipeline.global_batch_indices(0, s, b, n) for s in range(10)])
  epochs = stream.reshape(4, n)
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert len({tuple(e) for e in epochs}) == 4
  assert not np.array_equal(epochs[0], np.arange(n))


def test_shuffle_is_unbiased_over_seeds():
  first = [pipeline.global_batch_indices(seed, 0, 1, 5)[0] for seed in range(2000)]
  counts = np.bincount(first, minlength=5)
  assert counts.min() > 330 and counts.max() < 470  # 400 expected each.


def test_process_slices():
  assert pipeline.process_slice(12, 2, 3) == slice(8, 12)
  with pytest.raises(ValueError, match='data.global_batch_size'):
    pipeline.process_slice(10, 0, 4)
  with pytest.raises(ValueError, match='process_index'):
    pipeline.process_slice(8, 4, 4)


def test_batches_are_model_ready():
  cfg = data_config()
  source = pipeline.make_source(cfg)
  assert len(source) == 40
  batch = pipeline.make_loader(cfg, source)(0)
  indices = pipeline.global_batch_indices(cfg.seed, 0, 8, 40)
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (8, 16, 16, 3)
  assert set(np.unique(batch['image'])) <= {-1.0, 1.0}  # Palette channels are 0 or 255.
  np.testing.assert_array_equal(batch['index'], indices)
  for row, index in enumerate(indices):
    image, text = shapes.example('train', int(index), 16)
    np.testing.assert_array_equal(batch['image'][row], image / 127.5 - 1)
    assert batch['caption'][row] == text
  assert batch['caption'].dtype.kind == 'U'
  np.testing.assert_array_equal(batch['bad'], 0)
  test_source = pipeline.make_source(cfg, split='test')
  assert len(test_source) == 8
  assert test_source[1]['captions'] == [shapes.example('test', 1, 16)[1]]


def test_process_batches_concatenate_to_the_global_batch():
  cfg = data_config()
  source = pipeline.make_source(cfg)
  whole = take(pipeline.iterate(pipeline.make_loader(cfg, source), 0), 6)
  parts = [take(pipeline.iterate(pipeline.make_loader(cfg, source, p, 4), 0), 6) for p in range(4)]
  for step in range(6):
    assert whole[step][0] == step and all(part[step][0] == step for part in parts)
    for key in ('image', 'caption', 'index'):
      np.testing.assert_array_equal(
          np.concatenate([part[step][1][key] for part in parts]), whole[step][1][key])


@pytest.mark.parametrize('prefetch,workers', [(0, 0), (2, 0), (1, 2)])
def test_resuming_replays_the_same_batches(prefetch, workers):
  cfg = data_config()
  loader = pipeline.make_loader(cfg, pipeline.make_source(cfg))
  through = take(pipeline.iterate(loader, 0), 9)
  it = pipeline.iterate(loader, 5, 9, prefetch=prefetch, num_workers=workers)
  resumed = list(it)
  it.close()
  assert [s for s, _ in resumed] == [5, 6, 7, 8]
  for (s1, b1), (s2, b2) in zip(through[5:], resumed):
    assert s1 == s2
    np.testing.assert_array_equal(b1['index'], b2['index'])
    np.testing.assert_array_equal(b1['image'], b2['image'])
  # One epoch (40 examples = 5 batches) shows every example once.
  assert sorted(np.concatenate([b['index'] for _, b in through[:5]])) == list(range(40))


def test_loader_errors_reach_the_consumer():
  cfg = data_config()

  class Broken(list):
    def __getitem__(self, index):
      raise RuntimeError('disk on fire')

  loader = pipeline.make_loader(cfg, Broken(range(40)))
  with pytest.raises(RuntimeError, match='disk on fire'):
    take(pipeline.iterate(loader, 0, prefetch=1), 1)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='data.dataset'):
    pipeline.make_source(data_config(dataset='imagenet'))
  with pytest.raises(ValueError, match='data.image_size'):
    pipeline.make_source(data_config(image_size=20))
  with pytest.raises(ValueError, match='data.num_train'):
    pipeline.make_source(data_config(num_train=0))
  source = pipeline.make_source(data_config())
  with pytest.raises(ValueError, match='data.seed'):
    pipeline.make_loader(data_config(seed=-1), source)
  with pytest.raises(ValueError, match='data.global_batch_size'):
    pipeline.make_loader(data_config(global_batch_size=6), source, 0, 4)
  with pytest.raises(ValueError, match='data.crop'):
    pipeline.make_loader(data_config(crop='middle'), source)
  with pytest.raises(ValueError, match='data.on_bad_record'):
    pipeline.make_loader(data_config(on_bad_record='ignore'), source)


def test_cached_latents_are_loaded_without_decoding_images():
  """images=False (a run on cached latents): the batch carries the stored moments and the same
  captions, and the image bytes are never decoded (here they are not an image at all)."""
  rng = np.random.default_rng(0)
  records = [{'key': f'r{i}', 'image': rng.integers(0, 255, (8, 8, 3), np.uint8),
              'captions': [f'caption {i}a', f'caption {i}b'],
              'latent': {'mean': np.full((2, 2, 4), i, np.float32),
                         'logvar': np.zeros((2, 2, 4), np.float32)}} for i in range(12)]
  transform = pipeline.Transform(8, 'center', False, True)
  with_images = pipeline.BatchLoader(records, transform, seed=3, global_batch_size=4,
                                      on_bad_record='skip')
  undecodable = [dict(r, image=b'not an image') for r in records]
  latents_only = pipeline.BatchLoader(undecodable, transform, seed=3, global_batch_size=4,
                                      on_bad_record='skip', images=False)
  for step in range(4):
    a, b = with_images(step), latents_only(step)
    assert 'image' in a and 'image' not in b
    np.testing.assert_array_equal(a['caption'], b['caption'])
    np.testing.assert_array_equal(b['latent_mean'][:, 0, 0, 0], b['index'])
    assert not b['bad'].any()
  no_latent = [dict(r, latent=None) if i == 5 else r for i, r in enumerate(undecodable)]
  loader = pipeline.BatchLoader(no_latent, transform, seed=3, global_batch_size=12,
                                on_bad_record='skip', images=False)
  with pytest.raises(pipeline.DataError, match='r5 has no cached latents'):
    loader(0)


# An entry point's logging set-up (as train.py's), then the 2 batches of one epoch of a folder with
# bad records, prepared by `workers` grain worker processes (0: in this process), one batch each.
_SKIP_BAD_RECORDS = """
import sys
from absl import app, logging
from configs import base, specs
from data import pipeline
from runtime import console

def main(argv):
  _, folder, log, workers = argv
  console.quiet_library_noise()
  console.log_to_file(log)
  cfg = specs.build(base.get_config()).data.replace(
      dataset='folder', path=folder, eval_path='', caption_key='text', image_size=16, seed=0,
      global_batch_size=6, crop='center', flip=False, upscale=True, on_bad_record='skip')
  batches = pipeline.iterate(pipeline.make_loader(cfg, pipeline.make_source(cfg)), 0, 2,
                             num_workers=int(workers), log_setup=console.worker_logging())
  print('bad records', sum(int(b['bad'].sum()) for _, b in batches))
  batches.close()

app.run(main)
"""


@pytest.mark.parametrize('workers', [0, pytest.param(2, marks=pytest.mark.full)])  # 2: processes.
def test_worker_warnings_look_like_the_main_process_ones(tmp_path, workers):
  """A record skipped in a grain worker process: absl's console line and a train.log line, as in
  the main process (workers start by spawn, with Python's defaults: `WARNING:absl:...`, no file)."""
  image_folders.make_folder(tmp_path / 'images')  # 8 good images and 4 bad records.
  log = tmp_path / 'w' / 'train.log'
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  out = subprocess.run(
      [sys.executable, '-c', _SKIP_BAD_RECORDS, str(tmp_path / 'images'), str(log), str(workers)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ['bad', 'records', '4']
  bad = sorted([*image_folders.BROKEN, image_folders.NO_CAPTION])
  prefix = r'W\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ pipeline\.py:\d+\] '  # absl's PythonFormatter.
  skipped = [l for l in out.stderr.splitlines() if 'data: skipped' in l]
  assert all(re.fullmatch(prefix + r'data: skipped .*', l) for l in skipped), out.stderr[-3000:]
  assert sorted(os.path.basename(l.split(': ')[1]) for l in skipped) == bad
  logged = [l for l in log.read_text().splitlines() if 'data: skipped' in l]
  assert all(re.match(r'W\d{4} \d\d:\d\d:\d\d pipeline\.py:\d+\] ', l) for l in logged)
  assert sorted(os.path.basename(l.split(': ')[1]) for l in logged) == bad
