"""Stable Diffusion's AutoencoderKL (Rombach et al. 2022, arXiv:2112.10752, sec. 3) in Flax, NHWC.

The layout is diffusers' `AutoencoderKL` (the SD 1.x/2.x, SDXL and SD3/Flux-style VAEs): an
`Encoder` (conv_in, DownEncoderBlock2D levels of ResNet blocks with asymmetric-pad stride-2
downsampling, a mid block ResNet-attention-ResNet, GN-SiLU-conv_out), 1x1 `quant_conv` to the
moments of a diagonal Gaussian posterior, 1x1 `post_quant_conv`, and a mirrored `Decoder`
(UpDecoderBlock2D levels with nearest x2 upsampling). Parameter names follow diffusers' so the
converter in `models/vae_loading.py` reads as a renaming. The VAE is frozen: there is no dropout
and no training mode. Built from a `VAEConfig` (the checked fields of a diffusers config.json).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.attention import dot_product_attention

Dtype = Any
EPS = 1e-6  # diffusers' resnet_eps for every GroupNorm of the VAE.
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this.
DOWN_BLOCK = 'DownEncoderBlock2D'
UP_BLOCK = 'UpDecoderBlock2D'


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers AutoencoderKL config.json that shape the network, checked.

  `source` (the config.json path) only makes error messages name the file.
  """
  block_out_channels: tuple[int, ...]
  in_channels: int = 3
  out_channels: int = 3
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0  # None/absent in config.json -> 0 (SD3/Flux VAEs set it).
  latents_mean: tuple[float, ...] | None = None  # Per-channel statistics some VAEs ship (e.g.
  latents_std: tuple[float, ...] | None = None   # Playground's): z -> (z - mean) * scale / std.
  down_block_types: tuple[str, ...] = ()
  up_block_types: tuple[str, ...] = ()
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  force_upcast: bool = True  # Recorded: diffusers runs such VAEs in float32 even in fp16 pipelines.
  source: str = 'config.json'

  def __post_init__(self):
    src = self.source
    for name in ('block_out_channels', 'down_block_types', 'up_block_types'):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if isinstance(self.sample_size, list):
      object.__setattr__(self, 'sample_size', tuple(self.sample_size))
    if not self.block_out_channels:
      raise ValueError(f'{src}: block_out_channels must be a non-empty list of positive ints.')
    for name in ('in_channels', 'out_channels', 'layers_per_block', 'latent_channels',
                 'norm_num_groups'):
      _positive_int(getattr(self, name), name, src)
    for c in self.block_out_channels:
      _positive_int(c, 'block_out_channels', src)
      if c % self.norm_num_groups:
        raise ValueError(f'{src}: norm_num_groups={self.norm_num_groups} must divide every entry '
                         f'of block_out_channels={list(self.block_out_channels)}.')
    if self.act_fn != 'silu':
      raise ValueError(f"{src}: act_fn={self.act_fn!r} is not supported; only 'silu' (every "
                       'Stable Diffusion VAE) is.')
    levels = len(self.block_out_channels)
    for name, kind in (('down_block_types', DOWN_BLOCK), ('up_block_types', UP_BLOCK)):
      types = getattr(self, name) or (kind,) * levels
      object.__setattr__(self, name, types)
      if len(types) != levels or any(t != kind for t in types):
        raise ValueError(f'{src}: {name}={list(types)} is not supported; it must be {levels} x '
                         f'{kind!r} (one per block_out_channels entry).')
    for name in ('scaling_factor', 'shift_factor'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{src}: {name}={value!r} must be a number.')
      object.__setattr__(self, name, float(value))
    if self.scaling_factor <= 0:
      raise ValueError(f'{src}: scaling_factor={self.scaling_factor} must be positive.')
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError(f'{src}: latents_mean and latents_std must be given together (or both '
                       'null).')
    for name in ('latents_mean', 'latents_std'):
      value = getattr(self, name)
      if value is None:
        continue
      if (not isinstance(value, (list, tuple)) or len(value) != self.latent_channels
          or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ValueError(f'{src}: {name} must be a list of {self.latent_channels} numbers (one '
                         f'per latent channel), got {value!r}.')
      object.__setattr__(self, name, tuple(float(v) for v in value))
    if self.latents_std is not None and min(self.latents_std) <= 0:
      raise ValueError(f'{src}: latents_std={list(self.latents_std)} must be positive.')
    if self.latents_mean is not None and self.shift_factor:
      raise ValueError(f'{src}: shift_factor and latents_mean are both set; a VAE uses one or '
                       'the other.')
    for name in ('mid_block_add_attention', 'use_quant_conv', 'use_post_quant_conv',
                 'force_upcast'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{src}: {name}={getattr(self, name)!r} must be true or false.')

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side: 2 ** (number of levels - 1) (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)


def _positive_int(value: Any, name: str, source: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{source}: {name}={value!r} must be a positive integer.')


class DiagonalGaussian(NamedTuple):
  """N(mean, exp(logvar)) per latent element; the VAE posterior q(z|x) (Kingma & Welling 2014).

  A tuple, so `mean, logvar = vae.encode(params, x)` unpacks it, and a pytree, so it crosses jit.
  """
  mean: jax.Array    # [B, h, w, latent_channels] float32
  logvar: jax.Array  # same shape, clipped to LOGVAR_RANGE

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """quant_conv output [..., 2C] -> (mean = first C channels, logvar = last C, clipped)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (ibid., eq. 10)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example [B], summed over h, w, C (ibid., appendix B)."""
    terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


# ----------------------------------------------------------------------------- building blocks


def _conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, *,
          strides: int = 1, padding: str = 'SAME') -> nn.Conv:
  """Conv with the project's logical axes; 'SAME' at stride 1 = PyTorch padding (k - 1) / 2."""
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=layers.partitioned(nn.initializers.lecun_normal(), layers.CONV_AXES),
      bias_init=layers.partitioned(nn.initializers.zeros, ('conv_out',)), name=name)


def _norm(groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
  """GroupNorm with eps 1e-6 (not layers.group_norm's 1e-5) and float32 statistics."""
  return nn.GroupNorm(
      num_groups=groups, epsilon=EPS, dtype=dtype, param_dtype=param_dtype,
      force_float32_reductions=True,
      scale_init=layers.partitioned(nn.initializers.ones, ('norm',)),
      bias_init=layers.partitioned(nn.initializers.zeros, ('norm',)), name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding: GN-SiLU-conv, GN-SiLU-conv, 1x1 skip."""
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt, pdt = self.dtype, self.param_dtype
    h = nn.silu(_norm(self.groups, dt, pdt, 'norm1')(x))
    h = _conv(self.out_channels, 3, dt, pdt, 'conv1')(h)
    h = nn.silu(_norm(self.groups, dt, pdt, 'norm2')(h))
    h = _conv(self.out_channels, 3, dt, pdt, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dt, pdt, 'conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """The VAE mid-block self-attention: GN, one head over all h*w pixels, to_out, residual.

  diffusers builds it with heads = channels / attention_head_dim and attention_head_dim =
  channels, i.e. a single head of width C (softmax(q k^T / sqrt(C)) v, Vaswani et al. 2017, eq. 1).
  """
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    dt, pdt = self.dtype, self.param_dtype
    dense = lambda name: nn.Dense(
        c, dtype=dt, param_dtype=pdt, name=name,
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ('conv_in', 'conv_out')),
        bias_init=layers.partitioned(nn.initializers.zeros, ('conv_out',)))
    h = _norm(self.groups, dt, pdt, 'group_norm')(x).reshape(b, hgt * wid, 1, c)
    out = dot_product_attention(dense('to_q')(h), dense('to_k')(h), dense('to_v')(h))
    return x + dense('to_out')(out.reshape(b, hgt, wid, c))


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D of the VAE: ResNet, (attention), ResNet at constant width."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt, pdt = x.shape[-1], self.dtype, self.param_dtype
    x = ResnetBlock(c, self.groups, dt, pdt, name='res_0')(x)
    if self.add_attention:
      x = Attention(self.groups, dt, pdt, name='attn')(x)
    return ResnetBlock(c, self.groups, dt, pdt, name='res_1')(x)


def downsample(x: jax.Array, conv: nn.Conv) -> jax.Array:
  """diffusers' Downsample2D(padding=0): zero-pad a row/column at bottom/right, 3x3 stride 2."""
  return conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


def upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 resize (the conv of Upsample2D follows it)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


# ----------------------------------------------------------------------------- networks


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    groups, chans = cfg.norm_num_groups, cfg.block_out_channels
    h = _conv(chans[0], 3, dt, pdt, 'conv_in')(x.astype(dt))
    for level, c in enumerate(chans):
      for j in range(cfg.layers_per_block):
        h = ResnetBlock(c, groups, dt, pdt, name=f'down_{level}_res_{j}')(h)
      if level != len(chans) - 1:
        conv = _conv(c, 3, dt, pdt, f'down_{level}_downsample', strides=2, padding='VALID')
        h = downsample(h, conv)
    h = MidBlock(groups, cfg.mid_block_add_attention, dt, pdt, name='mid')(h)
    h = nn.silu(_norm(groups, dt, pdt, 'conv_norm_out')(h))
    return _conv(2 * cfg.latent_channels, 3, dt, pdt, 'conv_out')(h)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] (after post_quant_conv) -> [B, h*f, w*f, out_channels].

  Level i runs at block_out_channels[-1 - i] (diffusers' up_blocks are in reversed order), with
  layers_per_block + 1 ResNet blocks and an upsampler on all but the last level.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    groups, chans = cfg.norm_num_groups, tuple(reversed(cfg.block_out_channels))
    h = _conv(chans[0], 3, dt, pdt, 'conv_in')(z.astype(dt))
    h = MidBlock(groups, cfg.mid_block_add_attention, dt, pdt, name='mid')(h)
    for level, c in enumerate(chans):
      for j in range(cfg.layers_per_block + 1):
        h = ResnetBlock(c, groups, dt, pdt, name=f'up_{level}_res_{j}')(h)
      if level != len(chans) - 1:
        h = _conv(c, 3, dt, pdt, f'up_{level}_upsample')(upsample(h))
    h = nn.silu(_norm(groups, dt, pdt, 'conv_norm_out')(h))
    return _conv(cfg.out_channels, 3, dt, pdt, 'conv_out')(h)


class AutoencoderKL(nn.Module):
  """Encoder + quant_conv -> DiagonalGaussian; post_quant_conv + Decoder -> images.

  Call `apply(..., method='encode')` or `method='decode'`; `__call__` (encode, take the mean,
  decode) exists for `init`. Outputs are float32 whatever the compute dtype.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    self.encoder = Encoder(cfg, dt, pdt)
    self.decoder = Decoder(cfg, dt, pdt)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, dt, pdt, None)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, dt, pdt, None)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """images [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels]."""
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels] f32."""
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images).mean)
