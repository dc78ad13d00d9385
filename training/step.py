"""One optimiser step: `train_step(state, batch, rng, ...) -> (state, metrics)`, pure and jittable.

Its randomness is `fold_in(rng, state.step)`, so a resumed run replays what an uninterrupted one
does. It closes over the networks, the optimiser and the specs it reads (the diffusion spec of
the loss, the optim section, text.cond_drop_prob), never over a config;
`training.builder.build_trainer` jits it over the mesh with the state donated.
"""
import jax
import jax.numpy as jnp
import optax

from data import batch as batch_keys
from diffusion import losses
from models import denoiser, lora
from runtime.state import TrainState

_LATENT_STREAM = 0x1A7E  # fold_in tag of the posterior samples' randomness.


def ema_decay(optim, step):
  """EMA decay at `step`; with warmup min(decay, (1+step)/(10+step)) so early averages move."""
  d = jnp.float32(optim.ema_decay)
  return jnp.minimum(d, (1.0 + step) / (10.0 + step)) if optim.ema_warmup else d


def text_condition(text_encoder, text_params, inputs):
  """Text embeddings of a batch: encoded from its tokens, or the precomputed ones."""
  if batch_keys.TOKENS not in inputs:
    return {k: inputs[k] for k in batch_keys.EMBEDDINGS}
  return dict(zip(batch_keys.EMBEDDINGS,
                  text_encoder.encode(text_params, inputs[batch_keys.TOKENS])))


def drop_condition(cond, null, keep):
  """Classifier-free guidance training: where keep is False, use the null (empty caption) condition."""
  def pick(c, n):
    k = keep.reshape(keep.shape + (1,) * (c.ndim - 1))
    return jnp.where(k, c, n.astype(c.dtype))
  return jax.tree.map(pick, cond, null)


def diffusion_input(batch, autoencoder, vae_params, rng):
  """What the network denoises: the images, or latents of the frozen autoencoder drawn from its
  posterior (a fresh sample every step)."""
  if autoencoder is None:
    return batch[batch_keys.IMAGE]
  if batch_keys.LATENTS[0] in batch:  # Cached by tools.prepare --autoencoder (checked at start).
    return autoencoder.to_latents(*(batch[k] for k in batch_keys.LATENTS), rng)
  mean, logvar = autoencoder.encode(vae_params, batch[batch_keys.IMAGE])
  return autoencoder.to_latents(mean, logvar, rng)


def micro_batch(a, k, i):
  """Micro-batch i of k of a per-example array: examples i, i + k, i + 2k, ... (strided, so each
  device's contiguous share of a batch-sharded array splits into k local parts)."""
  return jax.lax.dynamic_index_in_dim(a.reshape((a.shape[0] // k, k) + a.shape[1:]), i, 1, False)


def into_micro_batch(full, part, k, i):
  """`full` with micro-batch i of k (as `micro_batch` takes it) replaced by `part`."""
  grouped = full.reshape((full.shape[0] // k, k) + full.shape[1:])
  return jax.lax.dynamic_update_index_in_dim(grouped, part, i, 1).reshape(full.shape)


def train_step(state: TrainState, batch, rng, frozen_weights, vae_params=None, *, unet,
               text_encoder, null_inputs, tx, diffusion, optim, cond_drop_prob,
               autoencoder=None):
  """One optimiser step; returns the new state and this step's scalar metrics.

  `frozen_weights`: the frozen parameters ({'text'?: a frozen encoder's, 'unet'?: the base under
  LoRA adapters}) combined with the trained ones (`lora.combine`); only the trained ones get
  gradients. `diffusion`: the DiffusionSpec of the loss; `optim`: the OptimSpec (EMA, grad_accum_steps);
  `cond_drop_prob`: text.cond_drop_prob; `autoencoder` (frozen, with `vae_params`): diffuse in
  its latent space. With optim.grad_accum_steps = k > 1 the network runs on k micro-batches in
  turn (a `lax.scan`, so activations of B/k examples are alive at a time) and their gradients are
  summed before one update. Noise levels, noise and condition dropout are drawn for the full
  batch whatever k, so the step is the full-batch step up to float rounding; only dropout masks
  (model.dropout > 0) are drawn per micro-batch.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_drop, rng_loss, rng_dropout = jax.random.split(rng, 3)
  rng_latent = jax.random.fold_in(rng, _LATENT_STREAM)  # (Pixel-space runs draw as before.)
  x = diffusion_input(batch, autoencoder, vae_params, rng_latent)
  batch_size, k = x.shape[0], optim.grad_accum_steps
  keep = jax.random.bernoulli(rng_drop, 1.0 - cond_drop_prob, (batch_size,))
  text = {n: batch[n] for n in batch_keys.TEXT if n in batch}

  def loss_fn(params, i=None):
    """Micro-batch i's part of the full batch's mean loss (None: the whole batch, k = 1)."""
    part = (lambda a: a) if i is None else (lambda a: micro_batch(a, k, i))
    weights = lora.combine(params, frozen_weights or {})
    cond = text_condition(text_encoder, weights.get('text'), jax.tree.map(part, text))
    null = text_condition(text_encoder, weights.get('text'), null_inputs)
    cond = drop_condition(cond, null, part(keep))
    rngs = {'dropout': rng_dropout if i is None else jax.random.fold_in(rng_dropout, i)}

    def pred_fn(x_t, logsnr):  # The loss draws for the full batch; the network sees part of it.
      out = denoiser.apply_network(unet, weights['unet'], part(x_t), part(logsnr), cond, diffusion,
                                   train=True, rngs=rngs)
      return out if i is None else into_micro_batch(jnp.zeros(x_t.shape, out.dtype), out, k, i)

    per_example, _ = losses.diffusion_loss(pred_fn, x, rng_loss, diffusion)
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
  decay = ema_decay(optim, state.step)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  # A non-finite step is not applied: the state (and so every checkpoint) stays the last good one.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
                     'param_norm': optax.global_norm(new_state.params),
                     'bad_records': jnp.sum(batch[batch_keys.BAD])}
