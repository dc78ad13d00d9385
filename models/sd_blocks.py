"""The blocks of Stable Diffusion 1.x/2.x's U-Net (diffusers' `UNet2DConditionModel`), NHWC.

Each class is one diffusers module with its parameter names (a dotted index becomes `_`:
`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so the converter in
`models/sd_loading.py` reads as a renaming; `models/sd_unet.py` assembles them. The math is
diffusers' exactly: ResnetBlock2D (GN-SiLU-conv, + projected time embedding, GN-SiLU-conv, 1x1
shortcut), Transformer2DModel (GN eps 1e-6, proj_in, BasicTransformerBlocks, proj_out, residual),
BasicTransformerBlock (LN-self-attention, LN-cross-attention, LN-GEGLU feed-forward, each residual),
Downsample2D (3x3 stride 2, padding 1), Upsample2D (nearest x2, 3x3 conv). Whatever the compute
dtype, GroupNorm/LayerNorm statistics and the softmax are float32; with `upcast` the q k^T
products are too (diffusers' upcast_attention).

Logical axes are the native U-Net's (docs/models.md): convs (None, None, 'conv_in', 'conv_out'),
time projections ('embed', 'mlp') / ('mlp', 'embed'), q/k/v ('embed' | 'text_embed', 'heads',
'kv'), attention output ('heads', 'kv', 'embed'), GEGLU ('embed', None, 'mlp') and ('mlp', 'embed'),
linear proj_in/proj_out like the 1x1 convs they replace ('conv_in', 'conv_out'), norms ('norm',).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention as attention_lib
from models import layers
from models.autoencoder import upsample
from models.unet import REMAT_POLICIES

Dtype = Any
TRANSFORMER_GROUPNORM_EPS = 1e-6  # Transformer2DModel's GroupNorm eps, fixed in diffusers.


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: [sin | cos] (or [cos | sin]) of t * max_period^(-i /
  (dim/2 - freq_shift)), i < dim/2, float32 [B, dim] (DDPM, Ho et al. 2020, App. B)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - freq_shift))  # The same operations, in the same order.
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def maybe_remat(cls: type, remat: str) -> type:
  """`cls` under `nn.remat` with the `model.remat` policy (models.unet.REMAT_POLICIES)."""
  if remat == 'none':
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[remat])


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, *,
          strides: int = 1, padding: Any = 'SAME') -> nn.Conv:
  """Conv with the project's logical axes; 'SAME' at stride 1 is PyTorch's padding (k - 1) / 2."""
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=layers.partitioned(nn.initializers.lecun_normal(), layers.CONV_AXES),
      bias_init=layers.partitioned(nn.initializers.zeros, ('conv_out',)), name=name)


def _dense(features: int | tuple[int, ...], names: tuple[str | None, ...], dtype: Dtype,
           param_dtype: Dtype, name: str, *, axis: int | tuple[int, ...] = -1,
           use_bias: bool = True) -> layers.DenseGeneral:
  return layers.DenseGeneral(features, names, axis=axis, use_bias=use_bias,
                             kernel_init=nn.initializers.lecun_normal(), dtype=dtype,
                             param_dtype=param_dtype, name=name)


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding without cond_proj/post_act)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    dt, pdt = self.dtype, self.param_dtype
    h = _dense(self.features, ('embed', 'mlp'), dt, pdt, 'linear_1')(t_emb.astype(dt))
    return _dense(self.features, ('mlp', 'embed'), dt, pdt, 'linear_2')(nn.silu(h))


class ResnetBlock2D(nn.Module):
  """GN-SiLU-conv1, + time_emb_proj(SiLU(temb)), GN-SiLU-conv2, + (1x1 conv_shortcut of) x."""
  out_channels: int
  groups: int
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    dt, pdt, c_out = self.dtype, self.param_dtype, self.out_channels
    norm = lambda name: layers.GroupNorm(self.groups, self.eps, dt, pdt, name=name)
    h = conv(c_out, 3, dt, pdt, 'conv1')(nn.silu(norm('norm1')(x)))
    t = _dense(c_out, ('mlp', 'embed'), dt, pdt, 'time_emb_proj')(nn.silu(temb))
    h = nn.silu(norm('norm2')(h + t[:, None, None, :]))
    h = conv(c_out, 3, dt, pdt, 'conv2')(h)
    if x.shape[-1] != c_out:
      x = conv(c_out, 1, dt, pdt, 'conv_shortcut')(x)
    return layers.constrain(x + h)


class Attention(nn.Module):
  """diffusers' Attention as SD uses it: bias-free to_q/to_k/to_v, softmax(q k^T / sqrt(d)) v over
  `heads` heads (Vaswani et al. 2017, eq. 1), to_out.0 with bias. Self-attention when `context`
  is None."""
  heads: int
  head_dim: int
  upcast: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = 'auto'  # models.attention.IMPLEMENTATIONS, for the self-attention.

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    dt, pdt = self.dtype, self.param_dtype
    kv_in, kv_axis = (x, 'embed') if context is None else (context, 'text_embed')
    proj = lambda name, inp, axis: _dense((self.heads, self.head_dim), (axis, 'heads', 'kv'),
                                          dt, pdt, name, use_bias=False)(inp)
    q, k, v = proj('to_q', x, 'embed'), proj('to_k', kv_in, kv_axis), proj('to_v', kv_in, kv_axis)
    # Self-attention over pixels may take cuDNN's flash attention; cross-attention to a few text
    # tokens runs the einsum form (as in the native U-Net: `masked` makes 'auto' choose it).
    impl = attention_lib.attention_impl(self.implementation, q, context is not None)
    if self.upcast and impl == 'xla':  # q k^T from float32 q and k (the 1/sqrt(d) scaling too).
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    # (cuDNN takes bfloat16 q, k: their products are exact in float32, where it sums them and
    # takes the softmax, so upcasting would change nothing but the scaling's rounding.)
    out = attention_lib.dot_product_attention(q, k, v, None, impl)
    return _dense(x.shape[-1], ('heads', 'kv', 'embed'), dt, pdt, 'to_out_0', axis=(-2, -1))(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward (Shazeer 2020, arXiv:2002.05202): net.0.proj to 2 x 4*dim, h * GELU(gate)
  with the exact (erf) GELU, net.2 back to dim. The proj kernel is [dim, 2, 4*dim] (value, gate),
  so that sharding the 'mlp' axis keeps each value next to its gate."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt, pdt, dim = self.dtype, self.param_dtype, x.shape[-1]
    y = _dense((2, 4 * dim), ('embed', None, 'mlp'), dt, pdt, 'net_0_proj')(x)
    h = y[..., 0, :] * nn.gelu(y[..., 1, :], approximate=False)
    return _dense(dim, ('mlp', 'embed'), dt, pdt, 'net_2')(h)


class BasicTransformerBlock(nn.Module):
  """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)) (LayerNorm eps 1e-5)."""
  heads: int
  head_dim: int
  upcast: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    dt, pdt = self.dtype, self.param_dtype
    attn = lambda name: Attention(self.heads, self.head_dim, self.upcast, dt, pdt,
                                  self.implementation, name=name)
    norm = lambda name: layers.layer_norm(dt, pdt, name=name)
    x = x + attn('attn1')(norm('norm1')(x))
    x = x + attn('attn2')(norm('norm2')(x), context)
    return x + FeedForward(dt, pdt, name='ff')(norm('norm3')(x))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel on continuous inputs: GroupNorm, proj_in (1x1 conv, or Linear
  with `linear_projection`) to heads * head_dim, `depth` BasicTransformerBlocks over the h*w
  pixels, proj_out back to the input width, plus the input."""
  heads: int
  head_dim: int
  depth: int
  groups: int
  linear_projection: bool
  upcast: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    dt, pdt = self.dtype, self.param_dtype
    b, hgt, wid, c = x.shape
    inner = self.heads * self.head_dim
    h = layers.GroupNorm(self.groups, TRANSFORMER_GROUPNORM_EPS, dt, pdt, name='norm')(x)
    if self.linear_projection:
      h = _dense(inner, ('conv_in', 'conv_out'), dt, pdt, 'proj_in')(h.reshape(b, hgt * wid, c))
    else:
      h = conv(inner, 1, dt, pdt, 'proj_in')(h).reshape(b, hgt * wid, inner)
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast, dt, pdt,
                                self.implementation, name=f'transformer_blocks_{i}')(h, context)
    if self.linear_projection:
      h = _dense(c, ('conv_in', 'conv_out'), dt, pdt, 'proj_out')(h).reshape(b, hgt, wid, c)
    else:
      h = conv(c, 1, dt, pdt, 'proj_out')(h.reshape(b, hgt, wid, inner))
    return layers.constrain(x + h)


class Downsample2D(nn.Module):
  """3x3 conv, stride 2, padding 1 on every side (PyTorch's; 'SAME' would pad only bottom/right)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    down = conv(x.shape[-1], 3, self.dtype, self.param_dtype, 'conv', strides=2,
                padding=((1, 1), (1, 1)))
    return layers.constrain(down(x))


class Upsample2D(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    up = conv(x.shape[-1], 3, self.dtype, self.param_dtype, 'conv')
    return layers.constrain(up(upsample(x)))


# ----------------------------------------------------------------------------- U-Net levels
# `spec` is a models.sd_unet.SDUNetSpec (not imported: that module imports this one).


def _makers(spec: Any, level: int):
  """(resnet(out_channels, name), transformer(name)) for U-Net level `level`, remat applied."""
  dt, pdt = spec.compute_dtype, spec.weight_dtype
  res_cls = maybe_remat(ResnetBlock2D, spec.remat)
  attn_cls = maybe_remat(Transformer2D, spec.remat)
  heads, head_dim = spec.level_heads(level)

  def resnet(out_channels, name):
    return res_cls(out_channels, spec.norm_num_groups, spec.norm_eps, dt, pdt, name=name)

  def transformer(name):
    return attn_cls(heads, head_dim, spec.level_transformer_layers(level), spec.norm_num_groups,
                    spec.use_linear_projection, spec.upcast_attention, dt, pdt, spec.attention,
                    name=name)
  return resnet, transformer


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D / DownBlock2D: (resnet [, transformer]) x layers_per_block, then the
  downsampler except at the last level. Returns (h, the skips it adds for the up path)."""
  spec: Any
  level: int

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array
               ) -> tuple[jax.Array, list[jax.Array]]:
    spec, level = self.spec, self.level
    resnet, transformer = _makers(spec, level)
    cross = spec.down_block_types[level] == 'CrossAttnDownBlock2D'
    skips = []
    for j in range(spec.layers_per_block):
      h = resnet(spec.block_out_channels[level], f'resnets_{j}')(h, temb)
      if cross:
        h = transformer(f'attentions_{j}')(h, context)
      skips.append(h)
    if level != len(spec.block_out_channels) - 1:
      h = Downsample2D(spec.compute_dtype, spec.weight_dtype, name='downsamplers_0')(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the last level's width."""
  spec: Any

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    level = len(self.spec.block_out_channels) - 1
    resnet, transformer = _makers(self.spec, level)
    c = h.shape[-1]
    h = resnet(c, 'resnets_0')(h, temb)
    h = transformer('attentions_0')(h, context)
    return resnet(c, 'resnets_1')(h, temb)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D / UpBlock2D number `index` (0 = the deepest level): (concat the last skip,
  resnet [, transformer]) x (layers_per_block + 1), then the upsampler except on the last."""
  spec: Any
  index: int

  @nn.compact
  def __call__(self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array) -> jax.Array:
    spec, i = self.spec, self.index
    level = len(spec.block_out_channels) - 1 - i
    resnet, transformer = _makers(spec, level)
    cross = spec.up_block_types[i] == 'CrossAttnUpBlock2D'
    skips = list(skips)
    for j in range(spec.layers_per_block + 1):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = resnet(spec.block_out_channels[level], f'resnets_{j}')(h, temb)
      if cross:
        h = transformer(f'attentions_{j}')(h, context)
    if level != 0:
      h = Upsample2D(spec.compute_dtype, spec.weight_dtype, name='upsamplers_0')(h)
    return h
