"""Aspect-ratio buckets (data/buckets.py): the shapes, the assignment, the cover crop, and the
batch schedule: single-shaped batches, equal over processes and workers, exact resume, epochs."""
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import images as images_config
from configs import specs, validation
from data import batch, buckets, images, pipeline, sources
from tests import image_folders

BUCKETS = ((20, 12), (16, 16), (12, 20))  # (height, width): portrait, square, landscape.
SHAPES = {'portrait': (30, 50), 'square': (40, 40), 'landscape': (50, 30)}  # PIL (width, height)


def make_mixed_folder(root, counts=(6, 4, 6), broken=True) -> dict[str, int]:
  """Portrait, square and landscape JPEGs/PNGs with captions; returns {file: its bucket}. With
  `broken`: a file that is no image (no header) and a truncated JPEG (its header reads)."""
  os.makedirs(root, exist_ok=True)
  rows, want = [], {}
  for b, (kind, count) in enumerate(zip(SHAPES, counts)):
    for i in range(count):
      name = f'{kind}_{i}.png' if i % 2 else f'{kind}_{i}.jpg'
      img = image_folders.make_image('RGB', SHAPES[kind], seed=10 * b + i)
      img.save(os.path.join(root, name), format='PNG' if i % 2 else 'JPEG')
      rows.append({'file_name': name, 'text': f'a {kind} picture number {i}'})
      want[name] = {'portrait': 0, 'square': 1, 'landscape': 2}[kind]
  if broken:
    with open(os.path.join(root, 'zz_text.jpg'), 'wb') as f:
      f.write(b'not an image\n')
    jpeg = image_folders.encode(image_folders.make_image('RGB', (30, 50), 99), 'JPEG')
    with open(os.path.join(root, 'portrait_cut.jpg'), 'wb') as f:
      f.write(jpeg[:len(jpeg) // 2])
    rows += [{'file_name': 'zz_text.jpg', 'text': 'x'}, {'file_name': 'portrait_cut.jpg',
                                                         'text': 'cut'}]
  with open(os.path.join(root, 'metadata.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  return want


def data_spec(path, **overrides):
  config = images_config.get_config('tiny')
  config.data.path = str(path)
  config.data.buckets = BUCKETS
  config.data.global_batch_size = 4
  config.data.update(overrides)
  return specs.build(config).data


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mixed'))
  return root, make_mixed_folder(root)


def test_generated_buckets_follow_the_kohya_rule():
  out = buckets.generate(64, 8, 2.0)
  assert (64, 64) in out and (48, 80) in out and (80, 48) in out and (40, 96) not in out
  for h, w in out:
    assert h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64 and max(h, w) / min(h, w) <= 2.0
    assert (w, h) in out
  assert [h / w for h, w in out] == sorted((h / w for h, w in out), reverse=True)
  assert buckets.generate(64, 8, 1.0) == ((64, 64),)


@pytest.mark.parametrize('bad, words', [
    (((16, 16), (12, 21)), 'multiple of 2'), (((16, 16), (16, 16)), 'repeats'),
    (((16,),), '(height, width) pair'), (((16, True),), 'pair')])
def test_bad_buckets_are_refused_naming_the_field(bad, words):
  config = images_config.get_config('tiny')
  config.data.path = '/nowhere'
  config.data.buckets = bad
  with pytest.raises(ValueError, match='data.buckets') as e:
    validation.validate(config)
  assert words in str(e.value)


def test_size_step_is_what_the_network_needs():
  config = images_config.get_config('tiny')  # channel_mult (1, 2): one halving.
  assert validation.size_step(specs.build(config)) == 2
  config.model.patch_size, config.model.channel_mult = 2, (1, 2, 2)
  assert validation.size_step(specs.build(config)) == 8
  config.data.bucket_max_aspect = 0.5
  with pytest.raises(ValueError, match='data.bucket_max_aspect'):
    specs.build(config)


def test_nearest_bucket_in_log_aspect_ratio():
  sizes = np.array([[50, 30], [40, 40], [30, 50], [1000, 10], [10, 1000], [41, 40]])
  np.testing.assert_array_equal(buckets.nearest(BUCKETS, sizes), [0, 1, 2, 0, 2, 1])
  # 2:1 is exactly between 1:1 and 4:1 in log space; 3:2 is nearer 2:1 than 1:1 there.
  np.testing.assert_array_equal(buckets.nearest(((10, 10), (20, 10)), [[15, 10]]), [1])


def test_header_size_applies_exif_rotation_as_decoding_does():
  img = image_folders.make_image('RGB', (30, 20), 0)  # 30 wide, 20 high, stored rotated.
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  img.save(buf, format='JPEG', exif=exif)
  data = buf.getvalue()
  assert buckets.image_size({'image': data}) == (30, 20)  # (height, width) once rotated.
  assert images.load_rgb(data).size == (20, 30)  # PIL (width, height): the same.
  assert buckets.image_size({'image': np.zeros((5, 7, 3), np.uint8)}) == (5, 7)
  with pytest.raises(images.BadImage):
    buckets.image_size({'image': b'no image'})


def test_cover_keeps_the_square_fit_and_crops_rectangles():
  img = image_folders.make_image('RGB', (50, 30), 1)
  for uv in (None, (0.3, 0.8)):
    np.testing.assert_array_equal(images.cover(img, 16, 16, crop_uv=uv)[0],
                                  images.fit(img, 16, crop_uv=uv))
  pixels, (top, left) = images.cover(img, 12, 20)  # 50x30 -> 20x12 exactly: no crop.
  assert pixels.shape == (12, 20, 3) and (top, left) == (0, 0)
  pixels, (top, left) = images.cover(img, 20, 12)  # Covering 12x20 needs 33x20: crop the width.
  assert pixels.shape == (20, 12, 3) and top == 0 and left == (33 - 12) // 2
  with pytest.raises(images.BadImage, match='upscale'):
    images.cover(img, 40, 40, upscale=False)


def _schedule(counts, batch_size=4, seed=0):
  assignment = np.concatenate([np.full(n, b) for b, n in enumerate(counts)])
  return buckets.Schedule(np.random.default_rng(1).permutation(assignment), len(counts), seed,
                          batch_size)


def test_an_epoch_visits_every_example_once_one_bucket_a_batch():
  schedule = _schedule((8, 4, 12, 3))  # The last bucket is smaller than a batch: never drawn.
  assert schedule.batches_per_epoch == 6 and schedule.leftover == 3
  members = [set(m.tolist()) for m in schedule.members]
  for epoch in range(2):
    seen = []
    for step in range(epoch * 6, epoch * 6 + 6):
      bucket, _, _ = schedule(step)
      indices = schedule.indices(step)
      assert set(indices.tolist()) <= members[bucket]
      seen += indices.tolist()
    assert sorted(seen) == sorted(set().union(*members[:3]))
  drawn = [schedule(s)[0] for s in range(600)]
  np.testing.assert_allclose(np.bincount(drawn, minlength=4) / 600, [2 / 6, 1 / 6, 3 / 6, 0])
  other = _schedule((8, 4, 12, 3))  # A pure function of (seed, step): a new object agrees.
  assert all((other.indices(s) == schedule.indices(s)).all() for s in (13, 0, 7))
  assert not all((_schedule((8, 4, 12, 3), seed=1).indices(s) == schedule.indices(s)).all()
                 for s in range(6))


def test_a_batch_larger_than_every_bucket_is_refused():
  with pytest.raises(ValueError, match='data.global_batch_size=8'):
    _schedule((4, 7), batch_size=8)


def test_the_folder_goes_to_its_buckets_from_headers(folder):
  root, want = folder
  spec = data_spec(root)
  source = sources.FolderSource(root)
  loader = buckets.make_loader(spec, source, step=2)
  got = {source.files[i]: int(b) for b, m in enumerate(loader.schedule.members) for i in m}
  assert got == {**want, 'portrait_cut.jpg': 0}  # Its header reads; the pixels do not.
  assert 'zz_text.jpg' not in got  # No header: left out, logged.


def test_batches_are_single_shaped_with_their_geometry(folder):
  root, _ = folder
  loader = buckets.make_loader(data_spec(root), sources.FolderSource(root), step=2)
  shapes = set()
  for step in range(12):
    out = loader(step)
    bucket, _, _ = loader.schedule(step)
    assert out[batch.IMAGE].shape == (4,) + BUCKETS[bucket] + (3,)
    assert out[batch.IMAGE].dtype == np.float32 and np.abs(out[batch.IMAGE]).max() <= 1
    assert out[batch.ORIG_SIZE].dtype == np.int32 and out[batch.ORIG_SIZE].shape == (4, 2)
    assert out[batch.CROP_OFFSET].shape == (4, 2) and (out[batch.CROP_OFFSET] >= 0).all()
    shapes.add(out[batch.IMAGE].shape)
    orig = {(h, w) for h, w in out[batch.ORIG_SIZE].tolist()}
    assert orig <= {(50, 30), (40, 40), (30, 50)}
  assert len(shapes) == 3


def test_an_unreadable_record_takes_the_next_of_its_bucket(folder):
  root, _ = folder
  source = sources.FolderSource(root)
  loader = buckets.make_loader(data_spec(root), source, step=2)
  cut = source.files.index('portrait_cut.jpg')
  step = next(s for s in range(20) if cut in loader.schedule.indices(s))
  out = loader(step)
  assert out[batch.BAD].sum() == 1 and cut not in out[batch.INDEX]
  assert all(source.files[i].startswith('portrait') for i in out[batch.INDEX])
  with pytest.raises(sources.DataError, match='on_bad_record=error'):
    buckets.make_loader(data_spec(root, on_bad_record='error'), source, step=2)


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_processes_assemble_the_batches_one_process_loads(folder):
  root, _ = folder
  spec = data_spec(root)
  one = buckets.make_loader(spec, sources.FolderSource(root), step=2)
  two = [buckets.make_loader(spec, sources.FolderSource(root), 2, p, 2) for p in range(2)]
  for step in range(6):
    parts = [loader(step) for loader in two]
    _equal(one(step), {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


@pytest.mark.full  # Worker processes; the stream in the main process: the tests above.
def test_workers_and_resume_give_the_same_stream(folder):
  root, _ = folder
  spec = data_spec(root, crop='random', flip=True)
  loader = buckets.make_loader(spec, sources.FolderSource(root), step=2)
  direct = [loader(s) for s in range(6)]
  for start, workers in ((0, 2), (3, 0)):  # Two grain workers; a resume at step 3.
    batches = pipeline.iterate(loader, start, 6, prefetch=1, num_workers=workers)
    try:
      got = list(batches)
    finally:
      batches.close()
    assert [s for s, _ in got] == list(range(start, 6))
    for s, out in got:
      _equal(direct[s], out)


def test_square_config_keeps_the_square_loader(folder):
  root, _ = folder
  spec = data_spec(root, buckets=())
  assert not spec.bucketed
  loader = pipeline.make_loader(spec, sources.FolderSource(root))
  assert type(loader) is pipeline.BatchLoader and batch.ORIG_SIZE not in loader(0)


def test_a_bucket_over_the_memory_budget_is_refused_naming_the_field():
  x = np.zeros((512, 1024), np.float32)  # 2 MiB in, 2 MiB out.
  compiled = jax.jit(lambda a: a * 2).lower(x).compile()
  buckets.check_memory((48, 80), compiled, 1.0)  # Fits.
  buckets.check_memory((48, 80), compiled, 0.0)  # 0: not checked.
  buckets.check_memory((48, 80), None, 1e-6)  # No analysis at hand: logged, not refused.
  with pytest.raises(ValueError, match=r'The 48x80 bucket needs 0\.00 GiB a device .* more than '
                     r'data\.bucket_max_gib=0\.001'):
    buckets.check_memory((48, 80), compiled, 0.001)
