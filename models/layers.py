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

from models import conv as conv_lib
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
      bias_init=partitioned(nn.initializers.zeros, ('conv_out',)),
      conv_general_dilated=conv_lib.conv_general_dilated, name=name)


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
  axis 'norm'), float32 statistics and math, written for XLA:CPU's sake in two forms.

  Differentiated (training), it is nn.GroupNorm itself, gradients and all (a `jax.custom_jvp`
  whose rule is flax's function). Evaluated without derivatives (sampling), it takes the
  statistics as per-channel sums over the pixels first, then per group, and folds normalisation,
  scale and bias into one multiply-add per (example, channel). XLA:CPU runs that form faster
  (guided sampling at configs/base.py: 0.90-0.97x the time), but its backward pass lays out
  worse, which is why training keeps flax's (BENCHMARKS.md, issue 17). The two forms agree to
  float32 rounding (tests/test_models_layers.py).
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


def _flax_group_norm(x, scale, bias, groups, epsilon, dtype):
  module = nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype,
                        param_dtype=scale.dtype, force_float32_reductions=True)
  return module.apply({'params': {'scale': scale, 'bias': bias}}, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, groups, epsilon, dtype):
  """The statistics as channel sums first: [B, ..., C] -> [B, C] -> [B, G] (no derivatives)."""
  b, c = x.shape[0], x.shape[-1]
  xf = x.astype(jnp.float32)
  pixels = tuple(range(1, x.ndim - 1))
  count = c // groups * math.prod(x.shape[1:-1])
  per_group = lambda s: jnp.sum(s.reshape(b, groups, c // groups), axis=-1) / count
  mean = per_group(jnp.sum(xf, axis=pixels))
  var = jnp.maximum(per_group(jnp.sum(jnp.square(xf), axis=pixels)) - jnp.square(mean), 0.0)
  per_channel = lambda v: jnp.repeat(v, c // groups, axis=1)  # [B, G] -> [B, C]
  gain = per_channel(jax.lax.rsqrt(var + epsilon)) * scale.astype(jnp.float32)
  shift = bias.astype(jnp.float32) - per_channel(mean) * gain
  expand = lambda v: v.reshape((b,) + (1,) * len(pixels) + (c,))
  return (xf * expand(gain) + expand(shift)).astype(dtype)


@_group_norm.defjvp
def _group_norm_jvp(groups, epsilon, dtype, primals, tangents):
  return jax.jvp(lambda *a: _flax_group_norm(*a, groups, epsilon, dtype), primals, tangents)


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
