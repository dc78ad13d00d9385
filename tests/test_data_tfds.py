"""TFDS builder for Shapes: a tiny build reads back exactly the rendered examples, idempotently."""
import glob
import logging
import os
import shutil
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest

from data import pipeline, sources
from data import shapes

shapes_tfds = pytest.importorskip('data.shapes_tfds')  # Needs tensorflow_datasets.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  shapes_tfds.prepare(path, image_size=16, num_train=64, num_test=16)
  return path


def test_records_are_exactly_the_rendered_examples(data_dir):
  builder = shapes_tfds.make_builder(data_dir, 16, 64, 16)
  assert builder.builder_config.name == 's16_train64_test16'
  for split, n in (('train', 64), ('test', 16)):
    records = builder.as_data_source(split)
    assert len(records) == n
    for i in range(n):
      image, text = shapes.example(split, i, 16)
      record = records[i]
      assert record['index'] == i and record['caption'].decode() == text
      np.testing.assert_array_equal(record['image'], image)


def test_building_again_reuses_the_prepared_data(data_dir):
  files = {}
  for root, _, names in os.walk(data_dir):
    for name in names:
      files[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
  shapes_tfds.prepare(data_dir, image_size=16, num_train=64, num_test=16)
  after = {p: os.stat(p).st_mtime_ns for p in files}
  assert after == files


def test_shapes_batches_are_the_same_from_tfds_and_rendered(data_dir):
  cfg = ml_collections.ConfigDict(dict(
      dataset='shapes', image_size=16, num_train=64, num_test=16, data_dir=data_dir,
      seed=0, global_batch_size=8, prefetch=0, crop='center', flip=False, upscale=True,
      on_bad_record='skip'))
  got = pipeline.make_loader(cfg, pipeline.make_source(cfg))(3)
  cfg.dataset = 'shapes_rendered'
  want = pipeline.make_loader(cfg, pipeline.make_source(cfg))(3)
  np.testing.assert_array_equal(got['index'], pipeline.global_batch_indices(0, 3, 8, 64))
  for key in ('image', 'caption', 'index'):
    np.testing.assert_array_equal(got[key], want[key])


def test_any_tfds_dataset_by_name_gives_the_same_batches(data_dir):
  """The generic tfds source (name, split, feature keys) reads what the Shapes source reads."""
  name = 'shapes_benchmark/s16_train64_test16'
  cfg = ml_collections.ConfigDict(dict(
      dataset='tfds', tfds_name=name, train_split='train', eval_split='test', data_dir=data_dir,
      image_key='image', caption_key='caption', image_size=16, seed=0, global_batch_size=8,
      crop='center', flip=False, upscale=True, on_bad_record='skip'))
  got = pipeline.make_loader(cfg, sources.make(cfg))(2)
  cfg.update(dataset='shapes_rendered', num_train=64, num_test=16)
  want = pipeline.make_loader(cfg, sources.make(cfg))(2)
  for key in ('image', 'caption', 'index'):
    np.testing.assert_array_equal(got[key], want[key])
  assert len(sources.TfdsSource(name, 'test', data_dir, 'image', 'caption')) == 16


def test_tfds_errors_name_the_key(data_dir):
  name = 'shapes_benchmark/s16_train64_test16'
  with pytest.raises(sources.DataError, match=r"data.caption_key='captions/text' is not a feature"):
    sources.TfdsSource(name, 'train', data_dir, 'image', 'captions/text')
  with pytest.raises(sources.DataError, match=r"data.image_key='img'"):
    sources.TfdsSource(name, 'train', data_dir, 'img', 'caption')
  with pytest.raises(sources.DataError, match=r"split 'validation' is not in"):
    sources.TfdsSource(name, 'validation', data_dir, 'image', 'caption')
  with pytest.raises(sources.DataError, match=r"data.tfds_name='no_such_dataset'"):
    sources.TfdsSource('no_such_dataset', 'train', data_dir, 'image', 'caption')


def test_predefined_configs_and_bad_sizes():
  assert [c.name for c in shapes_tfds.ShapesBenchmark.BUILDER_CONFIGS] == ['s16', 's32', 's64']
  config = shapes_tfds.ShapesBenchmark.builder_configs['s32']
  assert (config.image_size, config.num_train, config.num_test) == (32, 50_000, 1_000)
  with pytest.raises(ValueError, match='data.image_size'):
    shapes_tfds.make_config(48)
  with pytest.raises(ValueError, match='data.num_test'):
    shapes_tfds.make_config(32, 10, 0)


# A build of s16_train64_test16 into argv[1] that hangs after 8 examples (its incomplete.* folder
# is on disk by then), for the test to kill -9.
_HANGING_BUILD = """
import sys, time
from data import shapes, shapes_tfds
example = shapes.example
def slow(split, index, size):
  if index == 8:
    print('building', flush=True)
    time.sleep(600)
  return example(split, index, size)
shapes.example = slow
shapes_tfds.prepare(sys.argv[1], 16, 64, 16)
"""

# Holds the build lock of argv[1] (as a live build does) until killed.
_HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], 'a') as lock:
  fcntl.flock(lock, fcntl.LOCK_EX)
  print('locked', flush=True)
  time.sleep(600)
"""


def _start(code, ready, *args):
  """A Python process running `code`, once it has printed the line `ready` (TFDS prints too)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, '-c', code, *args], cwd=root, text=True,
                          env={**os.environ, 'PYTHONPATH': root}, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
  for line in proc.stdout:
    if line.strip() == ready:
      return proc
  proc.wait(timeout=60)
  pytest.fail(f'the helper process exited ({proc.returncode}) before printing {ready!r}')


def _kill(proc):
  proc.kill()  # SIGKILL: the process gets no chance to clean up (TFDS's incomplete_dir neither).
  proc.wait(timeout=60)
  proc.stdout.close()


def _unfinished(data_dir):
  return glob.glob(os.path.join(data_dir, 'shapes_benchmark', '*', 'incomplete.*'))


@pytest.mark.full  # Starts and kills a building process.
def test_a_build_killed_midway_leaves_nothing_behind_once_prepared_again(tmp_path, caplog):
  data_dir = str(tmp_path / 'tfds')
  proc = _start(_HANGING_BUILD, 'building', data_dir)
  try:
    (left,) = _unfinished(data_dir)  # incomplete.XXXXXX_1.0.0, with half-written files.
  finally:
    _kill(proc)
  caplog.set_level(logging.INFO, logger='absl')
  builder = shapes_tfds.prepare(data_dir, 16, 64, 16)
  assert len(builder.as_data_source('train')) == 64
  assert not _unfinished(data_dir)
  assert any(f'removed {left}' in r.getMessage() for r in caplog.records)


def test_an_unfinished_build_is_removed_only_once_its_builder_is_dead(data_dir, tmp_path):
  """Under the config's build lock no other build runs: a folder left there is dead. A build
  holding the lock (here a process that only holds it) keeps its folder until it dies."""
  data_dir = shutil.copytree(data_dir, tmp_path / 'tfds')
  builder = shapes_tfds.make_builder(data_dir, 16, 64, 16)
  live = os.path.join(os.path.dirname(builder.data_dir), 'incomplete.LIVE01_1.0.0')
  holder = _start(_HOLD_LOCK, 'locked', shapes_tfds.lock_file(builder))
  try:
    os.makedirs(live)
    waiting = threading.Thread(target=shapes_tfds.prepare, args=(data_dir, 16, 64, 16))
    waiting.start()
    waiting.join(timeout=2)
    assert waiting.is_alive() and os.path.isdir(live)  # Waits for the lock, deletes nothing.
  finally:
    _kill(holder)  # The builder dies: its folder is now a leftover.
  waiting.join(timeout=60)
  assert not waiting.is_alive() and not os.path.exists(live)
  assert len(builder.as_data_source('train')) == 64  # The finished data is untouched.
