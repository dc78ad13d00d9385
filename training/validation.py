"""The validation loss: the training loss on fixed held-out examples, with fixed noise, at a fixed
grid of noise levels, so that it compares across steps, runs and sweep members.

  validation = ValidationLoss(settings, trainer, mesh, train_source)   # once, at the start
  scalars = validation(weights)   # {'val_loss': mean over levels, 'val_loss/bin0': ..., ...}

The examples are the first `logging.val_examples` of the validation split (data.eval_path /
data.eval_split), or of the training data when there is none; centre-cropped, not flipped, with
their first caption; with aspect-ratio buckets, each at its bucket's shape (one program per
shape they fall into), and each shape's mean is reported too ('val_loss/48x80'). The noise levels
are the midpoints of `logging.val_bins` equal-probability bins of training's noise distribution
(`schedules.train_logsnr_quantiles`), lowest noise first. Each
example's noise (and its latent posterior sample) is drawn from its record index alone, and the
network sees one example per device per call, so the result does not depend on the batch, the
device count or the number of processes: two evaluations of the same weights agree bit for bit.
Nothing in it is random; no condition is dropped.
"""
from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from configs import validation as config_validation
from data import batch as batch_keys
from data import buckets, pipeline, sources
from diffusion import losses, schedules
from models import denoiser
from runtime import sharding
from training import step as step_lib

_SEED = 0x7A11  # The fixed noise's key (folded with each record index, then with each level...)
_LATENT = 1 << 20  # ...or with this for the latent posterior sample.


class _Head:
  """The first `n` records of a source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return self.source[index]


class ValidationLoss:
  """The validation loss of a run (see the module docstring); built once per run."""

  def __init__(self, settings, trainer, mesh, train_source):
    data, n = settings.data, settings.logging.val_examples
    held_out = sources.make(data, 'eval')
    source = held_out if held_out is not None else train_source
    shards = sharding.batch_size_of(mesh)
    n = min(n, len(source)) // shards * shards
    if n == 0:
      raise ValueError(f'logging.val_examples={settings.logging.val_examples}: the data has '
                       f'{len(source)} examples, fewer than the {shards} devices the batch '
                       'splits over; lower the mesh or set logging.val_examples=0.')
    where = 'the validation split' if held_out is not None else 'the training data (first ones)'
    logging.info('Validation loss: %d examples of %s at %d noise levels.', n, where,
                 settings.logging.val_bins)
    # Every process reads all n examples (few) and hands each device its own.
    transform = pipeline.Transform(data.image_size, 'center', False, data.upscale)
    loader = pipeline.BatchLoader(_Head(source, n), transform, seed=data.seed,
                                  global_batch_size=n, on_bad_record='skip',
                                  images=batch_keys.IMAGE in trainer.image_keys)
    groups = (_by_bucket(loader, buckets.of(data, config_validation.size_step(settings)))
              if data.bucketed else {None: loader(0)})
    self.groups = {}  # Shape (None: the square) -> the batch of its examples, in record order.
    for shape, batch in groups.items():
      order = np.argsort(batch[batch_keys.INDEX], kind='stable')
      batch = {k: v[order] for k, v in batch.items()}
      self.groups[shape] = {batch_keys.INDEX: batch[batch_keys.INDEX].astype(np.int32),
                            **trainer.text_inputs(batch),
                            **{k: batch[k] for k in trainer.image_keys}}
    if data.bucketed:
      logging.info('Validation loss: at the buckets %s.', ', '.join(
          f'{h}x{w} ({len(g[batch_keys.INDEX])})' for (h, w), g in self.groups.items()))
    self.n, self.shards, self.mesh, self.rules = n, shards, mesh, settings.mesh.logical_axis_rules
    self.frozen_vae = trainer.vae_params
    logsnrs = schedules.train_logsnr_quantiles(settings.diffusion, settings.logging.val_bins)
    self.losses = jax.jit(functools.partial(
        example_losses, unet=trainer.unet, text_encoder=trainer.text_encoder,
        autoencoder=trainer.autoencoder, diffusion=settings.diffusion,
        logsnrs=tuple(float(v) for v in logsnrs)))

  def __call__(self, weights: dict) -> dict[str, float]:
    """{'val_loss': the mean over the noise levels, 'val_loss/bin<k>': each level's mean over the
    examples, with buckets 'val_loss/<h>x<w>': the mean of each shape's examples} of `weights`
    ({'unet', 'text'?}: the whole networks' parameters)."""
    per_shape, scalars = {}, {}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for shape, batch in self.groups.items():
        n, rows = len(batch[batch_keys.INDEX]), []
        for start in range(0, n, self.shards):  # A short last chunk: its last example repeated.
          part = np.minimum(np.arange(start, start + self.shards), n - 1)
          chunk = {k: _global(self.mesh, v[part]) for k, v in batch.items()}
          rows.append(np.asarray(jax.device_get(
              self.losses(weights, self.frozen_vae, chunk)))[:n - start])
        per_shape[shape] = np.concatenate(rows).astype(np.float64)
        if shape is not None:
          scalars[f'val_loss/{shape[0]}x{shape[1]}'] = float(per_shape[shape].mean())
    per_level = np.concatenate(list(per_shape.values())).mean(axis=0)
    scalars.update({f'val_loss/bin{k}': float(v) for k, v in enumerate(per_level)})
    return {'val_loss': float(per_level.mean()), **scalars}


def _by_bucket(loader, shapes) -> dict[tuple[int, int], dict[str, np.ndarray]]:
  """`loader`'s examples (all of them) each at its aspect-ratio bucket (data/buckets.py): one batch
  per bucket shape they fall into; an unusable one is replaced by another of its bucket."""
  sizes, _ = buckets.source_sizes(loader.source)
  assignment = np.where(sizes.min(axis=1) > 0, buckets.nearest(shapes, np.maximum(sizes, 1)), -1)
  out = {}
  for b in np.unique(assignment[assignment >= 0]):
    members = np.flatnonzero(assignment == b)
    out[shapes[b]] = loader.collate([
        loader.example(int(i), int(i), shape=shapes[b],
                       candidate=lambda a, k=k: int(members[(k + a) % len(members)]))
        for k, i in enumerate(members)])
  return out


def _global(mesh, local: np.ndarray) -> jax.Array:
  """One process's full copy of a batch chunk as a global array over the batch axes."""
  local = np.asarray(local)
  return jax.make_array_from_callback(local.shape, sharding.batch_sharding(mesh, local.ndim),
                                      lambda index: local[index])


def example_losses(weights, vae_params, chunk, *, unet, text_encoder, autoencoder, diffusion,
                   logsnrs) -> jax.Array:
  """[B, levels] loss of each example of `chunk` at each of the fixed log-SNRs `logsnrs`, its
  noise drawn from its record index (so independent of the batch it is in)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(_SEED), i))(chunk[batch_keys.INDEX])
  if autoencoder is None:
    x0 = chunk[batch_keys.IMAGE]
  else:
    if batch_keys.LATENTS[0] in chunk:
      mean, logvar = (chunk[k] for k in batch_keys.LATENTS)
    else:
      mean, logvar = autoencoder.encode(vae_params, chunk[batch_keys.IMAGE])
    sample = lambda m, lv, k: autoencoder.to_latents(m[None], lv[None], k)[0]
    x0 = jax.vmap(sample)(mean, logvar, jax.vmap(lambda k: jax.random.fold_in(k, _LATENT))(keys))
  text = {n: chunk[n] for n in batch_keys.TEXT if n in chunk}
  cond = step_lib.text_condition(text_encoder, weights.get('text'), text)
  pred_fn = lambda x_t, logsnr: denoiser.apply_network(unet, weights['unet'], x_t, logsnr, cond,
                                                       diffusion)
  columns = []
  for level, logsnr in enumerate(logsnrs):
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, level), x0.shape[1:],
                                               x0.dtype))(keys)
    loss, _ = losses.loss_at(pred_fn, x0, jnp.full(x0.shape[:1], logsnr, jnp.float32), eps,
                             diffusion)
    columns.append(loss.astype(jnp.float32))
  return jnp.stack(columns, axis=1)


def make(settings, trainer, mesh, train_source) -> ValidationLoss | None:
  """The run's validation loss, or None when `logging.val_examples` is 0."""
  if not settings.logging.val_examples:
    return None
  return ValidationLoss(settings, trainer, mesh, train_source)

