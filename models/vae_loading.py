"""A frozen Stable Diffusion VAE (AutoencoderKL) from a local diffusers folder.

The folder (e.g. a pipeline's `vae/`) holds `config.json` and `diffusion_pytorch_model.safetensors`
(or a sharded `...safetensors.index.json`); the SD 1.x/2.x, SDXL and SD3/Flux VAEs share the
layout. `load_vae` checks config.json, converts every tensor (PyTorch OIHW convs -> HWIO, Linear
(out, in) -> (in, out)), checking each shape against the config and refusing leftovers, and
returns a `PretrainedVAE` whose functions are pure and jittable:

  vae = load_vae('/data/sd-vae-ft-mse', dtype='bfloat16')
  mean, logvar = jax.jit(vae.encode)(vae.params, images)            # images [B, H, W, 3] in [-1, 1]
  z = vae.to_latents(mean, logvar, rng)                              # diffusion space
  images = jax.jit(vae.decode_chunked, static_argnums=2)(vae.params, vae.from_latents(z), 4)

Latent scaling follows Rombach et al. 2022 (arXiv:2112.10752, sec. 4.3.2): z = (x - shift) * scale
with `scaling_factor` (SD: 0.18215, SDXL: 0.13025) and `shift_factor` (0 unless config.json sets
it); a VAE whose config.json gives per-channel `latents_mean`/`latents_std` uses
(x - latents_mean) * scaling_factor / latents_std instead, as diffusers' pipelines do.

`save_vae(folder, config, params, scaling_factor=...)` writes the same layout back (a VAE trained
here, e.g. by tools/train_autoencoder.py), readable by `load_vae` and by diffusers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, weights
from models.autoencoder import AutoencoderKL, DiagonalGaussian, VAEConfig
# The text encoders' loader: the same shape-checked tensor lookup and weight digest.

WEIGHTS = 'diffusion_pytorch_model.safetensors'
_LAYOUT = ('a diffusers AutoencoderKL folder needs config.json and '
           f'{WEIGHTS} (e.g. the vae/ subfolder of a Stable Diffusion pipeline)')


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainedVAE:
  """A loaded frozen VAE: its parameters, checked config and pure encode/decode functions."""
  path: str                 # absolute folder the weights came from
  config: VAEConfig         # channels, latent_channels, downsample_factor, scaling/shift factors
  module: AutoencoderKL     # the Flax network in the compute dtype
  params: Any               # parameter pytree (plain arrays; frozen: never trained)
  fingerprint: str = ''     # folder, compute dtype and a weight digest (for latent caches)

  def encode(self, params: Any, images: jax.Array) -> DiagonalGaussian:
    """images [B, H, W, in_channels] in [-1, 1], H and W multiples of f -> (mean, logvar) f32."""
    self._check(images, self.config.in_channels, self.config.downsample_factor, 'images')
    return self.module.apply({'params': jax.lax.stop_gradient(params)}, images,
                             method=AutoencoderKL.encode)

  def decode(self, params: Any, latents: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels] f32."""
    self._check(latents, self.config.latent_channels, 1, 'latents')
    return self.module.apply({'params': jax.lax.stop_gradient(params)}, latents,
                             method=AutoencoderKL.decode)

  def decode_chunked(self, params: Any, latents: jax.Array, chunk: int) -> jax.Array:
    """`decode` `chunk` examples at a time (jax.lax.map), bounding the decoder's activations.

    The batch is zero-padded to a multiple of `chunk` and the padding dropped. Under jit
    `chunk` must be static (`jax.jit(vae.decode_chunked, static_argnums=2)`).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
      raise ValueError(f'decode_chunked: chunk={chunk!r} must be a positive int (static under '
                       'jit: static_argnums=2).')
    self._check(latents, self.config.latent_channels, 1, 'latents')
    b = latents.shape[0]
    n = -(-b // chunk)
    z = jnp.pad(latents, ((0, n * chunk - b),) + ((0, 0),) * (latents.ndim - 1))
    out = jax.lax.map(lambda zc: self.decode(params, zc), z.reshape((n, chunk) + z.shape[1:]))
    return out.reshape((n * chunk,) + out.shape[2:])[:b]

  def _affine(self) -> tuple[Any, Any]:
    """(shift, scale) of z -> (z - shift) * scale, per channel where latents_mean/std are set
    (as diffusers' SDXL pipeline applies them), else shift_factor and scaling_factor."""
    cfg = self.config
    if cfg.latents_mean is None:
      return cfg.shift_factor, cfg.scaling_factor
    return (np.asarray(cfg.latents_mean, np.float32),
            cfg.scaling_factor / np.asarray(cfg.latents_std, np.float32))

  def to_latents(self, mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A posterior sample in diffusion space: (z - shift) * scale (see `_affine`)."""
    z = DiagonalGaussian(mean, logvar).sample(rng)
    shift, scale = self._affine()
    return (z - shift) * scale

  def from_latents(self, z: jax.Array) -> jax.Array:
    """Diffusion-space latents -> the decoder's input: z / scale + shift."""
    shift, scale = self._affine()
    return z.astype(jnp.float32) / scale + shift

  def _check(self, x: Any, channels: int, multiple: int, name: str) -> None:
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[-1] != channels or shape[1] % multiple or shape[2] % multiple:
      raise ValueError(
          f'VAE {name} must be NHWC [B, H, W, {channels}] with H and W multiples of {multiple} '
          f'(the VAE at {self.path}), got shape {shape}.')


# ----------------------------------------------------------------------------- locating files


def _require(path: str) -> str:
  if not os.path.isfile(path):
    folder = os.path.dirname(path)
    hint = ''
    if os.path.isfile(os.path.join(folder, 'vae', 'config.json')):
      hint = f' (a pipeline folder: point at {os.path.join(folder, "vae")} instead)'
    raise FileNotFoundError(f'{path} not found{hint}: {_LAYOUT}.')
  return path


def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of diffusion_pytorch_model.safetensors, or of its index's shards."""
  found = weights.read_safetensors(folder, WEIGHTS)
  if found is not None:
    return found
  single = os.path.join(folder, WEIGHTS)
  present = sorted(n for n in os.listdir(folder) if n.startswith('diffusion_pytorch_model'))
  hint = (f' (the folder has {present}: convert .bin to safetensors, or rename a variant such as '
          f'.fp16.safetensors to {WEIGHTS})' if present else '')
  raise FileNotFoundError(f'{single} not found{hint}: {_LAYOUT}.')


def read_config(folder: str) -> VAEConfig:
  """config.json -> a checked `VAEConfig` (ValueError naming config.json and the field)."""
  path = _require(os.path.join(folder, 'config.json'))
  with open(path) as f:
    cfg = json.load(f)
  cls = cfg.get('_class_name', 'AutoencoderKL')
  if cls != 'AutoencoderKL':
    raise ValueError(f"{path}: _class_name={cls!r} is not supported; only diffusers' "
                     "'AutoencoderKL' (the Stable Diffusion VAE) is.")
  kwargs = weights.dataclass_fields(VAEConfig, cfg, path)
  kwargs['source'] = path
  return VAEConfig(**kwargs)


# ----------------------------------------------------------------------------- conversion


class _UsedTensors:
  """`_TensorGetter` that also records which checkpoint names it returned."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str, dtype: Any):
    self._tensors, self.used = tensors, set()
    self._get = weights.TensorGetter(tensors, source, ('',), dtype)

  def __call__(self, names: str | tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    names = (names,) if isinstance(names, str) else names
    self.used.add(next((n for n in names if n in self._tensors), names[0]))
    return self._get(names, shape)


def convert_diffusers_weights(get: Any, config: VAEConfig) -> dict[str, Any]:
  """diffusers AutoencoderKL tensors (PyTorch layout) -> `AutoencoderKL` params.

  `get(names, shape)` returns the first tensor present among `names`, raising if its shape is
  not `shape` (the PyTorch shape config.json implies).
  """
  def conv(p, c_in, c_out, k=3):
    w = get(f'{p}.weight', (c_out, c_in, k, k))
    return {'kernel': np.transpose(w, (2, 3, 1, 0)), 'bias': get(f'{p}.bias', (c_out,))}

  def norm(p, c):
    return {'scale': get(f'{p}.weight', (c,)), 'bias': get(f'{p}.bias', (c,))}

  def linear(names, c):
    return {'kernel': get(tuple(f'{n}.weight' for n in names), (c, c)).T,
            'bias': get(tuple(f'{n}.bias' for n in names), (c,))}

  def resnet(p, c_in, c_out):
    out = {'norm1': norm(f'{p}.norm1', c_in), 'conv1': conv(f'{p}.conv1', c_in, c_out),
           'norm2': norm(f'{p}.norm2', c_out), 'conv2': conv(f'{p}.conv2', c_out, c_out)}
    if c_in != c_out:
      out['conv_shortcut'] = conv(f'{p}.conv_shortcut', c_in, c_out, k=1)
    return out

  def mid(p, c):
    out = {'res_0': resnet(f'{p}.resnets.0', c, c), 'res_1': resnet(f'{p}.resnets.1', c, c)}
    if config.mid_block_add_attention:
      a = f'{p}.attentions.0'  # Older checkpoints: query/key/value/proj_attn.
      out['attn'] = {'group_norm': norm(f'{a}.group_norm', c),
                     'to_q': linear((f'{a}.to_q', f'{a}.query'), c),
                     'to_k': linear((f'{a}.to_k', f'{a}.key'), c),
                     'to_v': linear((f'{a}.to_v', f'{a}.value'), c),
                     'to_out': linear((f'{a}.to_out.0', f'{a}.proj_attn'), c)}
    return out

  chans, n_res, lat = config.block_out_channels, config.layers_per_block, config.latent_channels
  enc = {'conv_in': conv('encoder.conv_in', config.in_channels, chans[0])}
  c_prev = chans[0]
  for i, c in enumerate(chans):
    for j in range(n_res):
      enc[f'down_{i}_res_{j}'] = resnet(f'encoder.down_blocks.{i}.resnets.{j}', c_prev, c)
      c_prev = c
    if i != len(chans) - 1:
      enc[f'down_{i}_downsample'] = conv(f'encoder.down_blocks.{i}.downsamplers.0.conv', c, c)
  enc['mid'] = mid('encoder.mid_block', chans[-1])
  enc['conv_norm_out'] = norm('encoder.conv_norm_out', chans[-1])
  enc['conv_out'] = conv('encoder.conv_out', chans[-1], 2 * lat)

  rev = tuple(reversed(chans))
  dec = {'conv_in': conv('decoder.conv_in', lat, rev[0]), 'mid': mid('decoder.mid_block', rev[0])}
  c_prev = rev[0]
  for i, c in enumerate(rev):
    for j in range(n_res + 1):
      dec[f'up_{i}_res_{j}'] = resnet(f'decoder.up_blocks.{i}.resnets.{j}', c_prev, c)
      c_prev = c
    if i != len(rev) - 1:
      dec[f'up_{i}_upsample'] = conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', c, c)
  dec['conv_norm_out'] = norm('decoder.conv_norm_out', chans[0])
  dec['conv_out'] = conv('decoder.conv_out', chans[0], config.out_channels)

  params = {'encoder': enc, 'decoder': dec}
  if config.use_quant_conv:
    params['quant_conv'] = conv('quant_conv', 2 * lat, 2 * lat, k=1)
  if config.use_post_quant_conv:
    params['post_quant_conv'] = conv('post_quant_conv', lat, lat, k=1)
  return params


# ----------------------------------------------------------------------------- loading


def load_vae(path: str, dtype: str | Any = 'float32', *,
             param_dtype: Any = jnp.float32) -> PretrainedVAE:
  """Loads a local diffusers AutoencoderKL folder as a frozen `PretrainedVAE`.

  Args:
    path: folder with config.json and diffusion_pytorch_model.safetensors.
    dtype: compute dtype ('float32' | 'bfloat16' | 'float16'); GroupNorm statistics, the
      softmax and the outputs stay float32.
    param_dtype: dtype the weights are stored in.
  """
  folder = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'VAE folder {folder} not found (or not a folder): {_LAYOUT}.')
  config = read_config(folder)
  compute_dtype = layers.resolve_dtype(dtype, 'vae dtype') if isinstance(dtype, str) else dtype
  if compute_dtype not in layers.DTYPES.values():
    raise ValueError(f'vae dtype={dtype!r} is not supported; use one of {sorted(layers.DTYPES)}.')
  tensors, source = _read_tensors(folder)
  get = _UsedTensors(tensors, source, param_dtype)
  params = convert_diffusers_weights(get, config)
  unused = sorted(set(tensors) - get.used)
  if unused:
    raise ValueError(
        f'{source}: {len(unused)} tensors are not used by the AutoencoderKL that '
        f'{config.source} describes, e.g. {unused[:5]}; is this the VAE checkpoint for that '
        'config.json (block_out_channels, layers_per_block, mid_block_add_attention, '
        'use_quant_conv)?')

  module = AutoencoderKL(config, dtype=compute_dtype, param_dtype=param_dtype)
  f = config.downsample_factor
  images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)['params']
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(abstract))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if expected != got:  # A bug in the converter, not a user error.
    raise AssertionError(f'converted VAE params do not match the module: {got} vs {expected}')
  fingerprint = (f'vae:{folder}:dtype={jnp.dtype(compute_dtype).name}:'
                 f'{weights.digest(params)}')
  return PretrainedVAE(path=folder, config=config, module=module,
                       params=jax.tree.map(jnp.asarray, params), fingerprint=fingerprint)


# ----------------------------------------------------------------------------- saving


def diffusers_tensors(config: VAEConfig, params: Any) -> dict[str, np.ndarray]:
  """`AutoencoderKL` params -> {diffusers tensor name: float32 array in PyTorch layout}: the exact
  inverse of `convert_diffusers_weights`, derived from it (`weights.invert_conversion`)."""
  return weights.invert_conversion(
      lambda get: convert_diffusers_weights(get, config), params,
      f'save_vae: params do not match the AutoencoderKL of config (block_out_channels='
      f'{list(config.block_out_channels)}, layers_per_block={config.layers_per_block}, '
      f'latent_channels={config.latent_channels}, mid_block_add_attention='
      f'{config.mid_block_add_attention}); pass the config the params were made with.')


def diffusers_config(config: VAEConfig) -> dict[str, Any]:
  """The config.json dict diffusers' `AutoencoderKL.from_pretrained` reads for `config`."""
  sample_size = config.sample_size
  return {
      '_class_name': 'AutoencoderKL',
      '_diffusers_version': '0.42.1',
      'in_channels': config.in_channels,
      'out_channels': config.out_channels,
      'down_block_types': list(config.down_block_types),
      'up_block_types': list(config.up_block_types),
      'block_out_channels': list(config.block_out_channels),
      'layers_per_block': config.layers_per_block,
      'act_fn': config.act_fn,
      'latent_channels': config.latent_channels,
      'norm_num_groups': config.norm_num_groups,
      'sample_size': list(sample_size) if isinstance(sample_size, tuple) else sample_size,
      'scaling_factor': config.scaling_factor,
      'shift_factor': config.shift_factor or None,  # SD's VAEs: null (= 0).
      'latents_mean': list(config.latents_mean) if config.latents_mean else None,
      'latents_std': list(config.latents_std) if config.latents_std else None,
      'force_upcast': config.force_upcast,
      'use_quant_conv': config.use_quant_conv,
      'use_post_quant_conv': config.use_post_quant_conv,
      'mid_block_add_attention': config.mid_block_add_attention,
  }


def save_vae(folder: str, config: VAEConfig, params: Any, *,
             scaling_factor: float | None = None) -> str:
  """Writes `params` as a diffusers AutoencoderKL folder that `load_vae` (and diffusers) read.

  Writes config.json and diffusion_pytorch_model.safetensors (float32, diffusers names, PyTorch
  layouts) with `weights.write_weights`: neither file is ever half-written, and other files in
  `folder` are left alone.

  Args:
    folder: destination (created if missing).
    config: the config the params were made with.
    params: `AutoencoderKL` parameters (boxed or plain, any float dtype).
    scaling_factor: replaces config.scaling_factor when given (e.g. 1 / std of the latents).
  Returns:
    The absolute folder.
  """
  if scaling_factor is not None:
    if not np.isfinite(scaling_factor) or scaling_factor <= 0:
      raise ValueError(f'save_vae: scaling_factor={scaling_factor!r} must be positive and '
                       'finite (1 / std of the latents).')
    config = dataclasses.replace(config, scaling_factor=float(scaling_factor))
  tensors = diffusers_tensors(config, params)
  text = json.dumps(diffusers_config(config), indent=2) + '\n'
  return weights.write_weights(folder, WEIGHTS, tensors, text.encode())
