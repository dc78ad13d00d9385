"""The training loop, top to bottom: helpers, `train_step`, `train_and_evaluate`.

`train_step(state, batch, rng) -> (state, metrics)` is pure and jitted with explicit
shardings over the ('data', 'fsdp', 'tensor') mesh, with the state donated. Its
randomness is `fold_in(rng, step)`, and the batch at step s is a pure function of
(data.seed, s), so a resumed run replays exactly what an uninterrupted one does. The state,
models and optimiser are built in `training/state.py`; evaluation is handed in as an
`Evaluator` (train.py passes `evaluation.sample_grid.SampleGridEvaluator`).
"""

import functools
import signal
import threading
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from cluster import distributed
from configs import specs, validation
from data import pipeline, sources
from data.sources import DataError
from diffusion import losses
from models import denoiser
from training import checkpoint, compile_cache, metrics, sharding, state as state_lib
from training import trace_cache
from training import text_inputs as text_inputs_lib
from training.state import TrainState


_LATENT_STREAM = 0x1A7E  # fold_in tag of the posterior samples' randomness.
_TEXT_KEYS = ('tokens', 'emb', 'mask', 'pooled')  # A batch's text inputs (`text_condition`).


class TrainResult(NamedTuple):
  state: Any  # The final TrainState.
  history: list  # (step, loss) for every step this run took, as process 0 saw them.


class NonFiniteError(FloatingPointError):
  """Raised when the loss or gradient norm stops being finite."""


# ----------------------------------------------------------------------------- helpers


def ema_decay(cfg, step):
  """EMA decay at `step`; with warmup min(decay, (1+step)/(10+step)) so early averages move."""
  d = jnp.float32(cfg.ema_decay)
  return jnp.minimum(d, (1.0 + step) / (10.0 + step)) if cfg.ema_warmup else d


def text_condition(text_encoder, params, frozen_text_params, inputs):
  """Text embeddings of a batch: encoded from 'tokens', or precomputed ('emb', 'mask', 'pooled')."""
  if 'tokens' not in inputs:
    return {k: inputs[k] for k in ('emb', 'mask', 'pooled')}
  text_params = params['text'] if text_encoder.trainable else frozen_text_params
  emb, mask, pooled = text_encoder.encode(text_params, inputs['tokens'])
  return {'emb': emb, 'mask': mask, 'pooled': pooled}


def drop_condition(cond, null, keep):
  """Classifier-free guidance training: where keep is False, use the null (empty caption) condition."""
  def pick(c, n):
    k = keep.reshape(keep.shape + (1,) * (c.ndim - 1))
    return jnp.where(k, c, n.astype(c.dtype))
  return jax.tree.map(pick, cond, null)


# ----------------------------------------------------------------------------- train step


def diffusion_input(batch, autoencoder, vae_params, rng):
  """What the U-Net denoises: the images, or latents of the frozen autoencoder drawn from its
  posterior (a fresh sample every step)."""
  if autoencoder is None:
    return batch['image']
  if 'latent_mean' in batch:  # Cached by data.prepare --autoencoder (checked at start).
    return autoencoder.to_latents(batch['latent_mean'], batch['latent_logvar'], rng)
  mean, logvar = autoencoder.encode(vae_params, batch['image'])
  return autoencoder.to_latents(mean, logvar, rng)


def micro_batch(a, k, i):
  """Micro-batch i of k of a per-example array: examples i, i + k, i + 2k, ... (strided, so each
  device's contiguous share of a batch-sharded array splits into k local parts)."""
  return jax.lax.dynamic_index_in_dim(a.reshape((a.shape[0] // k, k) + a.shape[1:]), i, 1, False)


def into_micro_batch(full, part, k, i):
  """`full` with micro-batch i of k (as `micro_batch` takes it) replaced by `part`."""
  grouped = full.reshape((full.shape[0] // k, k) + full.shape[1:])
  return jax.lax.dynamic_update_index_in_dim(grouped, part, i, 1).reshape(full.shape)


def train_step(state: TrainState, batch, rng, frozen_text_params, vae_params=None, *, unet,
               text_encoder, null_inputs, tx, spec, config, autoencoder=None):
  """One optimiser step; returns the new state and this step's scalar metrics.

  `spec`: the DiffusionSpec of the loss; `config`: reads text.cond_drop_prob and optim (EMA,
  grad_accum_steps); `autoencoder` (frozen, with `vae_params`): diffuse in its latent space.
  With optim.grad_accum_steps = k > 1 the network runs on k micro-batches in turn (a `lax.scan`,
  so activations of B/k examples are alive at a time) and their gradients are summed before one
  update. Noise levels, noise and condition dropout are drawn for the full batch whatever k, so
  the step is the full-batch step up to float rounding; only dropout masks (model.dropout > 0)
  are drawn per micro-batch.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_drop, rng_loss, rng_dropout = jax.random.split(rng, 3)
  rng_latent = jax.random.fold_in(rng, _LATENT_STREAM)  # (Pixel-space runs draw as before.)
  x = diffusion_input(batch, autoencoder, vae_params, rng_latent)
  batch_size, k = x.shape[0], config.optim.grad_accum_steps
  keep = jax.random.bernoulli(rng_drop, 1.0 - config.text.cond_drop_prob, (batch_size,))
  text = {n: batch[n] for n in _TEXT_KEYS if n in batch}

  def loss_fn(params, i=None):
    """Micro-batch i's part of the full batch's mean loss (None: the whole batch, k = 1)."""
    part = (lambda a: a) if i is None else (lambda a: micro_batch(a, k, i))
    cond = text_condition(text_encoder, params, frozen_text_params, jax.tree.map(part, text))
    null = text_condition(text_encoder, params, frozen_text_params, null_inputs)
    cond = drop_condition(cond, null, part(keep))
    rngs = {'dropout': rng_dropout if i is None else jax.random.fold_in(rng_dropout, i)}

    def pred_fn(x_t, logsnr):  # The loss draws for the full batch; the network sees part of it.
      out = denoiser.apply_network(unet, params['unet'], part(x_t), part(logsnr), cond, spec,
                                   train=True, rngs=rngs)
      return out if i is None else into_micro_batch(jnp.zeros(x_t.shape, out.dtype), out, k, i)

    per_example, _ = losses.diffusion_loss(pred_fn, x, rng_loss, spec)
    return jnp.sum(part(per_example)) / batch_size

  if k == 1:
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
  else:
    def accumulate(total, i):
      return jax.tree.map(jnp.add, total, jax.value_and_grad(loss_fn)(state.params, i)), None
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, jnp.arange(k))
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(config.optim, state.step)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  # A non-finite step is not applied: the state (and so every checkpoint) stays the last good one.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
                     'param_norm': optax.global_norm(new_state.params),
                     'bad_records': jnp.sum(batch['bad'])}


def jit_train_step(config, *, unet, text_encoder, null_inputs, tx, autoencoder, state_shardings,
                   batch_shardings) -> trace_cache.Program:
  """`train_step` jitted over the mesh (state donated), its trace kept on disk for the next start.

  Call it as `train_step` without the keywords: (state, batch, rng, frozen_text, vae_params).
  The trace's key holds the config and what the step closes over that the config does not say:
  the null caption's inputs, the networks' fields and the frozen weights' fingerprints.
  """
  jitted = jax.jit(
      functools.partial(train_step, unet=unet, text_encoder=text_encoder, null_inputs=null_inputs,
                        tx=tx, spec=specs.diffusion(config), config=config,
                        autoencoder=autoencoder),
      in_shardings=(state_shardings, batch_shardings, None, None, None),
      out_shardings=(state_shardings, None), donate_argnums=(0,))
  key = {'config': config.to_dict(), 'null': null_inputs, 'unet': repr(unet),
         'text': [text_encoder.fingerprint, repr(text_encoder.module), text_encoder.trainable],
         'vae': None if autoencoder is None else [autoencoder.fingerprint,
                                                  repr(autoencoder.config)]}
  return trace_cache.Program(jitted, name='train_step', key=key, donate_argnums=(0,))


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       evaluator: metrics.Evaluator | None = None, devices=None,
                       stop_at: int | None = None) -> TrainResult:
  """Trains per `config`, writing checkpoints, metrics and evaluations to `workdir`.

  `evaluator` runs at `logging.eval_every_steps` and at the end (`logging.eval_at_end`); None:
  no evaluation. `devices` restricts the mesh to some devices (tests); `stop_at` ends the run
  early at that step, as a pre-emption would (the schedule still targets `optim.num_steps`).
  """
  distributed.initialize(config)
  validation.validate(config)
  specs.diffusion(config)  # Its errors (a bad diffusion field) before anything is built.
  mesh = sharding.make_mesh(config.mesh, devices)
  validation.check_mesh(config, mesh, jax.process_count())
  rules = config.mesh.logical_axis_rules
  writer = metrics.Reporter(workdir, config, is_main=jax.process_index() == 0)
  logging.info('Mesh %s over %d devices, %d processes.', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  source = sources.make(config.data, 'train')
  _ensure_tokenizer(config, workdir, source)
  unet, text_encoder = state_lib.build_models(config, workdir=workdir)
  autoencoder = state_lib.build_autoencoder(config)
  tx, lr_schedule = state_lib.make_optimizer(config.optim)
  abstract, shardings, init_fn = state_lib.create_sharded_state(
      config, mesh, unet=unet, text_encoder=text_encoder, tx=tx)
  frozen_text = vae_params = None  # Frozen weights: split over 'fsdp' like the trained ones.
  if not text_encoder.trainable:
    frozen_text = sharding.put_frozen(text_encoder.init(None), mesh)
  if autoencoder is not None:
    vae_params = sharding.put_frozen(autoencoder.params, mesh)

  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  guard = checkpoint.DivergenceGuard(config.checkpoint.divergence_factor,
                                     config.checkpoint.divergence_window)
  target = checkpoint.abstract_with_shardings(abstract, shardings)

  def restore(step):
    checkpoint.check_compatible(ckpt.restore_config(step), config, ckpt.directory)
    return ckpt.restore(target, step)

  resumed = ckpt.restore_latest_intact(restore)  # A damaged newest one: the one before it.
  if resumed is not None:
    (state, position), _ = resumed
    logging.info('Resumed from step %d in %s.', int(state.step), ckpt.directory)
  else:
    with compile_cache.gc_paused():  # Traces and compiles the initialiser.
      state = init_fn(jax.random.PRNGKey(config.seed))
    position = {'step': 0}
  start_step = int(position['step'])
  writer.start(state, start_step)

  text_inputs = text_inputs_lib.TextInputs(text_encoder, config, workdir, source)
  # Cached latents: the batches carry posterior moments instead of images (nothing is decoded).
  array_keys = (('latent_mean', 'latent_logvar') if _cached_latents(config, source, autoencoder)
                else ('image',))
  batch_shardings = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in
                     {'bad': np.zeros(1), **text_inputs.null,
                      **{k: np.zeros((1,) * 4) for k in array_keys}}.items()}
  step_fn = jit_train_step(config, unet=unet, text_encoder=text_encoder,
                           null_inputs=text_inputs.null, tx=tx, autoencoder=autoencoder,
                           state_shardings=shardings, batch_shardings=batch_shardings)
  rng = jax.random.PRNGKey(config.seed)

  def evaluate(step, state):
    params = state.ema_params if config.sampler.use_ema else state.params
    text_params = params['text'] if text_encoder.trainable else frozen_text
    return evaluator(step, unet, text_encoder, params['unet'], text_params, mesh)

  loader = pipeline.make_loader(config.data, source, jax.process_index(), jax.process_count(),
                                images='image' in array_keys)
  batches = pipeline.iterate(loader, start_step, config.optim.num_steps,
                             prefetch=config.data.prefetch, num_workers=config.data.num_workers)
  num_steps = config.optim.num_steps
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
          ckpt.save(step, state, config, {'step': step, 'seed': config.data.seed}, force=True)
        logging.warning('Stopping at step %d on request; the checkpoint is saved.', step)
        break
      local = {'bad': local['bad'], **text_inputs(local), **{k: local[k] for k in array_keys}}
      # The first call traces (or loads the trace of) and compiles the step; the others only
      # dispatch it.
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules), compile_cache.gc_paused():
        state, step_metrics = step_fn(state, sharding.global_batch(mesh, local), rng, frozen_text,
                                      vae_params)
      if pending is not None:
        _record(writer, guard, *pending)
      pending = (step, step_metrics, float(lr_schedule(step)))
      done = step + 1
      if done % config.checkpoint.every_steps == 0 or done == num_steps:
        _record(writer, guard, *pending)  # Never save a state whose last step was not finite.
        pending = None
        if _may_save(guard, done, ckpt):
          ckpt.save(done, state, config, {'step': done, 'seed': config.data.seed})
      if (evaluator is not None and config.logging.eval_every_steps
          and done % config.logging.eval_every_steps == 0):
        writer.write_eval(done, evaluate(done, state))
    if pending is not None:
      _record(writer, guard, *pending)
    logging.info('Divergence guard: the largest loss, gradient norm and parameter norm seen were '
                 '%.3g, %.3g and %.3g x their trailing medians.', *guard.max_ratios)
    final_step = int(jax.device_get(state.step))
    if (evaluator is not None and config.logging.eval_at_end and final_step == num_steps
        and final_step not in (writer.last_eval_step, start_step)):
      writer.write_eval(final_step, evaluate(final_step, state))
  finally:
    stop.restore()
    ckpt.close()  # Waits for async saves: nothing written is lost on the way out.
    writer.close()
    if hasattr(batches, 'close'):
      batches.close()
  return TrainResult(state, writer.history)


def _cached_latents(config, source, autoencoder) -> bool:
  """Whether batches carry the records' stored posterior moments; refuses moments of another VAE
  or geometry (DataError naming data.path)."""
  if autoencoder is None or not config.autoencoder.cached_latents:
    return False
  try:
    stored = source[0].get('latent')
  except (OSError, IndexError):
    return False
  if stored is None:
    return False
  problems = []
  if stored['encoder'] != autoencoder.fingerprint:
    problems.append(f"they come from {stored['encoder']}, not autoencoder.path="
                    f'{config.autoencoder.path!r} ({autoencoder.fingerprint})')
  if int(stored['image_size']) != config.data.image_size:
    problems.append(f"they were computed at {stored['image_size']} px, not data.image_size="
                    f'{config.data.image_size}')
  if config.data.crop != 'center' or config.data.flip:
    problems.append('they are of centre crops without flips (set data.crop=center, data.flip=False)')
  if problems:
    raise DataError(f'data.path={config.data.path!r} holds cached latents, but '
                    + '; '.join(problems) + '. Run data.prepare --autoencoder again, or set '
                    'autoencoder.cached_latents=False to encode on the fly.')
  logging.info('Latents: posterior moments cached in the records.')
  return True


def _ensure_tokenizer(config, workdir, source):
  """text.vocab='bpe': process 0 trains WORKDIR/tokenizer.json on a sample of the captions, once."""
  if config.text.encoder != 'scratch' or config.text.vocab != 'bpe':
    return
  from text import subword  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    subword.ensure_trained(config.text, workdir, lambda: sources.caption_sample(source))
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
