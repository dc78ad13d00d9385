"""The training loop, top to bottom: `train(settings, workdir)`.

`train_and_evaluate(config, workdir)` makes the config typed settings once
(`configs.validation.validate`); below that line nothing sees a ConfigDict. `training.builder.build_trainer` makes the networks, the optimiser,
the sharded state and the jitted `train_step(state, batch, rng) -> (state, metrics)`
(training/step.py: pure, its randomness `fold_in(rng, step)`). The batch at step s is a pure
function of (data.seed, s), so a resumed run replays exactly what an uninterrupted one does.
Evaluation is handed in as an `Evaluator` (train.py passes
`evaluation.sample_grid.SampleGridEvaluator`).
"""

import signal
import threading
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from cluster import distributed
from configs import validation
from data import batch as batch_keys
from data import buckets, pipeline, sources
from models import lora
from runtime import checkpoint, compile_cache, console, sharding
from runtime.summaries import EvalResult, Evaluator
from training import builder, metrics
from training import validation as validation_lib


class TrainResult(NamedTuple):
  state: Any  # The final TrainState.
  history: list  # (step, loss) for every step this run took, as process 0 saw them.


class NonFiniteError(FloatingPointError):
  """Raised when the loss or gradient norm stops being finite."""


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> TrainResult:
  """`train` with the settings of `config`, checked (`configs.validation.validate`)."""
  return train(validation.validate(config), workdir, **kwargs)


def train(settings, workdir: str, *, evaluator: Evaluator | None = None, devices=None,
          stop_at: int | None = None) -> TrainResult:
  """Trains per `settings` (`configs.specs.Settings`), writing checkpoints, metrics and
  evaluations to `workdir`.

  `evaluator` runs at `logging.eval_every_steps` and at the end (`logging.eval_at_end`), with
  the validation loss (`logging.val_examples`); None: the validation loss alone, if any. `devices` restricts the mesh to some devices (tests); `stop_at` ends the run
  early at that step, as a pre-emption would (the schedule still targets `optim.num_steps`).
  """
  distributed.initialize(settings.distributed)
  mesh = sharding.make_mesh(settings.mesh, devices)
  validation.check_mesh(settings, mesh, jax.process_count())
  writer = metrics.Reporter(workdir, settings, is_main=jax.process_index() == 0)
  logging.info('Mesh %s over %d devices, %d processes.', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  source = sources.make(settings.data, 'train')
  _ensure_tokenizer(settings, workdir, source)
  trainer = builder.build_trainer(settings, mesh, source=source, workdir=workdir)
  ckpt = checkpoint.Checkpointer(workdir, settings.checkpoint)
  guard = checkpoint.DivergenceGuard(settings.checkpoint.divergence_factor,
                                     settings.checkpoint.divergence_window)
  target = checkpoint.abstract_with_shardings(trainer.abstract, trainer.shardings)
  record = dict(settings.config_record(), **{checkpoint.FROZEN_KEY: trainer.frozen})

  def restore(step):
    checkpoint.check_compatible(ckpt.saved_config(step), record, ckpt.directory)
    return ckpt.restore(target, step)

  resumed = ckpt.restore_latest_intact(restore)  # A damaged newest one: the one before it.
  if resumed is not None:
    (state, position), _ = resumed
    logging.info('Resumed from step %d in %s.', int(state.step), ckpt.directory)
  else:
    with compile_cache.gc_paused():  # Traces and compiles the initialiser.
      state = trainer.init(jax.random.PRNGKey(settings.seed))
    position = {'step': 0}
  start_step = int(position['step'])
  rng = jax.random.PRNGKey(settings.seed)
  loader = _make_loader(settings, source, trainer)
  if settings.data.bucketed and start_step < settings.optim.num_steps:  # Before the steps' bar.
    _compile_buckets(settings, trainer, loader, state, rng, mesh, start_step)
  writer.start(state, start_step)

  val_loss = validation_lib.make(settings, trainer, mesh, source)
  evaluates = evaluator is not None or val_loss is not None

  def evaluate(step, state):
    weights = lora.combine(state.ema_params if settings.sampler.use_ema else state.params,
                           trainer.frozen_weights)
    result = (EvalResult({}, {}) if evaluator is None else
              evaluator(step, trainer.unet, trainer.text_encoder, weights['unet'],
                        weights.get('text'), mesh, trainer.autoencoder))
    if val_loss is not None:  # The EMA weights, whatever the grid samples with.
      result.scalars.update(val_loss(lora.combine(state.ema_params, trainer.frozen_weights)))
    return result

  def save(step, state, force=False):
    ckpt.save(step, state, record, {'step': step, 'seed': settings.data.seed}, force=force)

  num_steps, data = settings.optim.num_steps, settings.data
  batches = pipeline.iterate(loader, start_step, num_steps, prefetch=data.prefetch,
                             num_workers=data.num_workers, log_setup=console.worker_logging())
  pending = None  # The previous step's metrics, read while the current step runs.
  step = start_step
  # SIGTERM (pre-emption, scancel, kubectl delete): save, then exit. With several processes,
  # jax's pre-emption service catches the signal and orbax agrees on the step across processes.
  stop = _StopOnSignal(enabled=jax.process_count() == 1)
  try:
    for step, local in batches:
      if step >= num_steps or (stop_at is not None and step >= stop_at):
        break
      if stop.requested or ckpt.reached_preemption(step):
        if pending is not None:
          _record(writer, guard, *pending)
          pending = None
        if step > start_step and step not in ckpt.all_steps() and _may_save(guard, step, ckpt):
          save(step, state, force=True)
        logging.warning('Stopping at step %d on request; the checkpoint is saved.', step)
        break
      local = _step_inputs(trainer, local)
      # The first call traces (or loads the trace of) and compiles the step; the others only
      # dispatch it.
      with (jax.set_mesh(mesh), nn.logical_axis_rules(settings.mesh.logical_axis_rules),
            compile_cache.gc_paused()):
        state, step_metrics = trainer.step(state, sharding.global_batch(mesh, local), rng,
                                           trainer.frozen_weights, trainer.vae_params)
      if pending is not None:
        _record(writer, guard, *pending)
      pending = (step, step_metrics, float(trainer.lr_schedule(step)))
      done = step + 1
      if done % settings.checkpoint.every_steps == 0 or done == num_steps:
        _record(writer, guard, *pending)  # Never save a state whose last step was not finite.
        pending = None
        if _may_save(guard, done, ckpt):
          save(done, state)
      if (evaluates and settings.logging.eval_every_steps
          and done % settings.logging.eval_every_steps == 0):
        writer.write_eval(done, evaluate(done, state))
    if pending is not None:
      _record(writer, guard, *pending)
    logging.info('Divergence guard: the largest loss, gradient norm and parameter norm seen were '
                 '%.3g, %.3g and %.3g x their trailing medians.', *guard.max_ratios)
    final_step = int(jax.device_get(state.step))
    if (evaluates and settings.logging.eval_at_end and final_step == num_steps
        and final_step not in (writer.last_eval_step, start_step)):
      writer.write_eval(final_step, evaluate(final_step, state))
  finally:
    stop.restore()
    ckpt.close()  # Waits for async saves: nothing written is lost on the way out.
    writer.close()
    if hasattr(batches, 'close'):
      batches.close()
  return TrainResult(state, writer.history)


def _make_loader(settings, source, trainer):
  """This process's loader: square crops, or aspect-ratio buckets, whose shapes each compile the
  train step once (data/buckets.py); either of images or of the records' cached latents (their
  buckets checked against data.buckets by `builder.build_trainer`)."""
  images = batch_keys.IMAGE in trainer.image_keys  # False: cached latents, nothing is decoded.
  if not settings.data.bucketed:
    return pipeline.make_loader(settings.data, source, jax.process_index(), jax.process_count(),
                                images=images)
  return buckets.make_loader(settings.data, source, validation.size_step(settings),
                             jax.process_index(), jax.process_count(), images=images)


def _step_inputs(trainer, local):
  """What the train step takes of a loader batch: the bad-record flags, the text inputs of its
  captions and the images (or cached latents)."""
  return {batch_keys.BAD: local[batch_keys.BAD], **trainer.text_inputs(local),
          **{k: local[k] for k in trainer.image_keys}}


def _compile_buckets(settings, trainer, loader, state, rng, mesh, start_step):
  """Traces (or loads) and compiles the train step for every bucket shape before the first step,
  on the first batch of each from `start_step` on, with a progress bar and a log line."""
  schedule, first = loader.schedule, {}
  drawn = sum(n > 0 for n in schedule.batches_per_bucket)
  for step in range(start_step, start_step + 2 * schedule.batches_per_epoch):
    first.setdefault(schedule(step)[0], step)
    if len(first) == drawn:
      break
  t0 = time.perf_counter()
  bar = console.progress(len(first), 'compile', 'shape', disable=jax.process_index() != 0)
  with compile_cache.CompileCounter() as counter, bar:
    for step in sorted(first.values()):
      inputs = sharding.global_batch(mesh, _step_inputs(trainer, loader(step)))
      with (jax.set_mesh(mesh), nn.logical_axis_rules(settings.mesh.logical_axis_rules),
            compile_cache.gc_paused()):
        compiled = trainer.step.precompile(state, inputs, rng, trainer.frozen_weights,
                                           trainer.vae_params)
      buckets.check_memory(loader.buckets[schedule(step)[0]], compiled,
                           settings.data.bucket_max_gib)
      bar.update(1)
  logging.info('Buckets: the train step for %d shapes (%s) ready in %.1f s. %s', len(first),
               ', '.join('%dx%d' % loader.buckets[schedule(s)[0]] for s in sorted(first.values())),
               time.perf_counter() - t0, counter.summary())


def _ensure_tokenizer(settings, workdir, source):
  """text.vocab='bpe': process 0 trains WORKDIR/tokenizer.json on a sample of the captions, once."""
  if settings.text.encoder != 'scratch' or settings.text.vocab != 'bpe':
    return
  from text import subword  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    subword.ensure_trained(settings.text, workdir, lambda: sources.caption_sample(source))
  multihost_utils.sync_global_devices('tokenizer_trained')


class _StopOnSignal:
  """Turns SIGTERM into a flag the loop checks between steps (restored on exit)."""

  def __init__(self, enabled: bool = True):
    self.requested = False
    self._previous = None
    if enabled and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _may_save(guard, step, ckpt) -> bool:
  """The divergence guard's verdict on the state after `step` steps, with a warning if it says no."""
  reason = guard.verdict()
  if reason is not None:
    logging.warning('Not saving step %d: %s. The latest checkpoint stays step %s; if this goes on, '
                    'lower optim.learning_rate (checkpoint.divergence_factor=0 turns the guard '
                    'off).', step, reason, max(ckpt.all_steps(), default=None))
  return reason is None


def _record(writer, guard, step, metrics, lr):
  """Checks finiteness (raising NonFiniteError), tells the divergence guard, and merges the step's
  metrics into the report."""
  m = jax.device_get(metrics)
  guard.observe(m['loss'], m['grad_norm'], m['param_norm'])
  if not bool(m['finite']):
    raise NonFiniteError(
        f'Non-finite loss ({float(m["loss"])}) or gradient norm ({float(m["grad_norm"])}) at step '
        f'{step}; the step was not applied and the last checkpoint is intact. Lower '
        'optim.learning_rate, set optim.grad_clip, or use model.dtype=float32.')
  writer.step(step, float(m['loss']), float(m['grad_norm']), lr, int(m['bad_records']))
