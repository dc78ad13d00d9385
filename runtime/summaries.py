"""What a run writes as it trains, without TensorFlow: TensorBoard event files, the scalar lines of
the INFO log, the progress report (steps/s, ETA), the profiler hook, and what an evaluator hands
the run to write (`EvalResult`).

An event file is a sequence of `Event` protos in TFRecord framing. We build the protos from
`tensorboard.compat.proto` and frame them with tensorboard's `RecordWriter`, both pure Python.
(tensorboard's own `EventFileWriter` opens its file through `tf.io.gfile`, which imports TensorFlow
whenever it is installed; so the file and the thread that writes it are ours.)
"""

import io
import itertools
import os
import queue
import socket
import threading
import time
from typing import Mapping, NamedTuple, Protocol

import jax
import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

_file_ids = itertools.count()  # Two writers in one process and second get distinct file names.


class EventFileWriter:
  """Scalars, images and hparams as a TensorBoard event file in `logdir`.

  A write call builds and serialises the event and queues it; a thread writes the queue to disk
  (and flushes the file whenever the queue runs empty), so the training loop never waits on the
  disk. `flush()` returns once everything queued is on disk. An error of the writing thread (a
  full disk) is raised by the next call.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f'events.out.tfevents.{int(time.time()):010d}.'
                             f'{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}')
    self._records = RecordWriter(open(self.path, 'wb'))
    self._queue = queue.Queue()  # Serialised events; None stops the thread.
    self._error = None
    self._closed = False
    self._thread = threading.Thread(target=self._drain, name='EventFileWriter', daemon=True)
    self._thread.start()
    self._add(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    self._add_values(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                            for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """`images`: name -> [N, H, W, C] or [H, W, C], uint8 (or float in [0, 1]); C is 1, 3 or 4.
    One image is written under its name, several as name/0, name/1, ..."""
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      batch = batch[None] if batch.ndim == 3 else batch
      for i, image in enumerate(batch):
        values.append(summary_pb2.Summary.Value(tag=tag if len(batch) == 1 else f'{tag}/{i}',
                                                image=_png(image)))
    self._add_values(step, values)

  def write_hparams(self, hparams: Mapping[str, object]):
    """A flat dict of numbers, strings and bools (anything else is written as its str), at step 0:
    the hparams plugin's session-start record, as clu wrote it."""
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
               for k, v in hparams.items()}
    self._add(event_pb2.Event(wall_time=time.time(), step=0,
                              summary=hparams_summary.hparams_pb(hparams)))

  def flush(self):
    self._raise_error()
    if not self._closed:
      self._queue.join()
      self._records.flush()
    self._raise_error()

  def close(self):
    if self._closed:
      return
    self._closed = True
    self._queue.put(None)
    self._thread.join()
    self._records.close()
    self._raise_error()

  def _add_values(self, step, values):
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))

  def _add(self, event):
    self._raise_error()
    if self._closed:
      raise ValueError(f'{self.path} was closed; nothing more can be written to it.')
    self._queue.put(event.SerializeToString())

  def _drain(self):
    while True:
      record = self._queue.get()
      try:
        if record is None:
          return
        if self._error is None:
          self._records.write(record)
          if self._queue.empty():
            self._records.flush()  # TensorBoard sees each write soon; writes are seconds apart.
      except Exception as e:  # pylint: disable=broad-except
        self._error = e
      finally:
        self._queue.task_done()

  def _raise_error(self):
    if self._error is not None:
      raise OSError(f'writing {self.path} failed: {self._error}') from self._error


def _png(image: np.ndarray) -> summary_pb2.Summary.Image:
  if image.dtype != np.uint8:  # Floats in [0, 1], as tf.summary.image takes them.
    image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  image = image[..., None] if image.ndim == 2 else image
  height, width, channels = image.shape
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format='PNG')
  return summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                   encoded_image_string=buffer.getvalue())


class LogWriter:
  """The same writes as INFO log lines (WORKDIR/train.log): `[step] name=value, ...`, names sorted,
  floats to 6 significant digits (clu's LoggingWriter format, which train.log readers grep)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}'
                                            for k, v in sorted(scalars.items())))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    logging.info('[%d] Got images: %s.', step, {k: np.shape(v) for k, v in images.items()})

  def write_hparams(self, hparams: Mapping[str, object]):
    logging.info('[Hyperparameters] %s', dict(hparams))

  def flush(self):
    logging.flush()

  def close(self):
    self.flush()


class MultiWriter:
  """Every write to each of `writers`, in order."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams: Mapping[str, object]):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


class ReportProgress:
  """Called after every step with the number of steps done. At every `every_steps`-th step, when
  `every_secs` passed since the last report, and at the last step, it writes `steps_per_sec` (since
  the last report) and `uptime` (seconds since it was made) as two scalar rows, and logs
  "2.0 steps/s, 50.0% (2/4), ETA: 0m". The first call only records its step and time."""

  def __init__(self, *, num_train_steps: int, writer, every_steps: int,
               every_secs: float = 60.0):
    self.num_train_steps, self.writer = num_train_steps, writer
    self.every_steps, self.every_secs = every_steps, every_secs
    self._t0 = time.monotonic()
    self._last = None  # (step, time) of the last report, or of the first call.

  def __call__(self, step: int, t: float | None = None) -> bool:
    """Returns whether it reported. `t`: now (default: time.monotonic())."""
    t = time.monotonic() if t is None else t
    if self._last is None:
      self._last = (step, t)
      return False
    last_step, last_t = self._last
    due = ((self.every_steps and step % self.every_steps == 0)
           or t - last_t > self.every_secs or step == self.num_train_steps)
    if step == last_step or not due:
      return False
    steps_per_sec = (step - last_step) / max(t - last_t, 1e-9)
    eta = (self.num_train_steps - step) / steps_per_sec
    logging.info('%.1f steps/s, %.1f%% (%d/%d), ETA: %s', steps_per_sec,
                 100 * step / self.num_train_steps, step, self.num_train_steps, format_secs(eta))
    self.writer.write_scalars(step, {'steps_per_sec': steps_per_sec})
    self.writer.write_scalars(step, {'uptime': time.monotonic() - self._t0})
    self._last = (step, t)
    return True


def format_secs(secs: float) -> str:
  """123456.7 -> '1d10h17m' (days and hours only when not zero; minutes always)."""
  days, rest = divmod(int(secs) // 60, 24 * 60)
  hours, minutes = divmod(rest, 60)
  return (f'{days}d' if days else '') + (f'{hours}h' if hours else '') + f'{minutes}m'


class Profile:
  """A jax.profiler trace of the `num_steps` steps after step `first`, into `logdir` (TensorBoard's
  profile tab reads LOGDIR/plugins/profile/). Called after every step with the steps done."""

  def __init__(self, *, logdir: str, num_steps: int, first: int = 10):
    self.logdir, self.num_steps, self.first = logdir, num_steps, first
    self._started = None  # The step the running trace started at.

  def __call__(self, step: int):
    if step == self.first and self._started is None:
      try:
        jax.profiler.start_trace(self.logdir)
        self._started = step
      except Exception as e:  # pylint: disable=broad-except
        logging.exception('Could not start profiling: %s', e)  # A profile never stops a run.
    elif self._started is not None and step >= self._started + self.num_steps:
      self.stop(step)

  def stop(self, step: int | None = None):
    """Ends a running trace (at the run's end, one that has not had its steps yet)."""
    if self._started is None:
      return
    jax.profiler.stop_trace()
    logging.info('Profiled steps %d to %s into %s', self._started + 1,
                 step if step is not None else 'the end', os.path.join(self.logdir, 'plugins',
                                                                       'profile'))
    self._started = None


class EvalResult(NamedTuple):
  """What an evaluation gives the run to report."""
  images: dict  # name -> uint8 [H, W, 3], written as a summary and as samples/<name>_<step>.png.
  scalars: dict  # name -> float, written as eval/<name>.


class Evaluator(Protocol):
  """Evaluation during training, handed to the loop (train.py passes the standard one)."""

  def __call__(self, step: int, unet, text_encoder, unet_params, text_params, mesh,
               autoencoder) -> EvalResult:
    """`autoencoder`: the run's frozen VAE (latent diffusion) or None."""
    ...


def flatten(d, prefix='') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; values that are not numbers, strings or bools become strings."""
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
