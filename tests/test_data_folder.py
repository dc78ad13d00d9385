"""The folder source and the loader on real files: formats, modes, captions, bad records, errors."""
import itertools
import json
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data import images, pipeline, sources
from tests import image_folders


def data_config(path, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      dataset='folder', path=str(path), eval_path='', caption_key='text', image_size=16,
      seed=0, global_batch_size=4, prefetch=0, crop='center', flip=False, upscale=True,
      on_bad_record='skip'))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  captions = image_folders.make_folder(root)
  return root, captions


def test_folder_lists_images_sorted_with_their_captions(folder):
  root, captions = folder
  source = sources.FolderSource(str(root))
  names = sorted(list(image_folders.GOOD) + list(image_folders.BROKEN) + [image_folders.NO_CAPTION])
  assert source.files == names
  for i, name in enumerate(source.files):
    want = captions.get(name, [f'broken {name}'] if name in image_folders.BROKEN else [])
    assert source.captions(i) == want
    record = source[i]
    assert record['key'] == os.path.join(str(root), name) and record['captions'] == want


@pytest.mark.parametrize('name', sorted(image_folders.GOOD))
def test_every_mode_becomes_rgb_uint8(folder, name):
  root, _ = folder
  with open(os.path.join(root, name), 'rb') as f:
    img = images.load_rgb(f.read())
  assert img.mode == 'RGB'
  pixels = images.fit(img, 16)
  assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)


def test_conversions_keep_the_picture():
  grey = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
  rgb = np.asarray(images.to_rgb(Image.fromarray(grey)))
  np.testing.assert_allclose(rgb[0, :, 0], np.linspace(0, 255, 32), atol=1)
  transparent = Image.new('RGBA', (4, 4), (255, 0, 0, 0))
  assert np.asarray(images.to_rgb(transparent))[0, 0].tolist() == [255, 255, 255]  # On white.
  cmyk = Image.new('CMYK', (4, 4), (0, 255, 255, 0))
  assert np.asarray(images.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize('name,reason', sorted(image_folders.BROKEN.items()))
def test_broken_files_say_why(folder, name, reason):
  root, _ = folder
  with open(os.path.join(root, name), 'rb') as f:
    data = f.read()
  with pytest.raises(images.BadImage, match=reason.split()[0]):
    images.load_rgb(data)


def test_fit_resizes_the_shorter_side_and_crops():
  img = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3))
  assert images.fit(img, 10).shape == (10, 10, 3)
  assert images.crop_offsets(20, 10, 10) == (5, 0)
  assert images.crop_offsets(20, 10, 10, 0.0, 0.0) == (0, 0)
  assert images.crop_offsets(20, 10, 10, 0.999, 0.5) == (10, 0)
  with pytest.raises(images.BadImage, match='data.upscale'):
    images.fit(img, 32, upscale=False)
  assert images.fit(img, 32).shape == (32, 32, 3)  # Upscaled by default.
  # Resampling only the crop window gives the resize-then-crop picture within a few levels.
  photo = image_folders.make_image("RGB", (60, 45), 3).resize((600, 450))
  whole = photo.resize((171, 128), Image.Resampling.BICUBIC, reducing_gap=3.0)
  plain = np.asarray(whole.crop((21, 0, 149, 128)), np.int32)
  assert images.crop_offsets(171, 128, 128) == (21, 0)
  assert np.abs(images.fit(photo, 128).astype(np.int32) - plain).max() <= 4
  flipped = images.fit(img, 10, flip=True)
  np.testing.assert_array_equal(flipped, images.fit(img, 10)[:, ::-1])


def test_bad_records_are_skipped_counted_and_logged(folder, caplog):
  root, _ = folder
  cfg = data_config(root, global_batch_size=12)  # One epoch: every file once.
  source = sources.FolderSource(str(root))
  loader = pipeline.make_loader(cfg, source)
  with caplog.at_level(logging.WARNING):
    batch = loader(0)
  bad_files = sorted(list(image_folders.BROKEN) + [image_folders.NO_CAPTION])
  bad_index = {source.files.index(n) for n in bad_files}
  assert not bad_index & set(batch['index'].tolist())
  # The batch is the first epoch: each bad file is counted and logged once, with its path.
  assert int(batch['bad'].sum()) == len(bad_files)
  for name in bad_files:
    assert caplog.text.count(os.path.join(str(root), name) + ':') == 1
  assert 'no caption' in caplog.text and 'zero-byte file' in caplog.text
  # Each later epoch (12 records, batch 12) counts them again, once each.
  assert [int(loader(s)['bad'].sum()) for s in range(1, 4)] == [len(bad_files)] * 3


def test_on_bad_record_error_names_the_file(folder):
  root, _ = folder
  cfg = data_config(root, on_bad_record='error', global_batch_size=12)
  loader = pipeline.make_loader(cfg, sources.FolderSource(str(root)))
  with pytest.raises(pipeline.DataError, match=r'(x_zero|y_truncated|z_text|w_nocaption)'):
    for step in range(3):
      loader(step)
  # Through grain's threads, as training reads it: the same exception type (train.py's one line).
  with pytest.raises(pipeline.DataError, match=r'(x_zero|y_truncated|z_text|w_nocaption)'):
    list(pipeline.iterate(loader, 0, 3, prefetch=1))


def test_small_images_under_no_upscale(tmp_path):
  image_folders.make_folder(tmp_path, broken=False)
  cfg = data_config(tmp_path, image_size=48, upscale=False, on_bad_record='error')
  loader = pipeline.make_loader(cfg, sources.FolderSource(str(tmp_path)))
  with pytest.raises(pipeline.DataError, match=r'smaller than data.image_size=48'):
    loader(0)


def test_a_folder_of_only_bad_files_is_one_clear_error(tmp_path):
  for i in range(70):
    (tmp_path / f'{i:03d}.jpg').write_bytes(b'')
  loader = pipeline.make_loader(data_config(tmp_path), sources.FolderSource(str(tmp_path)))
  with pytest.raises(pipeline.DataError, match='64 records in a row'):
    loader(0)


def test_captions_and_crops_are_drawn_per_position_deterministically(folder):
  root, _ = folder
  cfg = data_config(root, crop='random', flip=True, global_batch_size=12)
  source = sources.FolderSource(str(root))
  loader = pipeline.make_loader(cfg, source)
  steps = [loader(s) for s in range(8)]
  again = pipeline.make_loader(cfg, source)(5)
  for key in ('image', 'caption', 'index'):
    np.testing.assert_array_equal(steps[5][key], again[key])
  # Over 8 epochs each two-caption image shows both of its captions, and different crops.
  name = 'sub/g_rgb.webp'
  index = source.files.index(name)
  seen = [(b['caption'][j], b['image'][j].tobytes()) for b in steps
          for j in np.flatnonzero(b['index'] == index)]
  assert {c for c, _ in seen} == set(image_folders.captions_of(name))
  assert len({img for _, img in seen}) > 1


def test_source_errors_name_the_path_or_key(tmp_path):
  with pytest.raises(FileNotFoundError, match='data.path=.*nowhere'):
    sources.FolderSource(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='data.path is empty'):
    sources.FolderSource('')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match='holds no images'):
    sources.FolderSource(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match=r'matches no files'):
    sources.ArrayRecordSource(str(tmp_path / 'shards-*.array_record'))
  (tmp_path / 'shard-00000.array_record').write_bytes(b'not an array record file')
  with pytest.raises(sources.DataError, match=r'shard-00000.array_record is not an ArrayRecord'):
    sources.ArrayRecordSource(str(tmp_path / 'shard-*.array_record'))
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'a.png').write_bytes(image_folders.encode(image_folders.make_image('RGB', (8, 8), 0), 'PNG'))
  (bad / 'metadata.jsonl').write_text(json.dumps({'file_name': 'a.png', 'caption': 'x'}) + '\n')
  with pytest.raises(ValueError, match=r"metadata.jsonl:1: no caption field 'text'"):
    sources.FolderSource(str(bad))
  assert sources.FolderSource(str(bad), caption_key='caption').captions(0) == ['x']
  (bad / 'metadata.jsonl').write_text('{not json\n')
  with pytest.raises(ValueError, match=r'metadata.jsonl:1: not a JSON line'):
    sources.FolderSource(str(bad))


def test_workers_give_the_same_batches_as_the_main_process(folder):
  root, _ = folder
  cfg = data_config(root, crop='random', flip=True)
  loader = pipeline.make_loader(cfg, sources.FolderSource(str(root)))
  direct = [loader(s) for s in range(4)]
  it = pipeline.iterate(loader, 0, 4, prefetch=2, num_workers=2)
  via_workers = list(itertools.islice(it, 4))
  it.close()
  for want, (step, got) in zip(direct, via_workers):
    for key in ('image', 'caption', 'index', 'bad'):
      np.testing.assert_array_equal(want[key], got[key])


def test_train_py_reports_bad_data_in_one_line(tmp_path):
  import subprocess
  import sys
  from tests.test_multihost_training import REPO, _clean_env
  image_folders.make_folder(tmp_path / 'images')
  (tmp_path / 'images' / 'metadata.jsonl').write_text('{"file_name": "a_rgb.jpg", "caption": "x"}\n')
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/images.py:tiny', f'--workdir={tmp_path / "w"}',
       f'--config.data.path={tmp_path / "images"}', '--config.logging.eval_at_end=False'],
      cwd=REPO, env=dict(_clean_env(), XLA_FLAGS='--xla_force_host_platform_device_count=1'),
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and "no caption field 'text'" in last, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
