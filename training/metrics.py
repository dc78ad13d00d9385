"""What a run reports: clu metrics merged per step, written to TensorBoard event files, the INFO
log and metrics.jsonl (the writers, the progress and profiler hooks and what an evaluator returns are
`runtime/summaries.py`, free of TensorFlow); the parameter overview. Only process 0 writes files;
the others log.
"""

import json
import os
import time

import jax
import numpy as np
from absl import logging
from flax import struct
from clu import metrics, parameter_overview
from PIL import Image

from runtime import summaries
from runtime import workdir as paths
from runtime.summaries import EvalResult, flatten


@struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  grad_norm: metrics.Average.from_output('grad_norm')
  bad_records: metrics.Average.from_output('bad_records')


class JsonlWriter:
  """Scalars as one JSON object per line in WORKDIR/metrics.jsonl (for scripts and sweeps); the
  other writes of a writer (runtime/summaries.py) are not kept here."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._file = open(path, 'a')

  def write_scalars(self, step, scalars):
    self._file.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
                     + '\n')
    self._file.flush()  # Readable while training runs, and nothing lost if the process dies.

  def write_images(self, step, images):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class Reporter:
  """Per-step metric merging, periodic writing, progress, and evaluation results."""

  def __init__(self, workdir: str, settings, *, is_main: bool):
    self.workdir, self.settings, self.is_main = workdir, settings, is_main
    num_steps, log = settings.optim.num_steps, settings.logging
    self.writer = summaries.LogWriter()  # Other processes: log lines only.
    if is_main:
      self.writer = summaries.MultiWriter([
          self.writer, summaries.EventFileWriter(workdir),
          JsonlWriter(paths.metrics(workdir))])
    self.progress = summaries.ReportProgress(
        num_train_steps=num_steps, writer=self.writer,
        every_steps=log.every_steps) if is_main else None
    self.profile = None
    if is_main and log.profile_steps:
      self.profile = summaries.Profile(logdir=workdir, num_steps=log.profile_steps,
                                       first=10)
    self._merged = None
    self._t0 = None
    self._steps_since = 0
    self.history = []  # (step, loss) of every step this run took.
    self.last_eval_step = None
    self.bar = None  # The console's progress bar (process 0), from `start`.
    self.bad_records_total = 0  # Bad records skipped by the loader in this run (data/pipeline.py).

  def start(self, state, step: int):
    if self.is_main:
      logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
          jax.device_get(state.params)))
      if step == 0:
        self.writer.write_hparams(flatten(self.settings.config_record()))
      from runtime import console  # pylint: disable=g-import-not-at-top
      self.bar = console.progress(self.settings.optim.num_steps, 'train', 'step', initial=step,
                                  mininterval=1.0, smoothing=0.1)
    self._t0 = time.time()

  def step(self, step: int, loss: float, grad_norm: float, lr: float, bad_records: int = 0):
    """Merges one step's metrics; writes them every `logging.every_steps`.

    `bad_records`: records the loader skipped to fill this step's global batch (data/pipeline.py).
    """
    update = TrainMetrics.single_from_model_output(loss=np.float32(loss),
                                                   grad_norm=np.float32(grad_norm),
                                                   bad_records=np.int32(bad_records))
    self._merged = update if self._merged is None else self._merged.merge(update)
    self._steps_since += 1
    done = step + 1
    self.history.append((done, loss))
    if self.bar is not None:
      self.bar.update(1)
    if self.progress is not None:
      self.progress(done, time.time())
    if self.profile is not None:
      self.profile(done)
    if (done % self.settings.logging.every_steps == 0
        or done == self.settings.optim.num_steps):
      elapsed = max(time.time() - self._t0, 1e-9)
      computed = self._merged.compute()
      scalars = {f'train/{k}': float(v) for k, v in computed.items() if k != 'bad_records'}
      # Average per step x steps: the number of bad records skipped since the last write.
      self.bad_records_total += int(round(float(computed['bad_records']) * self._steps_since))
      scalars['data/bad_records'] = float(self.bad_records_total)
      steps_per_sec = self._steps_since / elapsed
      scalars.update({'train/learning_rate': lr, 'train/steps_per_sec': steps_per_sec,
                      'train/images_per_sec': steps_per_sec * self.settings.data.global_batch_size})
      self.writer.write_scalars(done, scalars)
      if self.bar is not None:
        self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                             img_s=f'{scalars["train/images_per_sec"]:.0f}', refresh=False)
      self._merged, self._steps_since, self._t0 = None, 0, time.time()

  def write_eval(self, step: int, result: EvalResult):
    """Writes an evaluation's images (also as PNGs in WORKDIR/samples) and scalars."""
    self.last_eval_step = step
    if not self.is_main:
      return
    for name, image in result.images.items():
      path = paths.sample_png(self.workdir, name, step)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(image).save(path)
    if result.images:
      self.writer.write_images(step, {k: v[None] for k, v in result.images.items()})
    if result.scalars:
      self.writer.write_scalars(step, {f'eval/{k}': float(v) for k, v in result.scalars.items()})
    self.writer.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.profile is not None:
      self.profile.stop()  # A run shorter than the profile still leaves its trace.
    self.writer.flush()
    self.writer.close()
