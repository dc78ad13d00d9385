"""What training holds and how it is built: models, optimiser, `TrainState`, sharded init.

`build_models` turns the config into the U-Net and the text encoder (through their specs);
`create_sharded_state` gives the abstract state, its shardings (from the parameters' logical
axis names) and a jitted initialiser that writes each shard where it lives. `abstract_params`
is the parameters-only part of that, for restoring weights without an optimiser (sampling).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from configs import specs
from models.unet import UNet
from text import encoders
from training import sharding


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'unet': ..., 'text': ...}: what the optimiser trains.
  opt_state: Any
  ema_params: Any  # Exponential moving average of `params` (sampling uses it by default).


def build_models(config, workdir=None) -> tuple[UNet, encoders.TextEncoder]:
  """The U-Net and the text encoder named by the config (`workdir`: where text.vocab='bpe' is)."""
  spec = specs.unet(config)
  side = diffusion_shape(config)[0] // spec.patch_size  # The U-Net's level-0 height in training.
  levels = tuple(lv for lv in range(len(spec.channel_mult))
                 if side // 2 ** lv in spec.attn_resolutions)
  return UNet(spec, attn_levels=levels), encoders.build(config.text, workdir=workdir)


def build_autoencoder(config):
  """The frozen autoencoder of `config.autoencoder.path` (a `models.vae_loading.PretrainedVAE`),
  or None for pixel-space diffusion."""
  if not config.autoencoder.path:
    return None
  from models import vae_loading  # pylint: disable=g-import-not-at-top
  return vae_loading.load_vae(config.autoencoder.path, config.autoencoder.dtype)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """(AdamW with global-norm clipping and no decay on norms/biases, its learning-rate schedule).

  The schedule is a linear warmup from 0 to `optim.learning_rate`, then a cosine decay to
  `learning_rate * end_lr_factor` at `optim.num_steps`.
  """
  lr = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.num_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_factor)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain), lr


def diffusion_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of what the U-Net denoises: the image, or the autoencoder's latent of it."""
  s = config.data.image_size
  if not config.autoencoder.path:
    return (s, s, 3)
  from models import vae_loading  # pylint: disable=g-import-not-at-top
  vae = vae_loading.read_config(config.autoencoder.path)
  return (s // vae.downsample_factor, s // vae.downsample_factor, vae.latent_channels)


def init_params(rng, *, unet, text_encoder, input_shape: tuple[int, int, int]) -> dict:
  """Initial (boxed, i.e. logically annotated) trainable parameters: {'unet', 'text'?}."""
  rng_unet, rng_text = jax.random.split(rng)
  length = text_encoder.max_len
  unet_params = unet.init(
      {'params': rng_unet}, jnp.zeros((1,) + tuple(input_shape)), jnp.zeros((1,)),
      jnp.zeros((1, length, text_encoder.dim)), jnp.ones((1, length), bool),
      jnp.zeros((1, text_encoder.dim)), train=False)['params']
  params = {'unet': unet_params}
  if text_encoder.trainable:
    params['text'] = text_encoder.init(rng_text)
  return params


def init_state(rng, *, unet, text_encoder, tx, input_shape: tuple[int, int, int]) -> TrainState:
  """Initial boxed train state; jit/eval_shape it, do not call eagerly."""
  params = init_params(rng, unet=unet, text_encoder=text_encoder, input_shape=input_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def create_sharded_state(config, mesh, *, unet, text_encoder, tx):
  """Abstract state + its shardings (from logical axis names), and the jitted initialiser."""
  init = functools.partial(init_state, unet=unet, text_encoder=text_encoder, tx=tx,
                           input_shape=diffusion_shape(config))
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, config.mesh.logical_axis_rules)
  abstract = nn.meta.unbox(boxed)
  init_fn = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)
  return abstract, shardings, init_fn


def abstract_params(config, mesh, *, unet, text_encoder) -> Any:
  """ShapeDtypeStructs of the trainable parameters with their shardings (no optimiser state)."""
  init = functools.partial(init_params, unet=unet, text_encoder=text_encoder,
                           input_shape=diffusion_shape(config))
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, config.mesh.logical_axis_rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)
