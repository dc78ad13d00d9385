"""Per-process batches on grain: the global batch of step s is a pure function of (seed, s).

The example stream concatenates epochs, each a permutation of the source drawn from
(seed, epoch); batch s is stream positions [s*B, (s+1)*B) and process p of P loads the
contiguous slice p of it, reading only those records. Everything random about an example
(which caption, where to crop, whether to flip) is drawn from (seed, its stream position), so
a resumed run, or a run on another number of processes or grain workers, sees exactly the same
batches. A record that cannot be used (unreadable, not an image, no caption) is replaced by the
next usable one in the stream, logged with its path and counted in the batch's 'bad' field
(1 where the slot's own record was unusable, so an epoch counts each bad record once; the
training loop reports the sum); `data.on_bad_record='error'` makes it fatal instead.

  source = sources.make(settings.data)  # A data.spec.DataSpec.
  loader = make_loader(settings.data, source, jax.process_index(), jax.process_count())
  for step, batch in iterate(loader, start_step, prefetch=2, num_workers=0):
    ...  # batch: the keys of data/batch.py ('image', 'caption', 'index', 'bad', ...)

Steps are mapped to batches by a grain `MapDataset`; grain's threads (num_workers=0) or worker
processes (num_workers > 0) prepare them ahead, in order.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterator, Sequence

from absl import flags
from absl import logging
import numpy as np

from data import batch, images, randomness, sources
from data.sources import DataError  # pylint: disable=unused-import  (raised here too)

from data.spec import CROPS, ON_BAD_RECORD
MAX_CONSECUTIVE_BAD = 64  # More unusable records than this in a row: the data is wrong, stop.
_EPOCH_STREAM = 0x4550  # Domain tags of the random streams (never collide with other uses).
_EXAMPLE_STREAM = 0x4558


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in `epoch` (a permutation of range(num_examples)), read-only."""
  perm = np.argsort(randomness.uniforms((_EPOCH_STREAM, seed, epoch), num_examples), kind='stable')
  perm.flags.writeable = False
  return perm


def stream_indices(seed: int, positions: np.ndarray, num_examples: int) -> np.ndarray:
  """Example index at each stream position (int64, same shape)."""
  positions = np.asarray(positions, np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(positions.shape, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(int(seed), int(epoch), num_examples)[offsets[sel]]
  return out


def global_batch_indices(seed: int, step: int, global_batch_size: int,
                         num_examples: int) -> np.ndarray:
  """Example indices (int64 [global_batch_size]) of batch `step`: stream positions [step*B, (step+1)*B)."""
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'data.seed must be a non-negative integer, got {seed!r}.')
  if global_batch_size < 1:
    raise ValueError(f'data.global_batch_size must be positive, got {global_batch_size}.')
  if num_examples < 1:
    raise ValueError(f'The dataset is empty (num_examples={num_examples}).')
  if step < 0:
    raise ValueError(f'step must be non-negative, got {step}.')
  positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
  return stream_indices(seed, positions, num_examples)


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The contiguous part of the global batch that process `process_index` of `process_count` loads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if global_batch_size % process_count:
    raise ValueError(
        f'data.global_batch_size ({global_batch_size}) must be divisible by the number of '
        f'processes ({process_count}); change data.global_batch_size.')
  n = global_batch_size // process_count
  return slice(process_index * n, (process_index + 1) * n)


@dataclasses.dataclass(frozen=True)
class Transform:
  """Raw example -> (RGB uint8 [S, S, 3], caption index): the train-time geometry."""
  image_size: int
  crop: str  # 'center' or 'random' (data.spec.CROPS).
  flip: bool  # Random horizontal flip.
  upscale: bool  # False: an image smaller than image_size is a bad record.

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f'data.crop={self.crop!r} is not one of {CROPS}.')

  def __call__(self, raw: dict[str, Any], uniforms) -> tuple[np.ndarray, int]:
    """`uniforms()`: 4 uniforms in [0, 1) of this stream position (caption, crop x, crop y, flip).

    Drawn only when something is random (several captions, a random crop, flips).
    """
    u, which = self._draw(raw, uniforms)
    image = raw['image']
    img = images.from_array(image) if isinstance(image, np.ndarray) else images.load_rgb(image)
    crop_uv = (u[1], u[2]) if self.crop == 'random' else None
    pixels = images.fit(img, self.image_size, upscale=self.upscale, crop_uv=crop_uv,
                        flip=self.flip and u[3] < 0.5)
    return pixels, which

  def cover(self, raw: dict[str, Any], uniforms, shape: tuple[int, int]
            ) -> tuple[np.ndarray, int, tuple[int, int], tuple[int, int]]:
    """`__call__` for an aspect-ratio bucket (height, width): (RGB uint8 [height, width, 3], caption
    index, the image's (height, width), the crop's (top, left) in the resized image)."""
    u, which = self._draw(raw, uniforms)
    image = raw['image']
    img = images.from_array(image) if isinstance(image, np.ndarray) else images.load_rgb(image)
    crop_uv = (u[1], u[2]) if self.crop == 'random' else None
    pixels, offset = images.cover(img, *shape, upscale=self.upscale, crop_uv=crop_uv,
                                  flip=self.flip and u[3] < 0.5)
    return pixels, which, (img.height, img.width), offset

  def caption_only(self, raw: dict[str, Any], uniforms) -> int:
    """The caption index `__call__` would pick, without decoding the image (cached latents)."""
    return self._draw(raw, uniforms)[1]

  def _draw(self, raw, uniforms):
    captions = raw['captions']
    if not captions:
      raise images.BadImage('no caption')
    random = len(captions) > 1 or self.crop == 'random' or self.flip
    u = uniforms() if random else (0.0, 0.0, 0.0, 1.0)
    return u, int(u[0] * len(captions))


class BatchLoader:
  """step -> this process's part of global batch `step` (picklable: runs in grain workers)."""

  def __init__(self, source: Sequence, transform: Transform, *, seed: int, global_batch_size: int,
               on_bad_record: str, process_index: int = 0, process_count: int = 1,
               images: bool = True):
    if on_bad_record not in ON_BAD_RECORD:
      raise ValueError(f'data.on_bad_record={on_bad_record!r} is not one of {ON_BAD_RECORD}.')
    self.source, self.transform = source, transform
    self.seed, self.global_batch_size = seed, global_batch_size
    self.part = process_slice(global_batch_size, process_index, process_count)
    self.on_bad_record = on_bad_record
    # False: batches carry the records' cached latents instead of images (nothing is decoded).
    self.images = images
    self.num_examples = len(source)
    global_batch_indices(seed, 0, global_batch_size, self.num_examples)  # Validates eagerly.

  def example(self, position: int, index: int | None = None, *,
              shape: tuple[int, int] | None = None,
              candidate: Callable[[int], int] | None = None) -> dict[str, Any]:
    """The example filling stream `position` (whose record is `index`, if known): its record, or
    the next usable one after it. Buckets: `shape` (height, width) to cover, and `candidate`
    (attempt -> the record to try; default: the stream's next ones)."""
    failures, geometry = [], {}
    for attempt in range(MAX_CONSECUTIVE_BAD):
      at = position + attempt
      if candidate is not None:
        index = candidate(attempt)
      elif attempt or index is None:
        index = int(stream_indices(self.seed, np.array([at]), self.num_examples)[0])
      key = f'example {index}'
      try:
        raw = self.source[index]
        key = raw.get('key', key)
        uniforms = lambda: randomness.uniforms((_EXAMPLE_STREAM, self.seed, at), 4)
        if self.images and shape is not None:
          pixels, which, orig_size, offset = self.transform.cover(raw, uniforms, shape)
          geometry = {batch.ORIG_SIZE: np.int32(orig_size), batch.CROP_OFFSET: np.int32(offset)}
        elif self.images:
          pixels, which = self.transform(raw, uniforms)
        else:
          pixels, which = None, self.transform.caption_only(raw, uniforms)
          if raw.get('latent') is None:
            raise DataError(f'{key} has no cached latents, unlike the first record of the '
                            'dataset; run tools.prepare --autoencoder over all of data.path, or '
                            'set autoencoder.cached_latents=False.')
          if shape is not None:
            geometry = _stored_geometry(raw, key, shape)
      except (OSError, images.BadImage) as e:
        reason = str(e) or type(e).__name__
        if self.on_bad_record == 'error':
          raise DataError(f'{key}: {reason} (data.on_bad_record=error; use skip to count and '
                          'skip such records).') from None
        if attempt == 0:  # Counted (and logged) once per epoch: at its own stream position.
          logging.warning('data: skipped %s: %s', key, reason)
        failures.append(f'{key}: {reason}')
        continue
      out = {batch.CAPTION: raw['captions'][which], batch.INDEX: index,
             batch.BAD: int(bool(failures)), **geometry}
      if pixels is not None:
        out[batch.IMAGE] = pixels
      text = raw.get('text')
      if text is not None:
        out.update({name: np.asarray(text[name][which]) for name in batch.EMBEDDINGS})
      latent = raw.get('latent')  # Posterior moments stored by tools.prepare --autoencoder.
      if latent is not None:
        out.update(zip(batch.LATENTS, (np.asarray(latent['mean']), np.asarray(latent['logvar']))))
      return out
    raise DataError(f'{MAX_CONSECUTIVE_BAD} records in a row could not be used (from stream '
                    f'position {position}); the last: {failures[-1]}. Check data.path and '
                    'data.image_size/data.upscale.')

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    positions = int(step) * self.global_batch_size + np.arange(self.part.start, self.part.stop)
    indices = stream_indices(self.seed, positions, self.num_examples)
    return self.collate([self.example(int(p), int(i)) for p, i in zip(positions, indices)])

  def collate(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """This process's batch of its examples (`example`'s), in the keys of data/batch.py."""
    out = {
        batch.CAPTION: np.array([r[batch.CAPTION] for r in rows], dtype=str),
        batch.INDEX: np.array([r[batch.INDEX] for r in rows], np.int64),
        batch.BAD: np.array([r[batch.BAD] for r in rows], np.int32),
    }
    if self.images:
      image = _batch_array((len(rows),) + rows[0][batch.IMAGE].shape, np.float32)
      for j, r in enumerate(rows):  # x / 127.5 - 1 in float32, written in place.
        np.divide(r[batch.IMAGE], np.float32(127.5), out=image[j], dtype=np.float32)
      np.subtract(image, np.float32(1.0), out=image)
      out[batch.IMAGE] = image
    for name in batch.STORED + batch.GEOMETRY:
      if name in rows[0]:
        out[name] = np.stack([r[name] for r in rows])
    return out


def _stored_geometry(raw: dict[str, Any], key: str, shape: tuple[int, int]) -> dict[str, Any]:
  """A bucketed record's ORIG_SIZE and CROP_OFFSET (the centre crop the cached latents were
  encoded from) from its stored size; DataError if its latents are not of the `shape` bucket."""
  stored = raw['latent'].get('image_size')
  if np.ndim(stored) != 1 or tuple(stored) != tuple(shape) or raw.get('size') is None:
    raise DataError(f'{key} holds latents encoded at {stored}, not at the {shape[0]}x{shape[1]} '
                    'bucket data.buckets gives its image; run tools.prepare --autoencoder '
                    '--buckets=... with the run\'s buckets over all of data.path.')
  height, width = (int(v) for v in raw['size'])
  _, _, offset = images.cover_crop(width, height, *shape)
  return {batch.ORIG_SIZE: np.int32((height, width)), batch.CROP_OFFSET: np.int32(offset)}


_IN_WORKER = False  # Set in grain worker processes: batches are built in shared memory there.


def _mark_worker(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  global _IN_WORKER
  _IN_WORKER = True


def _init_worker(log_setup, worker_index: int, worker_count: int) -> None:
  """grain's worker_init_fn: the main process's logging (`iterate`'s `log_setup`: a skipped
  record's warning then looks the same from a worker), then batches in shared memory."""
  if log_setup is not None:
    log_setup()
  _mark_worker(worker_index, worker_count)


def _batch_array(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An empty array; in a grain worker, in shared memory, so the batch crosses without a copy."""
  if _IN_WORKER:
    import grain  # pylint: disable=g-import-not-at-top
    return grain.multiprocessing.SharedMemoryArray(shape, dtype)
  return np.empty(shape, dtype)


def make_loader(cfg, source: Sequence, process_index: int = 0, process_count: int = 1, *,
                images: bool = True) -> BatchLoader:
  """The BatchLoader of `config.data` over `source` (from `sources.make`); `images=False`: the
  batches carry the records' cached latents and no images."""
  transform = Transform(cfg.image_size, cfg.crop, cfg.flip, cfg.upscale)
  return BatchLoader(source, transform, seed=cfg.seed, global_batch_size=cfg.global_batch_size,
                     process_index=process_index, process_count=process_count,
                     on_bad_record=cfg.on_bad_record, images=images)


def make_source(cfg, split: str = 'train') -> Sequence:
  """`sources.make` that refuses a missing split ('test' is accepted for 'eval')."""
  source = sources.make(cfg, 'eval' if split == 'test' else split)
  if source is None:
    raise ValueError(f'data.dataset={cfg.dataset!r} has no {split} split configured '
                     '(set data.eval_path or data.eval_split).')
  return source


class _Batches:
  """Iterator of (step, batch) over a grain iterator; `close()` stops its threads and workers."""

  def __init__(self, grain_iter, start_step: int):
    self._it, self._steps = grain_iter, itertools.count(start_step)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._steps), next(self._it)

  def close(self):
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()
    _flush_shared_memory_deletes()


def _flush_shared_memory_deletes():
  """Waits for grain's background unlinking of consumed worker batches (else: leak warnings)."""
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  cls = shared_memory_array.SharedMemoryArray
  pool = getattr(cls, '_del_thread_pool', None)  # Private in grain 0.2.18 (pinned).
  if pool is not None and hasattr(cls, '_disable_async_del'):
    cls._disable_async_del()  # pylint: disable=protected-access
    pool.close()
    pool.join()


def iterate(loader: BatchLoader, start_step: int, num_steps: int | None = None, *,
            prefetch: int = 0, num_workers: int = 0,
            log_setup: Callable[[], None] | None = None
            ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (step, this process's part of batch `step`) for step = start_step, ... num_steps - 1.

  prefetch: batches prepared ahead (grain threads, or per worker process); 0 = on demand.
  num_workers: grain worker processes (0 = prepare batches in this process).
  log_setup: a picklable function each worker process runs first to log as this process does
  (`runtime.console.worker_logging()`; workers start by spawn, with Python's logging defaults).
  """
  import grain  # pylint: disable=g-import-not-at-top
  if start_step < 0:
    raise ValueError(f'step must be non-negative, got {start_step}.')
  stop = start_step + 2**40 if num_steps is None else max(num_steps, start_step)
  steps = grain.MapDataset.range(start_step, stop).map(loader)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker options are absl flags (defaults are fine).
      flags.FLAGS.mark_as_parsed()
    it = steps.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    # Small arrays (captions, indices) travel pickled; the image batch is built in shared memory.
    it = grain.experimental.WithOptionsIterDataset(
        it, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)),
                        worker_init_fn=functools.partial(_init_worker, log_setup))
  else:
    it = steps.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                 prefetch_buffer_size=prefetch))
  return _Batches(iter(it), start_step)
