"""Text-conditioned U-Net (ADM layout, Dhariwal & Nichol 2021; text conditioning as in Imagen).

The network maps (x, c_noise, text) to a raw output of x's shape; it knows nothing of noise
schedules or parameterisations (that is the preconditioning wrapper's job). Configured by a
`UNetSpec`, made from the `config.model` section; see docs/models.md for every field.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention as attention_lib
from models import layers
from models.attention import SpatialAttention

# `model.remat` -> what each residual/attention block keeps for the backward pass; the rest is
# recomputed there. 'none': everything (no remat). 'full': nothing inside a block (about one extra
# forward pass). 'dots': the outputs of matmuls without batch dimensions (attention projections,
# MLPs, embeddings), recomputing convolutions, norms and elementwise work. `checkpoint_dots` would
# also keep the batched attention matmuls (B x heads x L x L logits and weights): at the base
# architecture (32 px, batch 32) the forward keeps 2,025 MiB for the backward with 'none', 354 with
# 'dots', 218 with 'full', and 658 with checkpoint_dots, for matmuls cheap to recompute next to the
# convolutions (docs/models.md).
REMAT_POLICIES = {
    'none': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """The `config.model` section as a typed, frozen, checked value (fields: configs/base.py).

  Built once where the config enters (`configs.specs.build`: the 'unet' family of
  `models.family`); it has no defaults of its own. Dtypes stay names ('float32', 'bfloat16',
  'float16'); `compute_dtype`/`weight_dtype` resolve them.
  """
  channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  num_heads: int
  head_dim: int  # 0: width / num_heads.
  dropout: float
  norm_groups: int
  dtype: str
  param_dtype: str
  remat: str  # One of REMAT_POLICIES; the old booleans are read as True = 'full', False = 'none'.
  attention: str  # models.attention.IMPLEMENTATIONS: 'auto' (cuDNN flash on a GPU), 'xla', 'cudnn'.
  patch_size: int
  coord_channels: bool
  pooled_conditioning: bool

  def __post_init__(self):
    if not isinstance(self.channel_mult, tuple) or not self.channel_mult:
      raise ValueError(f'model.channel_mult must be a non-empty tuple of positive ints, got '
                       f'{self.channel_mult!r}.')
    for m in self.channel_mult:
      _positive_int(m, 'channel_mult')
    if not isinstance(self.attn_resolutions, tuple):
      raise ValueError(f'model.attn_resolutions must be a tuple of ints, got '
                       f'{self.attn_resolutions!r}.')
    for r in self.attn_resolutions:
      _positive_int(r, 'attn_resolutions')
    for name in ('channels', 'num_res_blocks', 'num_heads', 'norm_groups', 'patch_size'):
      _positive_int(getattr(self, name), name)
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
      raise ValueError(f'model.head_dim must be 0 (width / num_heads) or a positive integer, got '
                       f'{self.head_dim!r}.')
    if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'model.dropout must be a float in [0, 1), got {self.dropout!r}.')
    # Configs (and checkpoints) written before the policies hold booleans; --config.model.remat=True
    # on the command line arrives as the string.
    old = {True: 'full', False: 'none', 'True': 'full', 'False': 'none'}
    if isinstance(self.remat, (bool, str)) and self.remat in old:
      object.__setattr__(self, 'remat', old[self.remat])
    if not isinstance(self.remat, str) or self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {', '.join(map(repr, REMAT_POLICIES))} (the "
                       f"old True is 'full', False is 'none'), got {self.remat!r}.")
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f'model.attention must be one of {attention_lib.IMPLEMENTATIONS}, got '
                       f'{self.attention!r}.')
    for name in ('coord_channels', 'pooled_conditioning'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'model.{name} must be True or False, got {getattr(self, name)!r}.')
    layers.resolve_dtype(self.dtype, 'model.dtype')
    layers.resolve_dtype(self.param_dtype, 'model.param_dtype')

  @property
  def compute_dtype(self):
    return layers.resolve_dtype(self.dtype, 'model.dtype')

  @property
  def weight_dtype(self):
    return layers.resolve_dtype(self.param_dtype, 'model.param_dtype')

  def replace(self, **changes) -> UNetSpec:
    return dataclasses.replace(self, **changes)


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'model.{name} must be a positive integer, got {value!r}.')
  return value


def level_heights(spec: UNetSpec, side: int) -> list[int]:
  """Heights of the U-Net's levels (0 = the input) for an input of height `side` (after
  model.patch_size folds patches into channels)."""
  return [side // 2 ** i for i in range(len(spec.channel_mult))]


def attention_levels(spec: UNetSpec, side: int) -> tuple[int, ...]:
  """The levels that get attention: those whose height is in model.attn_resolutions."""
  return tuple(lv for lv, h in enumerate(level_heights(spec, side)) if h in spec.attn_resolutions)


def check_image_size(spec: UNetSpec, size: int, name: str, *, vae_factor: int = 1,
                     attention: bool = True) -> None:
  """Raises ValueError unless images of side `size` (named `name` in the message) fit the U-Net:
  divisible down its levels, in pixels or in latents of an autoencoder that downsamples by
  `vae_factor`, and (with `attention`) with a level at each of model.attn_resolutions."""
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise ValueError(f'{name}={size!r} must be a positive integer.')
  factor = 2 ** (len(spec.channel_mult) - 1) * spec.patch_size
  if size % factor:
    raise ValueError(f'{name}={size} must be divisible by '
                     f'model.patch_size * 2**(len(model.channel_mult)-1)={factor}.')
  where = ''
  if vae_factor > 1:
    where = f" / the autoencoder's {vae_factor}"
    if size % (factor * vae_factor):
      raise ValueError(
          f"{name}={size} must be divisible by the autoencoder's downsampling ({vae_factor}, "
          f'autoencoder.path) x model.patch_size x 2**(len(model.channel_mult)-1) = '
          f'{factor * vae_factor}: the U-Net runs on latents of side image_size / {vae_factor}.')
  heights = level_heights(spec, size // vae_factor // spec.patch_size)
  missing = [r for r in spec.attn_resolutions if r not in heights]
  if missing and attention:
    raise ValueError(
        f'model.attn_resolutions has {missing}, but the U-Net levels ({name}='
        f'{size}{where} / model.patch_size={spec.patch_size}) have heights '
        f'{heights}; use values from that list.')


def _heads(spec: UNetSpec, width: int) -> tuple[int, int]:
  """(num_heads, head_dim) for an attention block of `width` channels."""
  if spec.head_dim:
    if width % spec.head_dim:
      raise ValueError(f'model.head_dim={spec.head_dim} must divide the attention width {width}.')
    return width // spec.head_dim, spec.head_dim
  if width % spec.num_heads:
    raise ValueError(
        f'model.num_heads={spec.num_heads} must divide the attention width {width} '
        '(channels * channel_mult at each attention level).')
  return spec.num_heads, width // spec.num_heads


def _check_inputs(spec: UNetSpec, x, c_noise, context, context_mask, pooled,
                  fixed_levels: bool = False) -> None:
  if x.ndim != 4:
    raise ValueError(f'UNet input x must be NHWC [B, H, W, C], got shape {x.shape}.')
  b, hgt, wid, _ = x.shape
  if hgt % spec.patch_size or wid % spec.patch_size:
    raise ValueError(f'model.patch_size={spec.patch_size} must divide the image size {hgt}x{wid}.')
  hgt, wid = hgt // spec.patch_size, wid // spec.patch_size
  factor = 2 ** (len(spec.channel_mult) - 1)
  if hgt % factor or wid % factor:
    raise ValueError(
        f'Image size {hgt}x{wid} is not divisible by 2**(levels-1)={factor}; use fewer '
        f'levels in model.channel_mult={spec.channel_mult} or another image size.')
  sizes = level_heights(spec, hgt)
  missing = [r for r in spec.attn_resolutions if r not in sizes]
  if missing and not fixed_levels:
    raise ValueError(
        f'model.attn_resolutions has {missing}, but at {hgt}x{wid} (after model.patch_size) the '
        'U-Net levels have '
        f'heights {sizes}; use values from that list.')
  if c_noise.shape != (b,):
    raise ValueError(f'c_noise must have shape [B]=({b},), got {c_noise.shape}.')
  if context.ndim != 3 or context.shape[0] != b:
    raise ValueError(f'context must be [B={b}, L, D], got shape {context.shape}.')
  if context_mask.shape != context.shape[:2]:
    raise ValueError(f'context_mask must be [B, L]={context.shape[:2]}, got {context_mask.shape}.')
  if pooled.ndim != 2 or pooled.shape[0] != b:
    raise ValueError(f'pooled must be [B={b}, D], got shape {pooled.shape}.')


class UNet(nn.Module):
  """Text-conditioned U-Net built from its `UNetSpec`."""
  spec: UNetSpec
  # Levels (0 = the input's resolution) with attention, fixed from the training size by
  # `models.family.build` so that sampling at another size keeps them; None: the levels whose
  # height is in spec.attn_resolutions at the input's size (`attention_levels`).
  attn_levels: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, c_noise: jax.Array, context: jax.Array,
               context_mask: jax.Array, pooled: jax.Array, *, train: bool) -> jax.Array:
    """x [B,H,W,C], c_noise [B], context [B,L,Dt], context_mask [B,L], pooled [B,Dt] -> [B,H,W,C] f32."""
    spec = self.spec
    _check_inputs(spec, x, c_noise, context, context_mask, pooled, self.attn_levels is not None)
    dt, pdt, ch = spec.compute_dtype, spec.weight_dtype, spec.channels
    res_cls, attn_cls = layers.ResBlock, SpatialAttention
    if spec.remat != 'none':  # self=0, x=1, emb=2, train=3 (static).
      policy = REMAT_POLICIES[spec.remat]
      res_cls = nn.remat(layers.ResBlock, static_argnums=(3,), policy=policy)
      attn_cls = nn.remat(SpatialAttention, policy=policy)

    def res_block(h, out_channels, name):
      block = res_cls(out_channels, spec.norm_groups, spec.dropout, dt, pdt, name=name)
      return block(h, emb, train)

    def attn_block(h, name):
      heads, head_dim = _heads(spec, h.shape[-1])
      return attn_cls(heads, head_dim, spec.norm_groups, dt, pdt, spec.attention, name=name)(
          h, context, context_mask)

    # Conditioning: noise embedding + projected pooled text (Imagen, Saharia et al. 2022, sec. 2.2).
    context = layers.layer_norm(dt, pdt, name='context_norm')(context.astype(dt))
    context_mask = context_mask.astype(bool)
    emb = layers.NoiseEmbedding(ch, dt, pdt, name='noise_embed')(c_noise)
    if spec.pooled_conditioning:  # Global (spatially uniform) text signal in every ResBlock.
      pooled = layers.layer_norm(dt, pdt, name='pooled_norm')(pooled.astype(dt))
      emb = emb + layers.dense(4 * ch, ('text_embed', 'mlp'), dt, pdt, name='pooled_proj')(pooled)

    out_channels, p = x.shape[-1], spec.patch_size
    x = space_to_depth(x, p)  # patch_size > 1: the U-Net runs at 1/p resolution (cheaper).
    if spec.coord_channels:
      x = add_coordinates(x)
    h = layers.constrain(layers.conv(ch, 3, dt, pdt, name='conv_in')(x.astype(dt)))
    skips = [h]
    last = len(spec.channel_mult) - 1
    attn_levels = self.attn_levels
    if attn_levels is None:
      attn_levels = attention_levels(spec, h.shape[1])
    for level, mult in enumerate(spec.channel_mult):
      for i in range(spec.num_res_blocks):
        h = res_block(h, ch * mult, f'down_{level}_res_{i}')
        if level in attn_levels:
          h = attn_block(h, f'down_{level}_attn_{i}')
        skips.append(h)
      if level != last:
        h = layers.Downsample(dt, pdt, name=f'down_{level}_downsample')(h)
        skips.append(h)

    h = res_block(h, h.shape[-1], 'mid_res_0')
    h = attn_block(h, 'mid_attn')
    h = res_block(h, h.shape[-1], 'mid_res_1')

    for level in reversed(range(len(spec.channel_mult))):
      for i in range(spec.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, ch * spec.channel_mult[level], f'up_{level}_res_{i}')
        if level in attn_levels:
          h = attn_block(h, f'up_{level}_attn_{i}')
      if level != 0:
        h = layers.Upsample(dt, pdt, name=f'up_{level}_upsample')(h)

    # Output head in float32, zero-initialised so the untrained network outputs exactly 0.
    h = nn.silu(layers.group_norm(h.shape[-1], spec.norm_groups, jnp.float32, pdt,
                                  name='norm_out')(h))
    out = layers.conv(out_channels * p * p, 3, jnp.float32, pdt, zero_init=True, name='conv_out')(h)
    return depth_to_space(out, p).astype(jnp.float32)


def add_coordinates(x: jax.Array) -> jax.Array:
  """Appends (x, y) pixel-centre coordinates in [-1, 1] as two channels (Liu et al. 2018, CoordConv).

  Convolutions and attention are translation-equivariant; prompts such as "a red square to the
  left of a blue circle" need absolute position, which these two channels give at no cost.
  """
  b, h, w, _ = x.shape
  ys = (jnp.arange(h, dtype=x.dtype) + 0.5) / h * 2 - 1
  xs = (jnp.arange(w, dtype=x.dtype) + 0.5) / w * 2 - 1
  grid = jnp.stack(jnp.meshgrid(xs, ys, indexing='xy'), axis=-1)  # [h, w, 2]: (x, y)
  return jnp.concatenate([x, jnp.broadcast_to(grid, (b, h, w, 2))], axis=-1)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: non-overlapping p x p patches as channels."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """Inverse of space_to_depth."""
  if p == 1:
    return x
  b, h, w, cpp = x.shape
  c = cpp // (p * p)
  x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)

