"""The one way a trainer is built: networks, optimiser, sharded state, the jitted step.

  trainer = build_trainer(settings, mesh, source=source, workdir=workdir)
  state = trainer.init(jax.random.PRNGKey(settings.seed))   # or restored into trainer.abstract
  state, metrics = trainer.step(state, global_batch, rng, trainer.frozen_weights, trainer.vae_params)

The training loop and every benchmark that times the train step build through `build_trainer`,
so what they time is what training runs.
"""
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging

from data import batch as batch_keys
from data import buckets, records
from data.sources import DataError
from models import family, weights
from runtime import checkpoint, sharding, state as state_lib, trace_cache
from text import encoders
from training import step as step_lib
from training import text_inputs as text_inputs_lib


class Trainer(NamedTuple):
  unet: nn.Module  # The denoiser (models.family).
  text_encoder: encoders.TextEncoder
  autoencoder: Any  # The frozen VAE (models.vae_loading.PretrainedVAE), or None.
  tx: optax.GradientTransformation
  lr_schedule: Callable[[Any], Any]
  abstract: Any  # The TrainState's ShapeDtypeStructs (what a checkpoint restores into, with...)
  shardings: Any  # ...these shardings.
  init: Callable[[jax.Array], state_lib.TrainState]  # rng -> the sharded initial state (jitted).
  # The frozen parameters the step combines with the trained ones ({'text'?, 'unet'?}): the frozen
  # text encoder's, and the base weights under LoRA adapters, over 'fsdp'.
  frozen_weights: dict[str, Any]
  vae_params: Any  # The frozen autoencoder's parameters over 'fsdp', or None.
  text_inputs: text_inputs_lib.TextInputs  # Host: a loader batch's captions -> text inputs.
  image_keys: tuple[str, ...]  # data.batch.image_keys: images, or the records' cached latents.
  step: trace_cache.Program  # (state, global batch, rng, frozen_weights, vae_params) -> (state, m).
  frozen: dict[str, list[str]]  # Frozen component -> [weight digest, folder]: what a resume checks.


def make_optimizer(optim) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """(AdamW with global-norm clipping and no decay on norms/biases, its learning-rate schedule)
  of an `OptimSpec`.

  The schedule is a linear warmup from 0 to `optim.learning_rate`, then a cosine decay to
  `learning_rate * end_lr_factor` at `optim.num_steps`.
  """
  lr = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
      decay_steps=max(optim.num_steps, optim.warmup_steps + 1),
      end_value=optim.learning_rate * optim.end_lr_factor)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  chain.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*chain), lr


def build_trainer(settings, mesh, *, source=None, workdir=None) -> Trainer:
  """Everything a run of `settings` trains with, over `mesh`.

  `source`: the training records (`data.sources.make`): where cached text embeddings and latents
  are found (None: the step takes token ids and images). `workdir`: where text.vocab='bpe' keeps
  its tokenizer and the text-embedding cache is built.
  """
  autoencoder = state_lib.build_autoencoder(settings.autoencoder)
  unet, text_encoder = state_lib.build_networks(settings, autoencoder=autoencoder, workdir=workdir)
  tx, lr_schedule = make_optimizer(settings.optim)
  abstract, shardings, init = state_lib.create_sharded_state(
      mesh, settings.mesh.logical_axis_rules, unet=unet, text_encoder=text_encoder, tx=tx,
      input_shape=state_lib.diffusion_shape(settings.data.image_size, autoencoder),
      pretrained=state_lib.pretrained_weights(settings.model, text_encoder))
  # Frozen weights: split over 'fsdp' like the trained ones.
  frozen_weights = {}
  if not text_encoder.trainable:
    frozen_weights['text'] = sharding.put_frozen(text_encoder.init(None), mesh)
  if family.lora(settings.model):
    base = family.pretrained(settings.model)()
    frozen_weights['unet'] = state_lib.put(base, state_lib.frozen_base(
        mesh, settings.mesh.logical_axis_rules, unet=unet, text_encoder=text_encoder,
        input_shape=state_lib.diffusion_shape(settings.data.image_size, autoencoder)))
  vae_params = None if autoencoder is None else sharding.put_frozen(autoencoder.params, mesh)
  text_inputs = text_inputs_lib.TextInputs(text_encoder, settings, workdir, source)
  image_keys = batch_keys.image_keys(_cached_latents(settings, source, autoencoder))
  example = {batch_keys.BAD: np.zeros(1), **text_inputs.null,
             **{k: np.zeros((1,) * 4) for k in image_keys}}
  batch_shardings = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}
  step = jit_train_step(settings, unet=unet, text_encoder=text_encoder,
                        null_inputs=text_inputs.null, tx=tx, autoencoder=autoencoder,
                        state_shardings=shardings, batch_shardings=batch_shardings)
  frozen = {}  # By weight digest, not path: a moved folder with the same weights still resumes.
  if autoencoder is not None:
    frozen[checkpoint.FROZEN_AUTOENCODER] = [weights.digest(autoencoder.params), settings.autoencoder.path]
  if not text_encoder.trainable:
    frozen[checkpoint.FROZEN_TEXT] = [weights.digest(text_encoder.init(None)),
                              settings.text.pretrained_path or 'the packaged MiniLM']
  if 'unet' in frozen_weights:  # LoRA: the adapters apply to this base alone.
    frozen[checkpoint.FROZEN_BASE] = [weights.digest(base), settings.model.unet_folder]
  return Trainer(unet, text_encoder, autoencoder, tx, lr_schedule, abstract, shardings, init,
                 frozen_weights, vae_params, text_inputs, image_keys, step, frozen)


def jit_train_step(settings, *, unet, text_encoder, null_inputs, tx, autoencoder, state_shardings,
                   batch_shardings) -> trace_cache.Program:
  """`train_step` jitted over the mesh (state donated), its trace kept on disk for the next start.

  Call it as `train_step` without the keywords: (state, batch, rng, frozen_weights, vae_params).
  The trace's key holds the config and what the step closes over that the config does not say:
  the null caption's inputs, the networks' fields and the frozen weights' fingerprints.
  """
  jitted = jax.jit(
      functools.partial(step_lib.train_step, unet=unet, text_encoder=text_encoder,
                        null_inputs=null_inputs, tx=tx, diffusion=settings.diffusion,
                        optim=settings.optim, cond_drop_prob=settings.text.cond_drop_prob,
                        autoencoder=autoencoder),
      in_shardings=(state_shardings, batch_shardings, None, None, None),
      out_shardings=(state_shardings, None), donate_argnums=(0,))
  key = {'config': settings.record, 'null': null_inputs,
         **state_lib.networks_key(unet, text_encoder, autoencoder)}
  return trace_cache.Program(jitted, name='train_step', key=key, donate_argnums=(0,))


def _cached_latents(settings, source, autoencoder) -> bool:
  """Whether batches carry the records' stored posterior moments; refuses moments of another VAE
  or geometry (DataError naming data.path)."""
  if source is None or autoencoder is None or not settings.autoencoder.cached_latents:
    return False
  stored = records.stored(source, 'latent')
  if stored is None:
    return False
  data, problems = settings.data, []
  if stored['encoder'] != autoencoder.fingerprint:
    problems.append(f"they come from {stored['encoder']}, not autoencoder.path="
                    f'{settings.autoencoder.path!r} ({autoencoder.fingerprint})')
  cached = stored.get('buckets') and tuple(tuple(b) for b in stored['buckets'])
  wanted = data.bucketed and buckets.of(
      data, family.size_step(settings.model, autoencoder.config.downsample_factor))
  if (cached or wanted) and cached != wanted:
    problems.append(
        (f'they were computed at the buckets {cached}' if cached else
         f"they were computed at one square size ({stored['image_size']} px)")
        + (f", not data.buckets={wanted} (tools.prepare --buckets='{wanted}' writes those)"
           if wanted else f' and data.buckets is empty (set data.buckets={cached})'))
  elif not cached and int(stored['image_size']) != data.image_size:
    problems.append(f"they were computed at {stored['image_size']} px, not data.image_size="
                    f'{data.image_size}')
  if data.crop != 'center' or data.flip:
    problems.append('they are of centre crops without flips (set data.crop=center, data.flip=False)')
  if problems:
    raise DataError(f'data.path={data.path!r} holds cached latents, but '
                    + '; '.join(problems) + '. Run tools.prepare --autoencoder again, or set '
                    'autoencoder.cached_latents=False to encode on the fly.')
  logging.info('Latents: posterior moments cached in the records.')
  return True
