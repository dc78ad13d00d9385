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
import re
import shutil

from absl import logging
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


def lock_file(builder: ShapesBenchmark) -> str:
  """DATA_DIR/shapes_benchmark/.prepare-CONFIG.lock: held by whoever builds that config."""
  root = os.path.dirname(os.path.dirname(builder.data_dir))  # DATA_DIR/shapes_benchmark
  return os.path.join(root, f'.prepare-{builder.builder_config.name}.lock')


def prepare(data_dir: str | None, image_size: int = 32, num_train: int = DEFAULT_NUM_TRAIN,
            num_test: int = DEFAULT_NUM_TEST) -> ShapesBenchmark:
  """`make_builder` and generate the data unless it is already there (idempotent).

  Processes preparing the same data_dir at once (sweep members started together, the processes
  of a multi-host run) take turns under a file lock: one writes, the others find it written.
  Whoever holds the lock also removes what a build killed midway left (`_remove_dead_builds`).
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  builder = make_builder(data_dir, image_size, num_train, num_test)
  os.makedirs(os.path.dirname(lock_file(builder)), exist_ok=True)
  with open(lock_file(builder), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      _remove_dead_builds(os.path.dirname(builder.data_dir))
      builder = make_builder(data_dir, image_size, num_train, num_test)  # Sees a finished copy.
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


# TFDS builds DATA_DIR/NAME/CONFIG/VERSION in CONFIG/incomplete.XXXXXX_VERSION (6 random letters
# or digits), renamed on success, deleted on an exception, left behind by a kill -9 or power loss.
_INCOMPLETE = re.compile(r'incomplete\.[A-Z0-9]{6}_.+')


def _remove_dead_builds(config_dir: str) -> None:
  """Deletes TFDS's unfinished build folders in `config_dir` (DATA_DIR/shapes_benchmark/CONFIG).

  Called with the config's lock held, so none of them is being written: every `prepare` builds
  under that lock, and the kernel releases a flock when its holder dies (kill -9 included). This
  relies on the lock working between every process that shares the data dir, as the builds'
  turn-taking already does (a filesystem whose flock is local to one host, shared by several
  hosts, would break both), and on no `tfds build` by hand writing the same config meanwhile.
  """
  if not os.path.isdir(config_dir):
    return
  for name in sorted(os.listdir(config_dir)):
    path = os.path.join(config_dir, name)
    if not _INCOMPLETE.fullmatch(name) or not os.path.isdir(path):
      continue
    try:
      shutil.rmtree(path)
      logging.info('data: removed %s, left by a build of the Shapes data that did not finish.',
                   path)
    except OSError as e:  # Only wasted space: the build below does not need it gone.
      logging.warning('data: could not remove %s, left by an unfinished build (%s); delete it.',
                      path, e)
