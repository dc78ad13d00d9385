"""Per-process batch iterator: a deterministic, resumable stream of shuffled epochs.

The global batch of step `t` is a pure function of (seed, t, global batch size,
dataset size): the stream concatenates epochs, each a permutation drawn from
(seed, epoch), and batch t is stream positions [t*B, (t+1)*B). Process p of P
reads the contiguous slice p of that batch, so a resumed run (start_step = k)
and a run on a different number of processes see exactly the same examples.

  source = make_source(config.data)
  for step, batch in iterate(source, config.data.seed, start_step, config.data.global_batch_size,
                             jax.process_index(), jax.process_count(), config.data.prefetch):
    ...  # batch: {'image': f32 [n,S,S,3] in [-1,1], 'caption': str [n], 'index': i64 [n]}
"""
from __future__ import annotations

import functools
import queue
import threading
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data import shapes

DATASETS = ('shapes', 'shapes_rendered')
_EPOCH_STREAM = 0x4550  # Domain tag of the epoch permutations' random streams.


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in `epoch` (a permutation of range(num_examples)), read-only."""
  perm = np.argsort(shapes.uniforms((_EPOCH_STREAM, seed, epoch), num_examples), kind='stable')
  perm.flags.writeable = False
  return perm


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
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(global_batch_size, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(int(seed), int(epoch), num_examples)[offsets[sel]]
  return out


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


class RenderedShapes(Sequence):
  """Shapes examples rendered on demand, records as TFDS gives them (no TensorFlow needed)."""

  def __init__(self, split: str, image_size: int, num_examples: int):
    shapes.allowed_pairs(split)  # Validates the split name.
    self.split, self.image_size, self.num_examples = split, image_size, num_examples

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range [0, {self.num_examples}).')
    image, text = shapes.example(self.split, int(index), self.image_size)
    return {'image': image, 'caption': text, 'index': int(index)}


class BatchSource:
  """Random access to a dataset's records as model-ready batches."""

  def __init__(self, records: Sequence[Mapping[str, Any]]):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """{'image': float32 [n,S,S,3] in [-1, 1], 'caption': str [n], 'index': int64 [n]}."""
    indices = [int(i) for i in indices]
    getitems = getattr(self.records, '__getitems__', None)
    rows = getitems(indices) if getitems else [self.records[i] for i in indices]
    images = np.stack([np.asarray(r['image']) for r in rows])
    captions = [r['caption'].decode() if isinstance(r['caption'], bytes) else str(r['caption'])
                for r in rows]
    return {
        'image': images.astype(np.float32) / 127.5 - 1.0,
        'caption': np.array(captions, dtype=str),
        'index': np.array([r['index'] for r in rows], np.int64),
    }


def make_source(cfg, split: str = 'train') -> BatchSource:
  """The BatchSource of `split` for `config.data`; 'shapes' prepares TFDS data in cfg.data_dir once.

  'shapes_rendered' renders the same examples on demand instead (no TFDS, no files).
  """
  num = {'train': cfg.num_train, 'test': cfg.num_test}.get(split)
  if num is None:
    raise ValueError(f"Unknown split {split!r}: use 'train' or 'test'.")
  if cfg.dataset == 'shapes':
    from data import shapes_tfds  # pylint: disable=g-import-not-at-top  (TensorFlow is heavy)
    builder = shapes_tfds.prepare(cfg.data_dir, cfg.image_size, cfg.num_train, cfg.num_test)
    return BatchSource(builder.as_data_source(split))
  if cfg.dataset == 'shapes_rendered':
    shapes.check_sizes(cfg.image_size, cfg.num_train, cfg.num_test)
    return BatchSource(RenderedShapes(split, cfg.image_size, num))
  raise ValueError(f'Unknown data.dataset {cfg.dataset!r}: use one of {DATASETS}.')


def _local_batches(source: BatchSource, seed: int, start_step: int, global_batch_size: int,
                   part: slice) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  step = start_step
  while True:
    indices = global_batch_indices(seed, step, global_batch_size, len(source))[part]
    yield step, source.get_batch(indices)
    step += 1


def _prefetched(it: Iterator[Any], size: int) -> Iterator[Any]:
  """Runs `it` in a daemon thread, `size` items ahead; re-raises its errors; stops when closed."""
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(entry) -> bool:  # False once the consumer has stopped.
    while not stop.is_set():
      try:
        buffer.put(entry, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in it:
        if not put((item, None)):
          return
    except Exception as e:  # pylint: disable=broad-except  (handed to the consumer)
      put((done, e))
      return
    put((done, None))

  thread = threading.Thread(target=produce, name='batch-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      item, error = buffer.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()
    thread.join(timeout=5)


def iterate(source: BatchSource, seed: int, start_step: int, global_batch_size: int,
            process_index: int = 0, process_count: int = 1,
            prefetch: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (step, this process's part of batch `step`) for step = start_step, start_step+1, ...

  prefetch > 0 prepares that many batches ahead in a background thread.
  """
  part = process_slice(global_batch_size, process_index, process_count)
  global_batch_indices(seed, start_step, global_batch_size, len(source))  # Validate eagerly.
  batches = _local_batches(source, seed, start_step, global_batch_size, part)
  return _prefetched(batches, prefetch) if prefetch > 0 else batches
