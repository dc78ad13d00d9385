"""The `config.data` section as a typed, frozen, checked value, and the choices it allows.

`configs.specs.build` makes it once; `data.sources.make`, `data.pipeline.make_loader`, the eval
grid's prompts and the offline tools read its attributes and never see a ConfigDict. It has no
defaults of its own (configs/base.py holds them) and refuses a bad value naming `data.field`.
"""
from __future__ import annotations

import dataclasses

DATASETS = ('shapes', 'shapes_rendered', 'folder', 'tfds', 'array_record')  # data.dataset
CROPS = ('center', 'random')  # data.crop
ON_BAD_RECORD = ('skip', 'error')  # data.on_bad_record


def check_choice(name: str, value, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f'data.{name}={value!r} is not one of {choices}.')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the examples come from, how they become training images, and how they are batched."""
  dataset: str
  path: str
  eval_path: str
  tfds_name: str
  train_split: str
  eval_split: str
  image_key: str
  caption_key: str
  image_size: int
  allow_other_sample_size: bool
  crop: str
  flip: bool
  upscale: bool
  on_bad_record: str
  num_train: int
  num_test: int
  data_dir: str
  seed: int
  global_batch_size: int
  buckets: tuple
  bucket_max_aspect: float
  bucket_max_gib: float
  num_workers: int
  prefetch: int

  def __post_init__(self):
    check_choice('dataset', self.dataset, DATASETS)
    check_choice('crop', self.crop, CROPS)
    check_choice('on_bad_record', self.on_bad_record, ON_BAD_RECORD)
    for name in ('image_size', 'global_batch_size', 'num_train'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'data.{name}={value!r} must be positive.')
    if self.bucket_max_aspect and self.bucket_max_aspect < 1:
      raise ValueError(f'data.bucket_max_aspect={self.bucket_max_aspect!r} must be >= 1 (or 0: '
                       'off).')
    if self.bucket_max_gib < 0:
      raise ValueError(f'data.bucket_max_gib={self.bucket_max_gib!r} must be >= 0 (0: not '
                       'checked).')
    if self.num_workers < 0 or self.prefetch < 0:
      raise ValueError('data.num_workers and data.prefetch must be >= 0.')

  @property
  def bucketed(self) -> bool:
    """Whether batches come from aspect-ratio buckets (data/buckets.py), not square crops."""
    return bool(self.buckets) or bool(self.bucket_max_aspect)

  def replace(self, **changes) -> DataSpec:
    return dataclasses.replace(self, **changes)
