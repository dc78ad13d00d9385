"""Aspect-ratio buckets from every source: `tools.prepare --buckets` stores each record's size and
bucket (and, with --autoencoder, its latents at that bucket's size); shards and TFDS give
single-shaped batches, the same over 0 and 2 workers; a cache of other buckets is refused."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import images as images_config
from configs import specs
from data import batch, buckets, images, pipeline, sources
from runtime import state
from tests.test_buckets import BUCKETS, data_spec, make_mixed_folder
from tests.test_models_autoencoder import write_vae
from tools import prepare
from training import builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER = ((20, 12), (16, 16))  # Buckets the shards were not prepared with.



@pytest.fixture(scope='module')
def clean(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mixed'))
  make_mixed_folder(root, broken=False)
  return root


def _prepare(folder, output, **options):
  return prepare.prepare(prepare.open_source('folder', path=folder), output, num_shards=2,
                         options=prepare.Options(**options), progress=False)


@pytest.fixture(scope='module')
def shards(clean, tmp_path_factory):
  output = str(tmp_path_factory.mktemp('shards') / 'tr')
  _prepare(clean, output, buckets=BUCKETS)
  return output


@pytest.fixture(scope='module')
def latent_shards(clean, tmp_path_factory):
  """Shards with latents at each record's bucket, of a tiny random VAE (factor 2, 4 channels)."""
  root = tmp_path_factory.mktemp('latent')
  vae = write_vae(str(root / 'vae'))
  output = str(root / 'tr')
  _prepare(clean, output, buckets=BUCKETS, latent=dict(path=vae, image_size=0, dtype='float32'))
  return output, vae


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _iterate(loader, steps, workers):
  it = pipeline.iterate(loader, 0, steps, prefetch=1, num_workers=workers)
  try:
    return [b for _, b in it]
  finally:
    it.close()


def test_bucket_flags_define_the_configs_buckets():
  assert prepare.bucket_option('((20,12),(16,16),(12,20))', 0, 0, 0) == BUCKETS
  assert prepare.bucket_option('', 64, 2.0, 8) == buckets.generate(64, 8, 2.0)
  assert prepare.bucket_option('', 64, 0, 8) is None
  for args, words in ((('((16,16),(12,21))', 0, 0, 2), r'--buckets has \(12, 21\)'),
                      (('(16,16', 0, 0, 0), '--buckets=.*not a tuple'),
                      (('', 64, 2.0, 0), '--bucket_max_aspect needs --image_size'),
                      (('((16,16),)', 0, 2.0, 2), 'not both'),
                      (('', 64, 0.5, 8), '--bucket_max_aspect=0.5 must be >= 1')):
    with pytest.raises(ValueError, match=words):
      prepare.bucket_option(*args)


def test_prepare_stores_each_records_size_and_bucket(tmp_path):
  root = str(tmp_path / 'mixed')
  want = make_mixed_folder(root)  # With a file that is no image and a truncated JPEG.
  output = str(tmp_path / 'out' / 'tr')
  summary = _prepare(root, output, buckets=BUCKETS)
  assert summary['written'] == 16 and summary['skipped'] == 2
  assert summary['settings']['buckets'] == [list(b) for b in BUCKETS]
  src = sources.ArrayRecordSource(output + '-*.array_record')
  got = [src[i] for i in range(len(src))]
  assert {os.path.basename(r['key']): BUCKETS.index(tuple(r['bucket'])) for r in got} == want
  for r in got:
    assert tuple(r['size']) == buckets.image_size({'image': r['image']})
  sidecars = sorted(glob.glob(output + '-*.array_record.json'))
  sizes = []
  for path in sidecars:
    with open(path, encoding='utf-8') as f:
      side = json.load(f)
    assert side['settings']['buckets'] == [list(b) for b in BUCKETS]
    sizes += side['sizes'].split()
  assert sizes == [f'{h}x{w}' for h, w in (r['size'] for r in got)]
  with pytest.raises(ValueError, match='written with buckets='):  # Resuming with other buckets.
    _prepare(root, output, buckets=OTHER)


def test_shards_read_their_sidecars_and_give_the_folders_batches(shards, clean, tmp_path,
                                                                 monkeypatch):
  pattern = shards + '-*.array_record'
  folder_loader = buckets.make_loader(data_spec(clean), sources.FolderSource(clean), step=2)

  def no_reads(self, index):
    raise AssertionError(f'record {index} read')

  with monkeypatch.context() as m:
    m.setattr(sources.ArrayRecordSource, '__getitem__', no_reads)
    sizes, failures = buckets.source_sizes(sources.ArrayRecordSource(pattern))
  assert not failures
  np.testing.assert_array_equal(sizes, buckets.source_sizes(sources.FolderSource(clean))[0])
  bare = str(tmp_path / 'bare')  # Shards copied without their sidecars: each record's size.
  os.makedirs(bare)
  for path in glob.glob(pattern):
    shutil.copy(path, bare)
  np.testing.assert_array_equal(
      buckets.source_sizes(sources.ArrayRecordSource(os.path.join(bare, '*.array_record')))[0],
      sizes)
  spec = data_spec(pattern, dataset='array_record')
  loader = buckets.make_loader(spec, sources.make(spec), step=2)
  direct = [loader(s) for s in range(4)]
  for s, out in enumerate(direct):  # Kept bytes: the folder's pixels, in the folder's order.
    _equal(out, folder_loader(s))
  for s, out in enumerate(_iterate(loader, 4, workers=2)):
    _equal(out, direct[s])


@pytest.mark.full  # A TFDS build and worker processes; buckets from records: the tests above.
def test_tfds_images_go_to_their_buckets_with_workers(tmp_path):
  builders = pytest.importorskip('tests.tfds_builders')  # Needs tensorflow_datasets.
  data_dir = str(tmp_path / 'tfds')
  builders.build(builders.MixedAspects, data_dir)
  spec = data_spec('', dataset='tfds', tfds_name='mixed_aspects', train_split='train',
                   data_dir=data_dir, caption_key='caption', crop='random', flip=True)
  loader = buckets.make_loader(spec, sources.make(spec), step=2)
  assert [len(m) for m in loader.schedule.members] == [4, 4, 4]
  direct = [loader(s) for s in range(6)]
  for s, out in enumerate(direct):
    bucket = BUCKETS[loader.schedule(s)[0]]
    assert out[batch.IMAGE].shape == (4,) + bucket + (3,)
    assert buckets.nearest(BUCKETS, out[batch.ORIG_SIZE]).tolist() == [BUCKETS.index(bucket)] * 4
  assert len({out[batch.IMAGE].shape for out in direct}) == 3
  for s, out in enumerate(_iterate(loader, 6, workers=2)):
    _equal(out, direct[s])


@pytest.mark.full  # Encodes latents; the full tier also trains on them (tests/test_bucket_training.py).
def test_latents_are_encoded_at_each_records_bucket(latent_shards, clean):
  output, vae_dir = latent_shards
  src = sources.ArrayRecordSource(output + '-*.array_record')
  vae = state.build_autoencoder(specs.build(_latent_config(output, vae_dir)).autoencoder)
  record = src[0]
  latent, bucket = record['latent'], tuple(record['bucket'])
  assert latent['image_size'] == list(bucket) and latent['buckets'] == [list(b) for b in BUCKETS]
  assert latent['mean'].shape == (bucket[0] // 2, bucket[1] // 2, 4)
  pixels = images.cover(images.load_rgb(record['image']), *bucket)[0] / np.float32(127.5) - 1
  mean, _ = vae.encode(vae.params, pixels[None])
  np.testing.assert_allclose(latent['mean'], np.asarray(mean)[0], atol=1e-5)
  spec = data_spec(output + '-*.array_record', dataset='array_record')
  cached = buckets.make_loader(spec, src, step=4, images=False)
  decoded = buckets.make_loader(spec, src, step=4)
  for s in range(4):
    out, want = cached(s), decoded(s)
    h, w = BUCKETS[cached.schedule(s)[0]]
    assert batch.IMAGE not in out and out[batch.LATENTS[0]].shape == (4, h // 2, w // 2, 4)
    for key in (batch.INDEX, batch.ORIG_SIZE, batch.CROP_OFFSET, batch.CAPTION):
      np.testing.assert_array_equal(out[key], want[key], err_msg=key)


def _latent_config(path, vae_dir, **data):
  config = images_config.get_config('tiny')
  config.data.update({'dataset': 'array_record', 'path': path + '-*.array_record',
                      'buckets': BUCKETS, 'global_batch_size': 4, 'crop': 'center', 'flip': False,
                      **data})
  config.autoencoder.path = vae_dir
  return config


def test_training_takes_only_a_cache_of_its_buckets(latent_shards, clean, tmp_path):
  output, vae_dir = latent_shards
  square = str(tmp_path / 'square')
  _prepare(clean, square, latent=dict(path=vae_dir, image_size=16, dtype='float32'))

  def cached(path, **data):
    settings = specs.build(_latent_config(path, vae_dir, **data))
    return builder._cached_latents(  # pylint: disable=protected-access
        settings, sources.make(settings.data), state.build_autoencoder(settings.autoencoder))

  assert cached(output)
  assert cached(square, buckets=())
  for path, data, words in (
      (output, {'buckets': OTHER}, r'at the buckets \(\(20, 12\), \(16, 16\), \(12, 20\)\), not '
                                   r'data.buckets=\(\(20, 12\), \(16, 16\)\)'),
      (output, {'buckets': ()}, 'and data.buckets is empty'),
      (square, {}, r'at one square size \(16 px\), not data.buckets=')):
    with pytest.raises(sources.DataError, match=words) as e:
      cached(path, **data)
    assert '\n' not in str(e.value) and 'data.path=' in str(e.value)


def test_bad_buckets_flag_is_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'tools.prepare', f'--input={tmp_path}', f'--output={tmp_path}/x',
       '--buckets=((16,16),(12,21))', '--bucket_step=2'], cwd=ROOT, capture_output=True,
      text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120, check=False)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --buckets has (12, 21): each side must '
                                                 'be a multiple of 2'), proc.stderr
