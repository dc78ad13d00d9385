"""Small local TFDS builders for the tests, at module level so that grain worker processes
unpickle a source of one by reference: captions of several images (tools.prepare) and portrait,
square and landscape images (aspect-ratio buckets)."""
import inspect

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SHAPES = ((50, 30), (40, 40), (30, 50))  # MixedAspects (height, width): portrait, square, landscape.


class _Local:
  """What a builder defined here needs besides its features and examples: one 'train' split."""
  VERSION = tfds.core.Version('1.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(cls))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}


class TinyCaptions(_Local, tfds.core.GeneratorBasedBuilder):
  """Three images of different sizes with one or two captions (COCO-like features)."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        'captions': tfds.features.Sequence({'text': tfds.features.Text()})}),
        disable_shuffling=True)

  def _generate_examples(self):
    for i in range(3):
      image = np.full((8 + 4 * i, 6, 3), 40 * i, np.uint8)
      yield i, {'image': image, 'captions': {'text': [f'caption {i}'] * (1 + i % 2)}}


class MixedAspects(_Local, tfds.core.GeneratorBasedBuilder):
  """12 random uint8 images, SHAPES in turn, each captioned 'picture i'."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        'caption': tfds.features.Text()}), disable_shuffling=True)

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(12):
      yield i, {'image': rng.integers(0, 255, SHAPES[i % 3] + (3,), np.uint8),
                'caption': f'picture {i}'}


def build(builder, data_dir: str) -> None:
  """Prepares `builder` (a class of this module) as ArrayRecord in `data_dir`, offline."""
  builder(data_dir=data_dir, file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
