"""Truncated or corrupt data files: one error that names the file, its config field and the fix.

Shards are written by tools.prepare from a small image folder, then damaged on disk: cut to half
their length (the ArrayRecord footer, which indexes the records, is lost: the source does not
open) or overwritten with garbage inside the records (the source opens; reading fails a
checksum). Either is a DataError, never a bad record to skip, in this process, in grain threads
and in grain worker processes, and train.py reports it as one `error:` line.
"""
import glob
import itertools
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest

from data import pipeline, sources

from tools import prepare
from tests import image_folders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SHARDS = 2
DAMAGED = 1  # The shard that is damaged: records 4..7 of the 8.


def _cut(path):
  """Keeps the first half of the file's bytes."""
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def _scramble(path):
  """Overwrites 64 bytes in the middle of the records (the file's first 64 KiB block, before its
  zero padding; the footer that indexes the records stays intact)."""
  with open(path, 'rb') as f:
    data = f.read()
  at = len(data[:1 << 16].rstrip(b'\0')) // 2
  with open(path, 'r+b') as f:
    f.seek(at)
    f.write(b'\xab' * 64)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """(image folder, shard directory): 8 captioned images as 2 shards of 4 records, written once."""
  root = tmp_path_factory.mktemp('reliability')
  image_folders.make_folder(root / 'images', broken=False)
  source = prepare.open_source('folder', path=str(root / 'images'))
  prepare.prepare(source, str(root / 'shards' / 'train'), num_shards=NUM_SHARDS, progress=False)
  return str(root / 'images'), str(root / 'shards')


@pytest.fixture
def shards(written, tmp_path):
  """A fresh copy of the shards (with their sidecars): (prefix, sorted shard paths)."""
  shutil.copytree(written[1], tmp_path / 'shards')
  prefix = str(tmp_path / 'shards' / 'train')
  return prefix, sorted(glob.glob(prefix + '-*.array_record'))


def data_config(path, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      dataset='array_record', path=path, eval_path='', image_size=16, seed=0, global_batch_size=8,
      crop='center', flip=False, upscale=True, on_bad_record='skip'))
  cfg.update(overrides)
  return cfg


def _check_message(message, shard, prefix):
  assert '\n' not in message
  assert 'data.path=' in message and shard in message and 'truncated or corrupt' in message
  assert 'python -m tools.prepare' in message
  assert f'--output={prefix} --num_shards={NUM_SHARDS}' in message
  assert f'{shard}.json' in message  # The sidecar: what the shard was written from.


@pytest.mark.parametrize('keep', [0.5, 0.05, 0.0])
def test_a_truncated_shard_is_named_when_the_source_opens(written, shards, keep):
  prefix, files = shards
  with open(files[DAMAGED], 'rb') as f:
    data = f.read()
  with open(files[DAMAGED], 'wb') as f:
    f.write(data[:int(len(data) * keep)])
  with pytest.raises(sources.DataError) as error:
    pipeline.make_source(data_config(prefix + '-*.array_record'))
  _check_message(str(error.value), files[DAMAGED], prefix)
  # What the message says to do: delete it and rerun the same tools.prepare command.
  untouched = os.stat(files[0]).st_mtime_ns
  os.remove(files[DAMAGED])
  source = prepare.open_source('folder', path=written[0])
  summary = prepare.prepare(source, prefix, num_shards=NUM_SHARDS, progress=False)
  assert summary['written'] == 8 and os.stat(files[0]).st_mtime_ns == untouched
  rebuilt = sources.ArrayRecordSource(prefix + '-*.array_record')
  assert [rebuilt[i]['key'] for i in range(len(rebuilt))] == [
      os.path.join(source.root, f) for f in source.files]


def test_eval_shards_name_data_eval_path(shards):
  prefix, files = shards
  _cut(files[DAMAGED])
  cfg = data_config('', eval_path=prefix + '-*.array_record')
  with pytest.raises(sources.DataError, match=r"^data\.eval_path='.*': shard .*-00001-of-00002"):
    sources.make(cfg, 'eval')


def test_a_corrupt_shard_is_named_when_its_records_are_read(shards):
  prefix, files = shards
  _scramble(files[DAMAGED])
  source = sources.ArrayRecordSource(prefix + '-*.array_record')  # The footer is intact.
  failed = []
  for i in range(len(source)):
    try:
      source[i]
    except sources.DataError as e:
      _check_message(str(e), files[DAMAGED], prefix)
      assert 'Corrupted Riegeli' in str(e)  # array_record's reason, first line.
      failed.append(i)
  assert failed and set(failed) <= {4, 5, 6, 7}  # Only records of the damaged shard.


def test_a_shard_cut_after_start_up_is_named(shards):
  """array_record reads b'' from a file it cannot open: a damaged shard, not an empty record."""
  prefix, files = shards
  source = sources.ArrayRecordSource(prefix + '-*.array_record')
  _cut(files[DAMAGED])
  assert source[0]['captions']
  with pytest.raises(sources.DataError) as error:
    source[4]
  _check_message(str(error.value), files[DAMAGED], prefix)


@pytest.mark.parametrize('prefetch,num_workers', [(0, 0), (2, 0), (1, 1)])
def test_a_corrupt_shard_stops_the_loader_even_when_skipping_bad_records(shards, prefetch,
                                                                        num_workers):
  """In this process, in grain threads, in a grain worker process: the DataError arrives intact."""
  prefix, files = shards
  _scramble(files[DAMAGED])
  cfg = data_config(prefix + '-*.array_record', on_bad_record='skip')
  loader = pipeline.make_loader(cfg, pipeline.make_source(cfg))  # A batch: all 8 records.
  batches = pipeline.iterate(loader, 0, prefetch=prefetch, num_workers=num_workers)
  try:
    with pytest.raises(sources.DataError) as error:
      list(itertools.islice(batches, 2))
  finally:
    batches.close()
  _check_message(str(error.value), files[DAMAGED], prefix)


# One train.py process each; the scrambled shard in the full tier (the in-process tests above
# take both damages).
@pytest.mark.parametrize('damage', [_cut, pytest.param(_scramble, marks=pytest.mark.full)])
def test_train_py_names_the_damaged_shard_in_one_line(shards, tmp_path, damage):
  prefix, files = shards
  damage(files[DAMAGED])
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAXDIFF_', 'SLURM_', 'TPU_'))}
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''))
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/images.py:tiny', f'--workdir={tmp_path / "w"}',
       '--config.data.dataset=array_record', f'--config.data.path={prefix}-*.array_record',
       '--config.logging.eval_at_end=False'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == errors[0] and 'Traceback' not in out.stderr
  _check_message(errors[0], files[DAMAGED], prefix)


# ------------------------------------------------------------------------------- TFDS files


@pytest.fixture(scope='module')
def tfds_prepared(tmp_path_factory):
  shapes_tfds = pytest.importorskip('data.shapes_tfds')  # Needs tensorflow_datasets.
  path = str(tmp_path_factory.mktemp('tfds'))
  shapes_tfds.prepare(path, image_size=16, num_train=16, num_test=8)
  return path


@pytest.mark.parametrize('damage', [_cut, _scramble])
def test_a_damaged_tfds_file_is_named_with_tfds_name_and_data_dir(tfds_prepared, tmp_path, damage):
  """TFDS opens its files lazily: a cut one read b'' (a bad image per record) before."""
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(tfds_prepared, data_dir)
  name = 'shapes_benchmark/s16_train16_test8'
  (file,) = glob.glob(os.path.join(data_dir, name, '*', '*-train.array_record-*'))
  damage(file)
  cfg = ml_collections.ConfigDict(dict(
      dataset='tfds', tfds_name=name, train_split='train', eval_split='', data_dir=data_dir,
      image_key='image', caption_key='caption', image_size=16, seed=0, global_batch_size=16,
      crop='center', flip=False, upscale=True, on_bad_record='skip'))
  loader = pipeline.make_loader(cfg, sources.make(cfg))
  with pytest.raises(sources.DataError) as error:
    loader(0)  # All 16 records.
  message = str(error.value)
  assert '\n' not in message and file in message and 'truncated or corrupt' in message
  assert f'data.tfds_name={name!r}' in message and f'data.data_dir={data_dir!r}' in message
  assert re.search(rf'delete {re.escape(os.path.dirname(file))} and prepare the dataset again',
                   message)
  # The built-in Shapes source reads the same files.
  shapes_cfg = ml_collections.ConfigDict(dict(cfg, dataset='shapes', num_train=16, num_test=8))
  with pytest.raises(sources.DataError, match=rf'data.data_dir=.*{re.escape(file)} is truncated'):
    pipeline.make_loader(shapes_cfg, sources.make(shapes_cfg))(0)
