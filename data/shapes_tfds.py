"""TensorFlow Datasets builder for the Shapes benchmark (everything is generated offline).

Stored as ArrayRecord, so `builder.as_data_source(split)` gives random access to
examples without a TensorFlow graph. Example `index` of split `split` is exactly
`data.shapes.example(split, index, image_size)`.

  builder = make_builder('/tmp/tfds', image_size=32)   # config 's32': 50k train, 1k test
  builder.download_and_prepare()                       # no-op when already prepared
  train = builder.as_data_source('train')              # train[i] -> {'image', 'caption', 'index'}
"""
from __future__ import annotations

import dataclasses
import inspect
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data import shapes

DEFAULT_NUM_TRAIN = 50_000
DEFAULT_NUM_TEST = 1_000


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Image side and number of examples per split."""
  image_size: int = 32
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST


def config_name(image_size: int, num_train: int, num_test: int) -> str:
  """'s32' for the default sizes, else e.g. 's16_train64_test16'."""
  if (num_train, num_test) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST):
    return f's{image_size}'
  return f's{image_size}_train{num_train}_test{num_test}'


def make_config(image_size: int, num_train: int = DEFAULT_NUM_TRAIN,
                num_test: int = DEFAULT_NUM_TEST) -> ShapesConfig:
  """A builder config for any size/count; ValueError names the offending data.* field."""
  shapes.check_sizes(image_size, num_train, num_test)
  return ShapesConfig(
      name=config_name(image_size, int(num_train), int(num_test)),
      description=f'{image_size}x{image_size} scenes, {num_train} train / {num_test} test.',
      image_size=image_size, num_train=int(num_train), num_test=int(num_test))


class ShapesBenchmark(tfds.core.GeneratorBasedBuilder):
  """Procedural captioned scenes of coloured squares, circles and triangles (docs/shapes.md)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [make_config(s) for s in shapes.IMAGE_SIZES]
  DEFAULT_CONFIG_NAME = 's32'

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default needs the `importlib_resources` backport, absent on Python >= 3.9.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
            'caption': tfds.features.Text(),
            'index': np.int64,
        }),
        supervised_keys=('caption', 'image'),
        disable_shuffling=True,  # Keep record i == example i; the pipeline shuffles.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    return {
        'train': self._generate_examples('train', c.num_train),
        'test': self._generate_examples('test', c.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    size = self.builder_config.image_size
    for index in range(num_examples):
      image, text = shapes.example(split, index, size)
      yield index, {'image': image, 'caption': text, 'index': index}


def make_builder(data_dir: str | None, image_size: int = 32,
                 num_train: int = DEFAULT_NUM_TRAIN,
                 num_test: int = DEFAULT_NUM_TEST) -> ShapesBenchmark:
  """The builder for these sizes under `data_dir` ('' or None: the TFDS default directory)."""
  config = make_config(image_size, num_train, num_test)
  if config.name in ShapesBenchmark.builder_configs:  # A predefined config: no custom-config warning.
    config = config.name
  return ShapesBenchmark(data_dir=data_dir or None, config=config)


def prepare(data_dir: str | None, image_size: int = 32, num_train: int = DEFAULT_NUM_TRAIN,
            num_test: int = DEFAULT_NUM_TEST) -> ShapesBenchmark:
  """`make_builder` and generate the data unless it is already there (idempotent).

  Processes preparing the same data_dir at once (sweep members started together, the processes
  of a multi-host run) take turns under a file lock: one writes, the others find it written.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  builder = make_builder(data_dir, image_size, num_train, num_test)
  root = os.path.dirname(os.path.dirname(builder.data_dir))  # DATA_DIR/shapes_benchmark
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'.prepare-{builder.builder_config.name}.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = make_builder(data_dir, image_size, num_train, num_test)  # Sees a finished copy.
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder
