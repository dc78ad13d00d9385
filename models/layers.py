"""U-Net building blocks: dtype/norm helpers, noise embedding, residual block, resampling.

Every parameter is created through `nn.with_logical_partitioning` so that `init` returns
`nn.Partitioned` boxes; the axis vocabulary is the project's (see docs/models.md).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import lora

Dtype = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Logical axis names of the main activations at block boundaries.
ACTIVATION_AXES = ('batch', 'height', 'width', 'channels')

CONV_AXES = (None, None, 'conv_in', 'conv_out')


def resolve_dtype(name: Any, field: str) -> Dtype:
  """Maps a config dtype string ('float32' | 'bfloat16' | 'float16') to a jnp dtype."""
  if not isinstance(name, str) or name not in DTYPES:
    raise ValueError(
        f'{field} must be one of {sorted(DTYPES)}, got {name!r}; set it in the config.')
  return DTYPES[name]


def group_count(channels: int, groups: int) -> int:
  """Largest divisor of `channels` that is <= `groups` (GroupNorm needs groups | channels)."""
  groups = max(1, min(int(groups), int(channels)))
  while channels % groups:
    groups -= 1
  return groups


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Transformer sinusoidal features [cos | sin] of a [B] array (Vaswani et al. 2017, sec. 3.5)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def partitioned(init: Any, names: tuple[str | None, ...]) -> Any:
  """Initializer returning an `nn.Partitioned` box with the given logical axis names."""
  return nn.with_logical_partitioning(init, names)


def constrain(h: jax.Array) -> jax.Array:
  """Logical sharding constraint on an NHWC activation (a no-op without axis rules)."""
  return nn.with_logical_constraint(h, ACTIVATION_AXES)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, *, strides: int = 1,
         zero_init: bool = False, name: str | None = None) -> nn.Conv:
  """Conv with 'SAME' padding and logical axes (None, None, 'conv_in', 'conv_out')."""
  kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding='SAME', dtype=dtype,
      param_dtype=param_dtype, kernel_init=partitioned(kernel_init, CONV_AXES),
      bias_init=partitioned(nn.initializers.zeros, ('conv_out',)), name=name)


def dense(features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype,
          name: str | None = None) -> nn.Dense:
  """Dense layer whose kernel carries `axes` and whose bias carries `axes[1]`."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype,
      kernel_init=partitioned(nn.initializers.lecun_normal(), axes),
      bias_init=partitioned(nn.initializers.zeros, (axes[1],)), name=name)


def group_norm(channels: int, groups: int, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> GroupNorm:
  """GroupNorm with float32 statistics, groups clamped to a divisor of `channels`."""
  return GroupNorm(group_count(channels, groups), 1e-5, dtype, param_dtype, name=name)


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018): nn.GroupNorm's parameters ('scale', 'bias': [C], logical
  axis 'norm'), float32 statistics and math, written for XLA:CPU's sake.

  The statistics are per-channel sums over the pixels first, then per group, and normalisation,
  scale and bias fold into one multiply-add per (example, channel). Its gradient is written out
  the same way (a `jax.custom_vjp`): per-channel sums of dy and dy * x over the pixels, then per
  group, and dx as one multiply-add of dy and x per (example, channel). Differentiating the
  forward form instead lays out worse on XLA:CPU (BENCHMARKS.md, issue 17). Values and gradients
  agree with nn.GroupNorm's to float32 rounding (tests/test_models_layers.py).
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {self.num_groups} groups must divide the {c} channels.')
    scale = self.param('scale', partitioned(nn.initializers.ones, ('norm',)), (c,),
                       self.param_dtype)
    bias = self.param('bias', partitioned(nn.initializers.zeros, ('norm',)), (c,),
                      self.param_dtype)
    return _group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)


def _channel_sums(v: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, C]: sums over the pixels, the contiguous channel axis kept."""
  return jnp.sum(v, axis=tuple(range(1, v.ndim - 1)))


def _per_pixel(v: jax.Array, ndim: int) -> jax.Array:
  """[B, C] -> [B, 1, ..., 1, C], to broadcast over an ndim-dimensional [B, ..., C]."""
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[-1],))


def _group_mean(v: jax.Array, groups: int, count: int) -> jax.Array:
  """[B, C] channel sums -> [B, C]: each channel gets its group's mean (`count` values a group)."""
  b, c = v.shape
  means = jnp.sum(v.reshape(b, groups, c // groups), axis=-1) / count
  return jnp.repeat(means, c // groups, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, groups, epsilon, dtype):
  return _group_norm_fwd(x, scale, bias, groups, epsilon, dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon, dtype):
  xf = x.astype(jnp.float32)
  count = x.shape[-1] // groups * math.prod(x.shape[1:-1])
  mean = _group_mean(_channel_sums(xf), groups, count)  # [B, C]
  var = jnp.maximum(_group_mean(_channel_sums(jnp.square(xf)), groups, count) - jnp.square(mean),
                    0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  gain = rstd * scale.astype(jnp.float32)
  shift = bias.astype(jnp.float32) - mean * gain
  y = (xf * _per_pixel(gain, x.ndim) + _per_pixel(shift, x.ndim)).astype(dtype)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, epsilon, dtype, residuals, dy):
  """With xhat = (x - mean) * rstd and g = dy * scale: dscale = sum dy * xhat, dbias = sum dy,
  dx = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat))."""
  del epsilon, dtype
  x, scale, bias, mean, rstd = residuals
  xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
  count = x.shape[-1] // groups * math.prod(x.shape[1:-1])
  sum_dy = _channel_sums(dyf)  # [B, C]
  sum_dy_xhat = (_channel_sums(dyf * xf) - mean * sum_dy) * rstd
  gamma = scale.astype(jnp.float32)
  mean_g = _group_mean(sum_dy * gamma, groups, count)
  mean_g_xhat = _group_mean(sum_dy_xhat * gamma, groups, count)
  # dx = a * dy + b * x + c per (example, channel).
  a = rstd * gamma
  b = -rstd * rstd * mean_g_xhat
  c = rstd * (mean * rstd * mean_g_xhat - mean_g)
  nd = x.ndim
  dx = dyf * _per_pixel(a, nd) + xf * _per_pixel(b, nd) + _per_pixel(c, nd)
  return (dx.astype(x.dtype), jnp.sum(sum_dy_xhat, axis=0).astype(scale.dtype),
          jnp.sum(sum_dy, axis=0).astype(bias.dtype))


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis with float32 statistics and ('norm',) parameters."""
  return nn.LayerNorm(
      epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, force_float32_reductions=True,
      scale_init=partitioned(nn.initializers.ones, ('norm',)),
      bias_init=partitioned(nn.initializers.zeros, ('norm',)), name=name)


class NoiseEmbedding(nn.Module):
  """sinusoid(100 * c_noise) -> Dense-SiLU-Dense to 4*channels (DDPM, Ho et al. 2020, App. B)."""
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c_noise: jax.Array) -> jax.Array:
    emb = sinusoidal_embedding(100.0 * c_noise, self.channels)
    emb = dense(4 * self.channels, ('embed', 'mlp'), self.dtype, self.param_dtype,
                name='dense_0')(emb)
    emb = nn.silu(emb)
    return dense(4 * self.channels, ('mlp', 'embed'), self.dtype, self.param_dtype,
                 name='dense_1')(emb)


class ResBlock(nn.Module):
  """GN-SiLU-conv, FiLM by the noise embedding, GN-SiLU-dropout-conv, 1x1 skip (ADM, Dhariwal & Nichol 2021)."""
  out_channels: int
  norm_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    c_in, c_out = x.shape[-1], self.out_channels
    h = group_norm(c_in, self.norm_groups, self.dtype, self.param_dtype, name='norm_0')(x)
    h = conv(c_out, 3, self.dtype, self.param_dtype, name='conv_0')(nn.silu(h))
    # FiLM: per-channel scale and shift predicted from the noise (+ pooled text) embedding.
    film = dense(2 * c_out, ('mlp', 'embed'), self.dtype, self.param_dtype,
                 name='film')(nn.silu(emb))
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = group_norm(c_out, self.norm_groups, self.dtype, self.param_dtype, name='norm_1')(h)
    h = nn.silu(h * (1.0 + scale) + shift)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(c_out, 3, self.dtype, self.param_dtype, name='conv_1')(h)
    if c_in != c_out:
      x = conv(c_out, 1, self.dtype, self.param_dtype, name='skip')(x)
    return constrain(x + h)


class Downsample(nn.Module):
  """Halves height and width with a stride-2 3x3 conv."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = conv(x.shape[-1], 3, self.dtype, self.param_dtype, strides=2, name='conv')(x)
    return constrain(h)


class Upsample(nn.Module):
  """Doubles height and width: nearest-neighbour resize, then a 3x3 conv."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return constrain(conv(c, 3, self.dtype, self.param_dtype, name='conv')(x))


class DenseGeneral(nn.Module):
  """nn.DenseGeneral's math and parameter layout ('kernel' [*in, *features], 'bias' [*features]),
  but the kernel is initialised in its final shape with logical axis names.

  flax's DenseGeneral initialises a flat kernel and reshapes it, which fails once a mesh and
  logical rules are active (the flat kernel has fewer dimensions than its names).
  """
  features: int | tuple[int, ...]
  names: tuple[str | None, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  kernel_init: Any = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    feats = self.features if isinstance(self.features, tuple) else (self.features,)
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    axes = tuple(a % x.ndim for a in axes)
    kernel = self.param('kernel', partitioned(self.kernel_init, self.names),
                        tuple(x.shape[a] for a in axes) + feats, self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axes, tuple(range(len(axes)))), ((), ())))
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros_init(), self.names[-len(feats):]),
                        feats, self.param_dtype)
      y = y + bias.astype(self.dtype)
    delta = lora.adapter(self, x, axes, feats, self.names, self.dtype)  # None: not a LoRA target.
    return y if delta is None else y + delta
