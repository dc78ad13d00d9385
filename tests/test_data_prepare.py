"""tools.prepare: folder / webdataset / TFDS -> ArrayRecord shards, resizing, resume, embeddings, errors."""
import glob
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import base, specs
from data import images, pipeline, sources
from text.spec import TextSpec

from tools import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(size=(12, 8), mode='RGB', color=(200, 30, 10)) -> bytes:
  buf = io.BytesIO()
  Image.new(mode, size, color).save(buf, 'PNG')
  return buf.getvalue()


def _save(path, img, fmt, caption=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, fmt)
  if caption is not None:
    with open(os.path.splitext(path)[0] + '.txt', 'w', encoding='utf-8') as f:
      f.write(caption)


def _good_folder(root):
  """Seven usable images in every mode the loader converts, captioned by .txt or metadata.jsonl."""
  p = lambda name: os.path.join(root, name)  # pylint: disable=unnecessary-lambda-assignment
  _save(p('a.jpg'), Image.new('RGB', (40, 30), (255, 0, 0)), 'JPEG', 'red box\nsecond caption\n')
  _save(p('b.png'), Image.new('L', (20, 50), 128), 'PNG', 'grey')
  _save(p('c.png'), Image.new('RGBA', (64, 16), (0, 0, 255, 90)), 'PNG', 'blue, transparent')
  _save(p('d.png'), Image.new('RGB', (9, 9), (1, 2, 3)).convert('P'), 'PNG', 'palette')
  _save(p('e.jpg'), Image.new('CMYK', (16, 24), (0, 255, 0, 0)), 'JPEG', 'cmyk')
  _save(p('f.png'), Image.fromarray(np.full((10, 14), 40000, np.uint16)), 'PNG', 'sixteen bits')
  _save(p('sub/g.webp'), Image.new('RGB', (70, 50), (0, 200, 0)), 'WEBP')
  with open(p('sub/metadata.jsonl'), 'w', encoding='utf-8') as f:
    f.write(json.dumps({'file_name': 'g.webp', 'text': ['green', 'a green square']}) + '\n')
  return root


@pytest.fixture
def folder(tmp_path):
  """The good folder plus four unusable files."""
  root = _good_folder(str(tmp_path / 'images'))
  for name, data in (('zero.jpg', b''), ('trunc.png', _png((32, 32))[:60]),
                     ('text.jpg', b'hello, not a picture')):
    with open(os.path.join(root, name), 'wb') as f:
      f.write(data)
    with open(os.path.join(root, os.path.splitext(name)[0] + '.txt'), 'w') as f:
      f.write('a caption')
  _save(os.path.join(root, 'nocap.png'), Image.new('RGB', (8, 8)), 'PNG')
  return root


def _records(output):
  src = sources.ArrayRecordSource(output + '-*.array_record')
  return [src[i] for i in range(len(src))]


def test_folder_round_trip_keeps_order_bytes_captions_and_counts_skips(folder, tmp_path):
  out = str(tmp_path / 'shards' / 'train')
  src = prepare.open_source('folder', path=folder)
  summary = prepare.prepare(src, out, num_shards=3, progress=False)
  assert sorted(os.path.basename(f) for f in glob.glob(out + '-*.array_record')) == [
      f'train-0000{k}-of-00003.array_record' for k in range(3)]
  good = [i for i in range(len(src)) if os.path.basename(src.files[i]) not in (
      'zero.jpg', 'trunc.png', 'text.jpg', 'nocap.png')]
  got = _records(out)
  assert [r['key'] for r in got] == [src[i]['key'] for i in good]
  for record, i in zip(got, good):
    raw = src[i]
    assert record['image'] == raw['image']  # --format=keep: the original bytes.
    assert record['captions'] == raw['captions']
  assert got[-1]['captions'] == ['green', 'a green square']  # The metadata.jsonl list.
  assert got[0]['captions'] == ['red box', 'second caption']
  assert (summary['written'], summary['skipped']) == (7, 4)
  reasons = summary['skip_reasons']
  assert reasons['zero-byte file']['examples'] == [os.path.join(src.root, 'zero.jpg')]
  assert reasons['not an image file']['examples'] == [os.path.join(src.root, 'text.jpg')]
  assert reasons['no caption']['examples'] == [os.path.join(src.root, 'nocap.png')]
  assert sum(r['count'] for r in reasons.values()) == 4 and len(reasons) == 4  # + the truncated one.
  with open(out + '.summary.json', encoding='utf-8') as f:
    assert json.load(f) == summary
  assert [s['contents'] for s in summary['shards']] == [
      {'start': 0, 'stop': 3}, {'start': 3, 'stop': 7}, {'start': 7, 'stop': 11}]


def test_shards_give_the_same_batches_as_the_folder(tmp_path):
  root = _good_folder(str(tmp_path / 'images'))
  out = str(tmp_path / 'train')
  folder_src = prepare.open_source('folder', path=root)
  prepare.prepare(folder_src, out, num_shards=3, workers=2, progress=False)  # Spawned workers.
  shard_src = sources.ArrayRecordSource(out + '-*.array_record')
  assert len(shard_src) == len(folder_src)
  cfg = specs.build(base.get_config()).data.replace(
      image_size=16, crop='random', flip=True, upscale=True, seed=3, global_batch_size=4,
      on_bad_record='skip')
  a, b = pipeline.make_loader(cfg, folder_src), pipeline.make_loader(cfg, shard_src)
  for step in range(3):
    x, y = a(step), b(step)
    for key in ('image', 'caption', 'index', 'bad'):
      np.testing.assert_array_equal(x[key], y[key])


def test_max_side_shrinks_and_never_enlarges(tmp_path):
  root = str(tmp_path / 'images')
  _save(os.path.join(root, 'big.png'), Image.new('RGBA', (80, 40), (9, 9, 9, 9)), 'PNG', 'big')
  _save(os.path.join(root, 'small.png'), Image.new('RGB', (20, 10)), 'PNG', 'small')
  src = prepare.open_source('folder', path=root)
  for fmt, want in (('keep', 'JPEG'), ('webp', 'WEBP'), ('png', 'PNG')):
    out = str(tmp_path / fmt / 'x')
    prepare.prepare(src, out, num_shards=1, options=prepare.Options(max_side=32, fmt=fmt),
                    progress=False)
    big, small = _records(out)
    img = images.decode(big['image'])
    assert (img.format, img.size) == (want, (32, 16))
    assert images.decode(small['image']).size == (20, 10)
    if fmt in ('keep', 'png'):
      assert small['image'] == src[1]['image']  # Unchanged bytes: not resized, already PNG.
  arrays = [{'key': 'a0', 'image': np.full((6, 4, 3), 7, np.uint8), 'captions': ['x']}]
  prepare.prepare(arrays, str(tmp_path / 'arr'), num_shards=1, progress=False)
  (record,) = _records(str(tmp_path / 'arr'))
  assert images.decode(record['image']).format == 'PNG'
  np.testing.assert_array_equal(np.asarray(images.load_rgb(record['image'])), arrays[0]['image'])


def test_resume_rewrites_only_the_missing_shard(folder, tmp_path):
  src = prepare.open_source('folder', path=folder)
  out = str(tmp_path / 'run' / 'train')
  prepare.prepare(src, out, num_shards=3, progress=False)
  paths = [prepare.shard_path(out, k, 3) for k in range(3)]
  before = {p: os.stat(p).st_mtime_ns for p in paths}
  os.remove(paths[1])
  with open(paths[1] + '.tmp', 'wb') as f:
    f.write(b'half a shard')  # What an interrupted worker leaves.
  summary = prepare.prepare(src, out, num_shards=3, progress=False)
  assert not glob.glob(out + '*.tmp')
  for p in (paths[0], paths[2]):
    assert os.stat(p).st_mtime_ns == before[p]
  fresh = str(tmp_path / 'fresh' / 'train')
  assert prepare.prepare(src, fresh, num_shards=3, progress=False)['shards'] == summary['shards']
  for k in range(3):
    with open(paths[k], 'rb') as f, open(prepare.shard_path(fresh, k, 3), 'rb') as g:
      assert f.read() == g.read()
  with pytest.raises(ValueError, match=r'--num_shards=3'):
    prepare.prepare(src, out, num_shards=4, progress=False)
  with pytest.raises(ValueError, match=r'max_side=0.*max_side=8'):
    prepare.prepare(src, out, num_shards=3, options=prepare.Options(max_side=8), progress=False)


def test_on_bad_record_error_names_the_file(folder, tmp_path):
  src = prepare.open_source('folder', path=folder)
  out = str(tmp_path / 'train')
  with pytest.raises(ValueError, match=r'nocap\.png: no caption \(--on_bad_record=error'):
    prepare.prepare(src, out, num_shards=1, options=prepare.Options(on_bad_record='error'),
                    progress=False)
  assert not glob.glob(out + '*')
  with pytest.raises(ValueError, match=r'(zero\.jpg|text\.jpg|trunc\.png|nocap\.png): '):
    prepare.prepare(src, out, num_shards=3, workers=2, progress=False,  # Raised in a worker.
                    options=prepare.Options(on_bad_record='error'))
  assert not os.path.exists(prepare.shard_path(out, 2, 3))  # A shard with bad files.


def _tar(path, members):
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
  wds = tmp_path / 'wds'
  wds.mkdir()
  js = lambda d: json.dumps(d).encode()  # pylint: disable=unnecessary-lambda-assignment
  _tar(wds / '00000.tar', [('000000.jpg', images.encode(np.zeros((8, 8, 3), np.uint8))),
                           ('000000.txt', b'one\n'),
                           ('000001.png', _png()), ('000001.json', js({'text': ['two', 'deux']}))])
  _tar(wds / '00001.tar', [('d/000002.webp', images.encode(np.ones((8, 8, 3), np.uint8), 'WEBP')),
                           ('d/000002.json', js({'caption': 'three', 'url': 'x'})),  # img2dataset.
                           ('000003.png', _png()),
                           ('000004.json', js({'text': 'no image'})),
                           ('000005.jpg', b'broken'), ('000005.txt', b'bad')])
  _tar(wds / '00002.tar', [('000006.png', _png((5, 5))), ('000006.txt', b'six')])
  out = str(tmp_path / 'out' / 'w')
  src = prepare.open_source('webdataset', path=str(wds / '{00000..00002}.tar'))
  summary = prepare.prepare(src, out, num_shards=2, progress=False)
  got = _records(out)
  assert [r['captions'] for r in got] == [['one'], ['two', 'deux'], ['three'], ['six']]
  assert got[0]['key'].endswith('00000.tar:000000') and got[2]['key'].endswith(':d/000002')
  assert (summary['written'], summary['skipped']) == (4, 3)
  assert sorted(summary['skip_reasons']) == ['no caption', 'no image member', 'not an image file']
  assert [len(s['contents']['tars']) for s in summary['shards']] == [1, 2]  # Contiguous tars.
  glob_src = prepare.open_source('webdataset', path=str(wds / '*.tar'))
  limited = prepare.prepare(glob_src, str(tmp_path / 'lim' / 'w'), num_shards=2, limit=3,
                            progress=False)
  assert [r['captions'][0] for r in _records(str(tmp_path / 'lim' / 'w'))] == ['one', 'two', 'three']
  assert limited['written'] == 3
  with pytest.raises(FileNotFoundError, match=r"--input=.*nothing-\*\.tar.*matches no files"):
    prepare.open_source('webdataset', path=str(wds / 'nothing-*.tar'))
  with pytest.raises(FileNotFoundError, match=r'00003\.tar.* \(and 6 more\) does not exist'):
    prepare.open_source('webdataset', path=str(wds / '{00000..00009}.tar'))


def test_unreadable_file_and_broken_tar_are_skipped(tmp_path):
  root = str(tmp_path / 'images')
  _save(os.path.join(root, 'a.png'), Image.new('RGB', (8, 8)), 'PNG', 'fine')
  os.symlink(str(tmp_path / 'gone.png'), os.path.join(root, 'b.png'))  # Listed, cannot be opened.
  summary = prepare.prepare(prepare.open_source('folder', path=root), str(tmp_path / 'f'),
                            num_shards=1, progress=False)
  assert summary['written'] == 1
  assert summary['skip_reasons'] == {'unreadable file': {'count': 1, 'examples': [
      os.path.join(os.path.abspath(root), 'b.png')]}}
  good = tmp_path / 'good.tar'
  _tar(good, [('0.png', _png()), ('0.txt', b'zero'), ('1.png', _png((40, 40))), ('1.txt', b'one')])
  with tarfile.open(good) as tar:
    cut = tar.getmember('1.png').offset_data + 10
  (tmp_path / 'cut.tar').write_bytes(good.read_bytes()[:cut])  # Ends inside the second image.
  summary = prepare.prepare(prepare.open_source('webdataset', path=str(tmp_path / 'cut.tar')),
                            str(tmp_path / 'w'), num_shards=1, progress=False)
  assert summary['written'] == 1 and list(summary['skip_reasons']) == ['unreadable tar']


def test_tfds_source(tmp_path):
  builders = pytest.importorskip('tests.tfds_builders')  # Needs tensorflow_datasets.
  data_dir = str(tmp_path / 'tfds')
  builders.build(builders.TinyCaptions, data_dir)
  src = prepare.open_source('tfds', tfds_name='tiny_captions', split='train', data_dir=data_dir,
                            caption_key='captions/text')
  out = str(tmp_path / 'out' / 't')
  summary = prepare.prepare(src, out, num_shards=2, options=prepare.Options(max_side=10),
                            progress=False)
  got = _records(out)
  assert summary['written'] == 3 and [r['key'] for r in got] == [f'tfds:tiny_captions/train/{i}'
                                                                 for i in range(3)]
  assert [r['captions'] for r in got] == [['caption 0'], ['caption 1'] * 2, ['caption 2']]
  assert [images.decode(r['image']).size for r in got] == [(6, 8), (5, 10), (4, 10)]
  assert images.decode(got[0]['image']).format == 'PNG'
  with pytest.raises(ValueError, match=r'--caption_key=.*not a feature'):
    prepare.open_source('tfds', tfds_name='tiny_captions', data_dir=data_dir, caption_key='text')


def test_text_embeddings_of_every_caption(tmp_path):
  root = str(tmp_path / 'images')
  _save(os.path.join(root, 'a.png'), Image.new('RGB', (8, 8)), 'PNG', 'a red circle\na square')
  _save(os.path.join(root, 'b.png'), Image.new('RGB', (8, 8)), 'PNG', 'three blue triangles')
  src = prepare.open_source('folder', path=root)
  cfg = prepare.text_config('', max_len=8)
  out = str(tmp_path / 'emb')
  prepare.prepare(src, out, num_shards=1, options=prepare.Options(text=cfg), progress=False)
  from text import encoders  # pylint: disable=import-outside-toplevel
  enc = encoders.build(TextSpec(**cfg))
  for record in _records(out):
    text, n = record['text'], len(record['captions'])
    assert text['encoder'] == enc.fingerprint
    assert text['emb'].dtype == np.float16 and text['emb'].shape == (n, 8, enc.dim)
    assert text['mask'].dtype == bool and text['mask'].shape == (n, 8)
    assert text['pooled'].dtype == np.float32 and text['pooled'].shape == (n, enc.dim)
    emb, mask, pooled = enc.encode(enc.init(None), enc.tokenize(record['captions']))
    np.testing.assert_array_equal(text['mask'], mask)
    np.testing.assert_allclose(text['emb'], emb, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(text['pooled'], pooled, atol=1e-4, rtol=1e-4)


def test_cli_error_is_one_line(tmp_path):
  missing = str(tmp_path / 'no_such_folder')
  proc = subprocess.run(
      [sys.executable, '-m', 'tools.prepare', '--source=folder', f'--input={missing}',
       f'--output={tmp_path / "out" / "x"}'], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=ROOT), timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: --input='{missing}': no such directory."]


def test_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'--input=.*no such directory'):
    prepare.open_source('folder', path=str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='--source'):
    prepare.open_source('lmdb', path=str(tmp_path))
  with pytest.raises(ValueError, match='--format'):
    prepare.prepare([], str(tmp_path / 'x'), num_shards=1, options=prepare.Options(fmt='gif'))
  with pytest.raises(ValueError, match='is a directory'):
    prepare.prepare([], str(tmp_path), num_shards=1)
