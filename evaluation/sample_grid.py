"""Evaluation during training: sample the eval prompts, draw captioned grid pages, score Shapes.

`SampleGridEvaluator(settings)` is what `train.py` hands to the training loop; the loop calls it
with the current (EMA or raw, per `sampler.use_ema`) parameters at `logging.eval_every_steps`
and at the end, and writes what it returns. It samples with the config's `SamplerSettings`,
the same value `sample.py` starts from, at `data.image_size` ('grid'); with aspect-ratio buckets
also at the non-square bucket most of the data goes to ('grid_48x80'; data/buckets.py).
"""

import os
import time

from absl import logging

from data import buckets, sources
from evaluation import shapes_scorer
from models import family
from runtime.settings import EVAL_PROMPT_SOURCES
from runtime.summaries import EvalResult, flatten
from sampling import generate, images


def eval_prompts(settings) -> list[str]:
  """The prompts of the eval grid (at most logging.eval_max_prompts), from the config or the data.

  logging.eval_prompt_list, when not empty; else logging.eval_prompts: 'shapes_benchmark', 'data'
  (the first caption of the first records of the validation split, or of the train split when
  none is configured), or a text file with one prompt per line.
  """
  log = settings.logging
  limit = log.eval_max_prompts
  if log.eval_prompt_list:
    return [str(p) for p in log.eval_prompt_list][:limit]
  source = log.eval_prompts
  shapes_benchmark, data = EVAL_PROMPT_SOURCES
  if source == shapes_benchmark:
    prompts = shapes_scorer.benchmark_prompts()
  elif source == data:
    prompts = data_prompts(settings.data, limit)
  else:
    if not os.path.isfile(source):
      raise FileNotFoundError(f"logging.eval_prompts={source!r}: no such file (one prompt per "
                              "line); or use 'data' or 'shapes_benchmark'.")
    with open(source) as f:
      prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f'logging.eval_prompts={source!r} gave no prompts.')
  return prompts[:limit]


def data_prompts(data, limit: int) -> list[str]:
  dataset = sources.make(data, 'eval') or sources.make(data, 'train')
  prompts = []
  for i in range(len(dataset)):
    if len(prompts) >= limit:
      break
    try:
      captions = dataset.captions(i)
    except OSError:
      continue
    if captions:
      prompts.append(captions[0])
  return prompts


class SampleGridEvaluator:
  """Samples `logging.eval_prompts` x `eval_samples_per_prompt`; scores them on Shapes data."""

  def __init__(self, settings):
    """`settings`: the run's (`configs.specs.Settings`)."""
    self.settings = settings.sampler
    self.spec = settings.diffusion
    self.image_size = settings.data.image_size
    self.seed = settings.seed
    self.prompts = eval_prompts(settings)  # Read now: a missing file fails before training.
    self.per_prompt = settings.logging.eval_samples_per_prompt
    self.score = settings.data.dataset.startswith('shapes')
    self.decode_chunk = settings.autoencoder.decode_chunk
    self.data, self.model = settings.data, settings.model
    self._generators = None  # Grid name -> its Generator, made at the first call.

  def _sizes(self, autoencoder) -> dict[str, int | tuple[int, int]]:
    """Grid name -> the size it samples at: the square, and with buckets the most common other."""
    sizes = {'grid': self.image_size}
    if self.data.bucketed:
      source = sources.make(self.data, 'eval') or sources.make(self.data, 'train')
      vae_factor = 1 if autoencoder is None else autoencoder.config.downsample_factor
      shape = buckets.common_shape(self.data, source, family.size_step(self.model, vae_factor))
      if shape is not None:
        sizes[f'grid_{shape[0]}x{shape[1]}'] = shape
    return sizes

  def __call__(self, step, unet, text_encoder, unet_params, text_params, mesh,
               autoencoder) -> EvalResult:
    del step
    if self._generators is None:  # Latent diffusion: the run's autoencoder decodes the samples.
      self._generators = {
          name: generate.Generator(unet, text_encoder, self.spec, size, mesh,
                                   autoencoder=autoencoder, decode_chunk=self.decode_chunk)
          for name, size in self._sizes(autoencoder).items()}
    batch = [p for p in self.prompts for _ in range(self.per_prompt)]
    grids, scalars = {}, {}
    for name, generator in self._generators.items():
      t = time.time()
      out = generator(unet_params, text_params, batch, seed=self.seed, settings=self.settings)
      logging.info('Sampled %d eval images at %s in %.1fs.', len(batch), generator.image_size,
                   time.time() - t)
      imgs = images.to_uint8(out)
      pages = images.captioned_pages(imgs, self.prompts, self.per_prompt)
      # TensorBoard and samples/: grid, grid_2, ... (and grid_48x80, grid_48x80_2, ...).
      grids.update(zip(images.page_names(name, len(pages)), pages))
      if self.score and name == 'grid':
        summary = shapes_scorer.aggregate(
            [shapes_scorer.score_image(img, p) for img, p in zip(imgs, batch)], batch)
        scalars = {k: float(v) for k, v in flatten(summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return EvalResult(images=grids, scalars=scalars)
