"""What a run holds and how it is built: the networks, `TrainState`, sharded initialisation.

`build_networks` makes the denoiser (through the `model.family` seam) and the text encoder from
their specs; `build_autoencoder` loads the frozen VAE of latent diffusion. `create_sharded_state`
gives the abstract train state, its shardings (from the parameters' logical axis names) and a
jitted initialiser that writes each shard where it lives; `abstract_params` is the
parameters-only part of that, for restoring weights without an optimiser (sampling).
Training (training/builder.py) and sampling (sampling/from_checkpoint.py) both build here.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models import family, lora
from runtime import sharding
from text import encoders


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'unet': ..., 'text': ...}: what the optimiser trains.
  opt_state: Any
  ema_params: Any  # Exponential moving average of `params` (sampling uses it by default).


def build_autoencoder(spec):
  """The frozen autoencoder of `autoencoder.path` (a `models.vae_loading.PretrainedVAE`), or None
  for pixel-space diffusion. `spec`: the run's `AutoencoderSpec`."""
  if not spec.path:
    return None
  from models import vae_loading  # pylint: disable=g-import-not-at-top
  return vae_loading.load_vae(spec.path, spec.dtype)


def diffusion_shape(image_size: int, autoencoder) -> tuple[int, int, int]:
  """(H, W, C) of what the network denoises: the image, or the autoencoder's latent of it."""
  if autoencoder is None:
    return (image_size, image_size, 3)
  f = autoencoder.config.downsample_factor
  return (image_size // f, image_size // f, autoencoder.config.latent_channels)


def build_networks(settings, *, autoencoder, workdir=None) -> tuple[nn.Module, encoders.TextEncoder]:
  """The denoiser of `settings.model`'s family, sized for the training images (in pixels or in
  the `autoencoder`'s latents), and the text encoder of `settings.text` (`workdir`: where
  text.vocab='bpe' keeps its tokenizer)."""
  side = diffusion_shape(settings.data.image_size, autoencoder)[0]
  return family.build(settings.model, side), encoders.build(settings.text, workdir=workdir)


def networks_key(unet, text_encoder, autoencoder) -> dict:
  """What a traced program closing over these networks reads of them besides their parameters
  (part of a `runtime.trace_cache.Program`'s key): the denoiser's fields, and the text encoder's
  and the autoencoder's weights (by fingerprint) and modules."""
  return {'unet': repr(unet),
          'text': [text_encoder.fingerprint, repr(text_encoder.module), text_encoder.trainable],
          'vae': None if autoencoder is None else [autoencoder.fingerprint,
                                                   repr(autoencoder.config)]}


def _init_network(rng, *, unet, text_encoder, input_shape):
  """The denoiser's whole initial parameter tree (boxed), adapters included."""
  length = text_encoder.max_len
  return unet.init(
      {'params': rng}, jnp.zeros((1,) + tuple(input_shape)), jnp.zeros((1,)),
      jnp.zeros((1, length, text_encoder.dim)), jnp.ones((1, length), bool),
      jnp.zeros((1, text_encoder.dim)), train=False)['params']


def init_params(rng, *, unet, text_encoder, input_shape: tuple[int, int, int],
                shaped_only=()) -> dict:
  """Initial (boxed, i.e. logically annotated) trainable parameters: {'unet', 'text'?}. With LoRA
  adapters in the network, 'unet' holds only them (the base is frozen: `frozen_base`). The parts
  named in `shaped_only` are only shaped (boxes of ShapeDtypeStructs), not computed."""
  rng_unet, rng_text = jax.random.split(rng)

  def init_unet(r):
    adapters, base = lora.split(_init_network(r, unet=unet, text_encoder=text_encoder,
                                              input_shape=input_shape))
    return adapters or base

  make = lambda name, f, r: jax.eval_shape(f, r) if name in shaped_only else f(r)
  params = {'unet': make('unet', init_unet, rng_unet)}
  if text_encoder.trainable:
    params['text'] = make('text', text_encoder.init, rng_text)
  return params


def frozen_base(mesh, rules, *, unet, text_encoder, input_shape) -> Any:
  """ShapeDtypeStructs, with their shardings, of the frozen base weights under a network's LoRA
  adapters: placed by their logical axis names, as trained weights would be."""
  boxed = jax.eval_shape(functools.partial(_init_network, unet=unet, text_encoder=text_encoder,
                                           input_shape=input_shape), jax.random.PRNGKey(0))
  base = lora.split(boxed)[1]
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(base), sharding.tree_shardings(base, mesh, rules))


def put(values, abstract) -> Any:
  """Plain arrays (one process's full copy) placed as `abstract`'s ShapeDtypeStructs say."""
  return jax.tree.map(lambda x, a: jax.make_array_from_callback(
      a.shape, a.sharding, lambda i, x=x: np.asarray(x[i], a.dtype)), values, abstract)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def init_state(rng, *, unet, text_encoder, tx, input_shape: tuple[int, int, int],
               pretrained=None) -> TrainState:
  """Initial boxed train state; jit/eval_shape it, do not call eagerly. `pretrained`: plain
  arrays replacing parts of the initial parameters, keeping their axis names: {'unet': the
  family's weights, 'text': a fine-tuned pretrained encoder's} (either may be absent). Those
  parts are never initialised here (a pretrained encoder's initial values would otherwise be
  constants of the jitted initialiser)."""
  pretrained = pretrained or {}
  params = init_params(rng, unet=unet, text_encoder=text_encoder, input_shape=input_shape,
                       shaped_only=tuple(pretrained))
  for name, values in pretrained.items():
    params[name] = jax.tree.map(
        lambda box, value: box.replace_boxed(value) if _is_box(box) else value,
        params[name], values, is_leaf=_is_box)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def pretrained_weights(model_spec, text_encoder) -> Callable[[], dict] | None:
  """A function loading the weights a run starts from ({'unet'?, 'text'?}, plain arrays), or None
  when everything starts random: the family's pretrained U-Net (model.pretrained) and a pretrained
  text encoder that trains (text.finetune). Called only when a run starts from scratch."""
  unet = None if family.lora(model_spec) else family.pretrained(model_spec)  # LoRA: frozen base.
  text = text_encoder.trainable and text_encoder.module is None  # Pretrained, not scratch.
  if unet is None and not text:
    return None
  return lambda: {**({'unet': unet()} if unet is not None else {}),
                  **({'text': nn.meta.unbox(text_encoder.init(None))} if text else {})}


def create_sharded_state(mesh, rules, *, unet, text_encoder, tx, input_shape, pretrained=None):
  """Abstract state + its shardings (from logical axis names via `rules`), and the jitted
  initialiser `init_fn(rng)`. `pretrained`: None, or a function giving the weights that replace
  the initial ones (`pretrained_weights`), called only when a run starts from scratch (a resumed
  run never reads them)."""
  init = functools.partial(init_state, unet=unet, text_encoder=text_encoder, tx=tx,
                           input_shape=input_shape)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  if pretrained is None:
    return abstract, shardings, jax.jit(lambda rng: nn.meta.unbox(init(rng)),
                                        out_shardings=shardings)
  jitted = jax.jit(lambda rng, values: nn.meta.unbox(init(rng, pretrained=values)),
                   out_shardings=shardings)
  return abstract, shardings, lambda rng: jitted(rng, pretrained())


def abstract_params(mesh, rules, *, unet, text_encoder, input_shape) -> Any:
  """ShapeDtypeStructs of the trainable parameters with their shardings (no optimiser state)."""
  init = functools.partial(init_params, unet=unet, text_encoder=text_encoder,
                           input_shape=input_shape)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)
