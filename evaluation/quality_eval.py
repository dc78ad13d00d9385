"""Quality metrics during training: `QualityEvaluator(settings)` samples `logging.quality_samples`
images from the validation captions at each evaluation and scores them against
`logging.reference_stats` (FID, KID, CMMD) and their prompts (CLIP score).

The images are split over the processes (process p extracts the features of images p, p + P, ...);
the feature statistics are combined across processes before scoring (evaluation/quality.py).
"""
import time

import jax

from absl import logging

from evaluation import quality, sample_grid
from runtime.summaries import EvalResult
from sampling import generate, images


class QualityEvaluator:
  """FID / KID / CLIP score / CMMD of the run's samples (see the module docstring)."""

  def __init__(self, settings):
    log = settings.logging
    self.num, self.metrics = log.quality_samples, tuple(log.quality_metrics)
    self.extractors = quality.load_extractors(log.inception_path, log.clip_path)
    quality.available(self.extractors, self.metrics, field='logging.quality_metrics')
    self.reference = None
    if any(m in self.metrics for m in ('fid', 'kid', 'cmmd')):
      self.reference = quality.load_reference(
          log.reference_stats, self.extractors.stamp(settings.data.image_size), self.extractors,
          field='logging.reference_stats')
    prompts = sample_grid.data_prompts(settings.data, self.num)
    if not prompts:
      raise ValueError('logging.quality_samples: the data has no captions to sample from.')
    self.prompts = [prompts[i % len(prompts)] for i in range(self.num)]
    self.sampler, self.spec, self.seed = settings.sampler, settings.diffusion, settings.seed
    self.image_size, self.decode_chunk = settings.data.image_size, settings.autoencoder.decode_chunk
    self.batch = log.quality_batch
    self._generator = None

  def __call__(self, step, unet, text_encoder, unet_params, text_params, mesh,
               autoencoder) -> EvalResult:
    del step
    if self._generator is None:
      self._generator = generate.Generator(unet, text_encoder, self.spec, self.image_size, mesh,
                                           autoencoder=autoencoder,
                                           decode_chunk=self.decode_chunk)
    t = time.time()
    features = quality.Features(self.extractors, seed=jax.process_index())
    p, count = jax.process_index(), jax.process_count()
    for start in range(0, self.num, self.batch):
      prompts = self.prompts[start:start + self.batch]
      padded = prompts + prompts[:1] * (self.batch - len(prompts))  # One batch shape.
      out = self._generator(unet_params, text_params, padded, seed=self.seed + start,
                            settings=self.sampler)
      mine = list(range(p, len(prompts), count))
      features.add(images.to_uint8(out[:len(prompts)])[mine], [prompts[i] for i in mine])
    scalars = quality.scores(self.reference, features.gathered(), self.metrics)
    logging.info('Quality of %d samples in %.1fs: %s', self.num, time.time() - t,
                 ', '.join(f'{k} {v:.4g}' for k, v in scalars.items()))
    return EvalResult(images={}, scalars=scalars)


class Evaluators:
  """Several evaluators as one: their images and scalars together."""

  def __init__(self, *evaluators):
    self.evaluators = evaluators

  def __call__(self, *args) -> EvalResult:
    results = [e(*args) for e in self.evaluators]
    return EvalResult({k: v for r in results for k, v in r.images.items()},
                      {k: v for r in results for k, v in r.scalars.items()})


def evaluator_of(settings):
  """The run's evaluator: the sample grid, with the quality metrics when configured."""
  grid = sample_grid.SampleGridEvaluator(settings)
  if not settings.logging.quality_samples:
    return grid
  return Evaluators(grid, QualityEvaluator(settings))



