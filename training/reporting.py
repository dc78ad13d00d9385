"""What a run reports: clu metrics and writers (TensorBoard + console), progress with ETA,
the parameter overview, and at eval time a captioned sample grid (image summary + PNG)
scored against the Shapes benchmark. Only process 0 writes.
"""

import json
import logging as pylogging
import os
import time

import jax
import numpy as np
from absl import logging
from flax import struct
from clu import metric_writers, metrics, parameter_overview, periodic_actions

from sampling import generate, images


@struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  grad_norm: metrics.Average.from_output('grad_norm')


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax and TFDS (their warnings and errors still show)."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/etils/')

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs():
  """Keeps the console to our own progress lines; call once from an entry point."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def eval_prompts(config) -> list[str]:
  """The prompts of the eval grid: the Shapes benchmark set, or one per line of a file."""
  source = config.logging.eval_prompts
  if source == 'shapes_benchmark':
    from data import scoring
    prompts = scoring.benchmark_prompts()
  else:
    if not os.path.isfile(source):
      raise FileNotFoundError(f'logging.eval_prompts={source!r}: no such file (one prompt per line).')
    with open(source) as f:
      prompts = [line.strip() for line in f if line.strip()]
  return prompts[:config.logging.eval_max_prompts]


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as one JSON object per line in WORKDIR/metrics.jsonl (for scripts and sweeps)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._file = open(path, 'a')

  def write_scalars(self, step, scalars):
    self._file.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
                     + '\n')
    self._file.flush()  # Readable while training runs, and nothing lost if the process dies.

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class Reporter:
  """Per-step metric merging, periodic writing, progress, and eval grids."""

  def __init__(self, workdir: str, config, *, is_main: bool):
    self.workdir, self.config, self.is_main = workdir, config, is_main
    writers = [metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                    asynchronous=False)]
    if is_main:
      writers.append(JsonlWriter(os.path.join(workdir, 'metrics.jsonl')))
    self.writer = metric_writers.AsyncMultiWriter(writers) if is_main else writers[0]
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=config.optim.num_steps, writer=self.writer,
        every_steps=config.logging.every_steps) if is_main else None
    self.profile = None
    if is_main and config.logging.profile_steps:
      self.profile = periodic_actions.Profile(num_profile_steps=config.logging.profile_steps,
                                              first_profile=10, logdir=workdir)
    self._merged = None
    self._t0 = None
    self._steps_since = 0
    self._generator = None
    self.history = []  # (step, loss) of every step this run took.
    self.last_eval_step = None

  def start(self, state, step: int):
    if self.is_main:
      logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
          jax.device_get(state.params)))
      if step == 0:
        self.writer.write_hparams(_flatten(self.config.to_dict()))
    self._t0 = time.time()

  def step(self, step: int, loss: float, grad_norm: float, lr: float):
    """Merges one step's metrics; writes them every `logging.every_steps`."""
    update = TrainMetrics.single_from_model_output(loss=np.float32(loss),
                                                   grad_norm=np.float32(grad_norm))
    self._merged = update if self._merged is None else self._merged.merge(update)
    self._steps_since += 1
    done = step + 1
    self.history.append((done, loss))
    if self.progress is not None:
      self.progress(done, time.time())
    if self.profile is not None:
      self.profile(done)
    if done % self.config.logging.every_steps == 0 or done == self.config.optim.num_steps:
      elapsed = max(time.time() - self._t0, 1e-9)
      scalars = {f'train/{k}': float(v) for k, v in self._merged.compute().items()}
      steps_per_sec = self._steps_since / elapsed
      scalars.update({'train/learning_rate': lr, 'train/steps_per_sec': steps_per_sec,
                      'train/images_per_sec': steps_per_sec * self.config.data.global_batch_size})
      self.writer.write_scalars(done, scalars)
      self._merged, self._steps_since, self._t0 = None, 0, time.time()

  def evaluate(self, step: int, state, unet, text_encoder, frozen_text, mesh):
    """Samples the eval prompts with the (EMA) params, writes the grid, scores Shapes prompts."""
    cfg = self.config
    self.last_eval_step = step
    if self._generator is None:
      self._generator = generate.Generator(unet, text_encoder, cfg, mesh)
    params = state.ema_params if cfg.sampler.use_ema else state.params
    text_params = params['text'] if text_encoder.trainable else frozen_text
    prompts = eval_prompts(cfg)
    per = cfg.logging.eval_samples_per_prompt
    batch = [p for p in prompts for _ in range(per)]
    t = time.time()
    sampler = cfg.sampler
    out = self._generator(params['unet'], text_params, batch, seed=cfg.seed, sampler=sampler.name,
                          num_steps=sampler.num_steps, guidance_scale=sampler.guidance_scale,
                          eta=generate.config_eta(sampler, sampler.name),
                          guidance_rescale=sampler.guidance_rescale)
    logging.info('Sampled %d eval images in %.1fs.', len(batch), time.time() - t)
    if not self.is_main:
      return
    imgs = images.to_uint8(out)
    grid = images.captioned_grid(imgs, prompts, per)
    images.save_png(grid, os.path.join(self.workdir, 'samples', f'grid_{step:07d}.png'))
    self.writer.write_images(step, {'samples': grid[None]})
    if cfg.data.dataset == 'shapes':
      from data import scoring
      scored = [scoring.score_image(img, p) for img, p in zip(imgs, batch)]
      summary = scoring.aggregate(scored, batch)
      scalars = {f'eval/{k}': float(v) for k, v in _flatten(summary).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
      self.writer.write_scalars(step, scalars)
    self.writer.flush()

  def close(self):
    self.writer.flush()
    self.writer.close()


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
