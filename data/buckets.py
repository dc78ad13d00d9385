"""Aspect-ratio buckets: training shapes (height, width) of about one area, and which image goes
to which, and the batch schedule over them that is a pure function of (seed, step).

Buckets are given (`data.buckets`) or generated (`generate`: kohya's and SDXL's rule: for each
width that is a multiple of `step`, the largest multiple of `step` as height that keeps the area
at most image_size^2, both orientations, aspect ratios up to `data.bucket_max_aspect`). `step` is
what the network needs of a side (configs.validation.size_step: the U-Net's downsampling x
patch size, x the autoencoder's factor in latent space). Each image goes to the bucket nearest
its aspect ratio in log space, from its size alone (`image_size`: the header, not the pixels).

The schedule (`Schedule`): epoch e permutes each bucket's members (seeded by (seed, e, bucket)),
cuts them into full global batches (a bucket's leftover, fewer than a batch, waits for a later
epoch's permutation) and shuffles all batches of the epoch (seeded by (seed, e)), so a bucket is
drawn in proportion to its size, every batch is one shape, and an epoch visits every example of
a bucket once except its leftover. Batch s is epoch s // T, batch s % T of it (T batches per
epoch), the same on every host, worker and resume.
"""
from __future__ import annotations

import io
import json
import os
from concurrent import futures
from typing import Sequence

from absl import logging
import numpy as np
from PIL import Image

from data import images, pipeline, randomness, records, sources

_BUCKET_STREAM = 0x4255  # Domain tags of the random streams (never collide with other uses).
_ORDER_STREAM = 0x424F
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (images.to_rgb turns).


def generate(image_size: int, step: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
  """Buckets (height, width) of area at most image_size^2, sides multiples of `step`, aspect
  ratios up to `max_aspect` (>= 1), the square image_size x image_size included; sorted by
  aspect ratio (portrait first)."""
  if max_aspect < 1:
    raise ValueError(f'data.bucket_max_aspect={max_aspect} must be >= 1 (or 0: off).')
  if image_size % step:
    raise ValueError(f'data.image_size={image_size} must be a multiple of {step} (what the network '
                     'needs of a side) to generate buckets.')
  area, out = image_size * image_size, {(image_size, image_size)}
  for width in range(step, area // step + 1, step):
    height = area // width // step * step
    if height >= step and max(width, height) / min(width, height) <= max_aspect:
      out |= {(height, width), (width, height)}
  return tuple(sorted(out, key=lambda hw: hw[0] / hw[1], reverse=True))


def check(buckets: Sequence[Sequence[int]], step: int) -> tuple[tuple[int, int], ...]:
  """The buckets as (height, width) int pairs; ValueError naming data.buckets if one is not a pair
  of positive multiples of `step` or one repeats."""
  out = []
  for b in buckets:
    if (not isinstance(b, (tuple, list)) or len(b) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b)):
      raise ValueError(f'data.buckets has {b!r}: each bucket is a (height, width) pair of '
                       'positive integers.')
    if b[0] % step or b[1] % step:
      raise ValueError(f'data.buckets has {tuple(b)}: each side must be a multiple of {step}, '
                       'what the network takes (the U-Net halves it len(model.channel_mult)-1 '
                       'times after model.patch_size, and the autoencoder divides it).')
    out.append((int(b[0]), int(b[1])))
  if not out:
    raise ValueError('data.buckets is empty.')
  if len(set(out)) != len(out):
    raise ValueError(f'data.buckets={tuple(out)} repeats a bucket.')
  return tuple(out)


def nearest(buckets: Sequence[tuple[int, int]], sizes: np.ndarray) -> np.ndarray:
  """Bucket index (int64 [n]) nearest each (height, width) of `sizes` [n, 2] in log aspect ratio
  (ties: the first bucket)."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  bucket_log = np.log([h / w for h, w in buckets])
  image_log = np.log(sizes[:, 0] / sizes[:, 1])
  return np.argmin(np.abs(image_log[:, None] - bucket_log[None, :]), axis=1).astype(np.int64)


def define(given: Sequence, image_size: int, max_aspect: float, step: int
           ) -> tuple[tuple[int, int], ...]:
  """The buckets: `given` checked, or (given empty) generated from image_size and max_aspect."""
  return check(given, step) if given else generate(image_size, step, max_aspect)


def image_size(raw) -> tuple[int, int]:
  """(height, width) of a raw example's image as the loader will see it (EXIF rotation applied):
  the record's stored `size` (tools.prepare), else from the header only where the image is
  encoded; BadImage/OSError if unreadable."""
  if raw.get('size') is not None:
    return int(raw['size'][0]), int(raw['size'][1])
  image = raw['image']
  if isinstance(image, np.ndarray):
    return int(image.shape[0]), int(image.shape[1])
  if not image:
    raise images.BadImage('zero-byte file')
  return _header_size(io.BytesIO(image))


def _header_size(file) -> tuple[int, int]:
  try:
    with Image.open(file) as img:
      w, h = img.size
      if img.getexif().get(0x0112) in _ROTATED:
        w, h = h, w
  except (OSError, SyntaxError, ValueError) as e:
    raise images.BadImage('not an image file' if isinstance(e, Image.UnidentifiedImageError)
                          else str(e) or type(e).__name__) from None
  return h, w


def source_sizes(source: Sequence, threads: int = 8, indices: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, list[str]]:
  """(int64 [n, 2] (height, width) of every example (or of those at `indices`), (0, 0) where
  unreadable; the reasons of the unreadable ones, 'path or index: why'). Shards of tools.prepare:
  the sizes their sidecars list; else headers only (a folder: the files' first bytes; a shard's
  record: its stored size), in threads. All sizes are kept on the source, so a second loader over
  it reads nothing."""
  cached = getattr(source, '_bucket_sizes', None)
  if cached is None:
    cached = _sidecar_sizes(source)
  if cached is not None:
    return cached if indices is None else (cached[0][np.asarray(indices, np.int64)], [])

  def one(i):
    folder = isinstance(source, sources.FolderSource)
    try:
      if folder:
        return _header_size(os.path.join(source.root, source.files[i])), None
      return image_size(source[i]), None
    except (OSError, images.BadImage) as e:
      return (0, 0), f'{os.path.join(source.root, source.files[i]) if folder else i}: {e}'

  with futures.ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(one, range(len(source)) if indices is None else indices))
  sizes = np.array([r[0] for r in results], np.int64).reshape(-1, 2)
  out = sizes, [r[1] for r in results if r[1] is not None]
  if indices is None:
    try:
      source._bucket_sizes = out  # pylint: disable=protected-access
    except AttributeError:
      pass
  return out


def _sidecar_sizes(source) -> tuple[np.ndarray, list[str]] | None:
  """The sizes the sidecars of tools.prepare's shards list (`sizes`, one per record), or None
  where a shard has no such sidecar (an older one, or shards copied without them)."""
  if not isinstance(source, sources.ArrayRecordSource):
    return None
  sizes = []
  for shard in source.files:
    try:
      with open(shard + '.json', encoding='utf-8') as f:
        side = json.load(f)
    except (OSError, ValueError):
      return None
    try:
      shard_sizes = records.unpack_sizes(side.get('sizes', ''))
    except (AttributeError, ValueError):
      return None
    if len(shard_sizes) != side.get('written'):
      return None
    sizes += shard_sizes
  if len(sizes) != len(source):
    return None
  out = np.array(sizes, np.int64).reshape(-1, 2), []
  source._bucket_sizes = out  # pylint: disable=protected-access
  return out


class Schedule:
  """Global batch `step` -> (bucket, example indices [global_batch_size]): a pure function of
  (seed, step) given each example's bucket (`assignment`, -1: unusable)."""

  def __init__(self, assignment: np.ndarray, num_buckets: int, seed: int, global_batch_size: int):
    assignment = np.asarray(assignment, np.int64)
    self.seed, self.global_batch_size = seed, global_batch_size
    self.members = tuple(np.flatnonzero(assignment == b) for b in range(num_buckets))
    self.batches_per_bucket = tuple(len(m) // global_batch_size for m in self.members)
    self.batches_per_epoch = sum(self.batches_per_bucket)
    if self.batches_per_epoch == 0:
      raise ValueError(
          f'data.global_batch_size={global_batch_size} is larger than every bucket (they hold '
          f'{[len(m) for m in self.members]} examples); use a smaller batch or fewer buckets.')
    # (bucket, k) of the epoch's batches before shuffling.
    self._batches = np.array([(b, k) for b, n in enumerate(self.batches_per_bucket)
                              for k in range(n)], np.int64).reshape(-1, 2)
    self._cached = None

  @property
  def leftover(self) -> int:
    """Examples each epoch leaves out: the part of each bucket that fills no whole batch."""
    return sum(len(m) - n * self.global_batch_size
               for m, n in zip(self.members, self.batches_per_bucket))

  def _epoch(self, epoch: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """(the epoch's (bucket, k) batches in order, each bucket's permutation); the last kept."""
    if self._cached is None or self._cached[0] != epoch:
      order = np.argsort(randomness.uniforms((_ORDER_STREAM, self.seed, epoch),
                                             self.batches_per_epoch), kind='stable')
      perms = tuple(m[np.argsort(randomness.uniforms((_BUCKET_STREAM, self.seed, epoch, b),
                                                     len(m)), kind='stable')]
                    for b, m in enumerate(self.members))
      self._cached = (epoch, self._batches[order], perms)
    return self._cached[1:]

  def __call__(self, step: int) -> tuple[int, int, np.ndarray]:
    """(bucket, start, the bucket's permutation this epoch): the batch's examples are
    permutation[start:start + global_batch_size]; an unusable one is replaced by the next."""
    epoch, t = divmod(int(step), self.batches_per_epoch)
    batches, perms = self._epoch(epoch)
    b, k = batches[t]
    return int(b), int(k) * self.global_batch_size, perms[b]

  def indices(self, step: int) -> np.ndarray:
    """The example indices of global batch `step`."""
    _, start, perm = self(step)
    return perm[start:start + self.global_batch_size]

  def __getstate__(self):
    return dict(self.__dict__, _cached=None)

  def describe(self, buckets: Sequence[tuple[int, int]]) -> str:
    """'48x80: 120 images in 15 batches, ...' for the start-up log."""
    return ', '.join(f'{h}x{w}: {len(m)} images in {n} batch{"es" * (n != 1)}'
                     for (h, w), m, n in zip(buckets, self.members, self.batches_per_bucket))



class BucketLoader(pipeline.BatchLoader):
  """step -> this process's part of global batch `step`, all of one bucket's shape (picklable).

  The examples are the schedule's; process p of P loads the contiguous slice p of the batch
  (pipeline.process_slice), so P processes assemble the batch one process loads. A slot whose
  record is unusable takes the next usable one of the same bucket's permutation.
  """

  def __init__(self, source: Sequence, transform: pipeline.Transform,
               buckets: Sequence[tuple[int, int]], assignment: np.ndarray, **kwargs):
    super().__init__(source, transform, **kwargs)  # images=False: the records' cached latents.
    self.buckets = tuple(buckets)
    self.schedule = Schedule(assignment, len(self.buckets), self.seed, self.global_batch_size)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    bucket, start, perm = self.schedule(step)
    shape = self.buckets[bucket]
    rows = []
    for j in range(self.part.start, self.part.stop):
      slot = start + j
      rows.append(self.example(int(step) * self.global_batch_size + j, shape=shape,
                               candidate=lambda a, slot=slot: int(perm[(slot + a) % len(perm)])))
    return self.collate(rows)


def of(cfg, step: int) -> tuple[tuple[int, int], ...]:
  """The buckets of `config.data` (a DataSpec): data.buckets checked, or generated."""
  return define(cfg.buckets, cfg.image_size, cfg.bucket_max_aspect, step)


def common_shape(cfg, source: Sequence, step: int, limit: int = 256) -> tuple[int, int] | None:
  """The non-square bucket of `config.data` that most of `limit` examples spread over `source`
  go to (None if none does): the shape the eval grid samples at besides the square."""
  shapes = of(cfg, step)
  picks = np.unique(np.linspace(0, len(source) - 1, min(limit, len(source))).astype(np.int64))
  sizes, _ = source_sizes(source, indices=picks)
  sizes = sizes[sizes.min(axis=1) > 0]
  counts = np.bincount(nearest(shapes, sizes), minlength=len(shapes)) if len(sizes) else []
  ranked = [b for b in np.argsort(-np.asarray(counts), kind='stable')
            if counts[b] and shapes[b][0] != shapes[b][1]]
  return shapes[ranked[0]] if ranked else None


def make_loader(cfg, source: Sequence, step: int, process_index: int = 0,
                process_count: int = 1, *, images: bool = True) -> BucketLoader:
  """The BucketLoader of `config.data` (a data.spec.DataSpec with buckets) over `source`; `step`:
  the multiple the network needs of a side; `images=False`: the batches carry the records' cached
  latents (of each one's bucket, tools.prepare --buckets). Logs the buckets, their examples, and
  what is left out (unreadable headers are skipped as bad records, or fatal with
  data.on_bad_record=error)."""
  buckets = of(cfg, step)
  sizes, failures = source_sizes(source)
  if failures and cfg.on_bad_record == 'error':
    raise sources.DataError(f'{failures[0]} (data.on_bad_record=error; use skip to count and skip '
                            'such records).')
  for failure in failures[:10]:
    logging.warning('data: skipped %s', failure)
  usable = sizes.min(axis=1) > 0
  assignment = np.where(usable, nearest(buckets, np.maximum(sizes, 1)), -1)
  transform = pipeline.Transform(cfg.image_size, cfg.crop, cfg.flip, cfg.upscale)
  loader = BucketLoader(source, transform, buckets, assignment, seed=cfg.seed,
                        global_batch_size=cfg.global_batch_size, on_bad_record=cfg.on_bad_record,
                        process_index=process_index, process_count=process_count,
                        images=images)
  schedule = loader.schedule
  logging.info('Buckets: %d shapes (sides multiples of %d), %d batches an epoch; %s.',
               len(buckets), step, schedule.batches_per_epoch, schedule.describe(buckets))
  if schedule.leftover or failures:
    logging.info('Buckets: each epoch leaves out %d examples (fewer than a batch in their bucket; '
                 'a later epoch draws others), and %d have unreadable headers.',
                 schedule.leftover, len(failures))
  return loader


def check_memory(bucket: tuple[int, int], compiled, max_gib: float) -> None:
  """ValueError naming data.bucket_max_gib if the train step `compiled` for `bucket` needs more
  than `max_gib` GiB a device by XLA's memory analysis (arguments + outputs + temporaries, less
  what outputs reuse of arguments); nothing with max_gib=0, or without the analysis (the
  program not at hand: several processes, or the trace cache off, where it is logged)."""
  if not max_gib:
    return
  memory = compiled.memory_analysis() if compiled is not None else None
  if memory is None:
    logging.warning('data.bucket_max_gib: no memory analysis of the %dx%d program; not checked.',
                    *bucket)
    return
  need = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**30
  if need > max_gib:
    raise ValueError(
        f'The {bucket[0]}x{bucket[1]} bucket needs {need:.2f} GiB a device for its train step, '
        f'more than data.bucket_max_gib={max_gib}: drop it from data.buckets (or lower '
        'data.bucket_max_aspect), use a smaller data.global_batch_size, or raise the limit.')
