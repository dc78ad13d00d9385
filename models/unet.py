"""Text-conditioned U-Net (ADM layout, Dhariwal & Nichol 2021; text conditioning as in Imagen).

The network maps (x, c_noise, text) to a raw output of x's shape; it knows nothing of noise
schedules or parameterisations (that is the preconditioning wrapper's job). Configured by
the `config.model` section; see docs/models.md for every field.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.attention import SpatialAttention

# Rematerialisation policy when `model.remat` is True: save nothing inside a block, i.e.
# recompute each residual/attention block's forward pass during the backward pass. Costs
# about one extra forward per step; keeps only block inputs/outputs alive.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """Validated, typed view of the `config.model` fields the U-Net reads."""
  channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  num_heads: int
  head_dim: int | None
  dropout: float
  norm_groups: int
  dtype: Any
  param_dtype: Any
  remat: bool
  patch_size: int = 1
  coord_channels: bool = False
  pooled_conditioning: bool = True


def _field(cfg: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
  if name in cfg:
    return cfg[name]
  if default is dataclasses.MISSING:
    raise ValueError(f'model.{name} is missing from the config; add it to config.model.')
  return default


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'model.{name} must be a positive integer, got {value!r}.')
  return value


def parse_config(cfg: Any) -> UNetSpec:
  """Reads and checks `config.model`; raises ValueError naming the offending field."""
  channel_mult = _field(cfg, 'channel_mult')
  if not isinstance(channel_mult, (tuple, list)) or not channel_mult:
    raise ValueError(
        f'model.channel_mult must be a non-empty tuple of positive ints, got {channel_mult!r}.')
  channel_mult = tuple(_positive_int(m, 'channel_mult') for m in channel_mult)
  attn_res = _field(cfg, 'attn_resolutions')
  if not isinstance(attn_res, (tuple, list)):
    raise ValueError(f'model.attn_resolutions must be a tuple of ints, got {attn_res!r}.')
  attn_res = tuple(_positive_int(r, 'attn_resolutions') for r in attn_res)
  head_dim = _field(cfg, 'head_dim', None)
  if head_dim is not None:
    head_dim = _positive_int(head_dim, 'head_dim')
  dropout = _field(cfg, 'dropout', 0.0)
  if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
    raise ValueError(f'model.dropout must be a float in [0, 1), got {dropout!r}.')
  remat = _field(cfg, 'remat', False)
  if not isinstance(remat, bool):
    raise ValueError(f'model.remat must be True or False, got {remat!r}.')
  return UNetSpec(
      channels=_positive_int(_field(cfg, 'channels'), 'channels'),
      channel_mult=channel_mult,
      num_res_blocks=_positive_int(_field(cfg, 'num_res_blocks'), 'num_res_blocks'),
      attn_resolutions=attn_res,
      num_heads=_positive_int(_field(cfg, 'num_heads'), 'num_heads'),
      head_dim=head_dim,
      dropout=float(dropout),
      norm_groups=_positive_int(_field(cfg, 'norm_groups', 32), 'norm_groups'),
      dtype=layers.resolve_dtype(_field(cfg, 'dtype', 'float32'), 'model.dtype'),
      param_dtype=layers.resolve_dtype(_field(cfg, 'param_dtype', 'float32'),
                                       'model.param_dtype'),
      remat=remat,
      patch_size=_positive_int(_field(cfg, 'patch_size', 1), 'patch_size'),
      coord_channels=bool(_field(cfg, 'coord_channels', False)),
      pooled_conditioning=bool(_field(cfg, 'pooled_conditioning', True)))


def _heads(spec: UNetSpec, width: int) -> tuple[int, int]:
  """(num_heads, head_dim) for an attention block of `width` channels."""
  if spec.head_dim is not None:
    if width % spec.head_dim:
      raise ValueError(f'model.head_dim={spec.head_dim} must divide the attention width {width}.')
    return width // spec.head_dim, spec.head_dim
  if width % spec.num_heads:
    raise ValueError(
        f'model.num_heads={spec.num_heads} must divide the attention width {width} '
        '(channels * channel_mult at each attention level).')
  return spec.num_heads, width // spec.num_heads


def _check_inputs(spec: UNetSpec, x, c_noise, context, context_mask, pooled) -> None:
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
  sizes = [hgt // 2 ** i for i in range(len(spec.channel_mult))]
  missing = [r for r in spec.attn_resolutions if r not in sizes]
  if missing:
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
  """Text-conditioned U-Net; `config` is the `config.model` section (FrozenConfigDict)."""
  config: Any

  def __post_init__(self):
    layers.freeze_config(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, c_noise: jax.Array, context: jax.Array,
               context_mask: jax.Array, pooled: jax.Array, *, train: bool) -> jax.Array:
    """x [B,H,W,C], c_noise [B], context [B,L,Dt], context_mask [B,L], pooled [B,Dt] -> [B,H,W,C] f32."""
    spec = parse_config(self.config)
    _check_inputs(spec, x, c_noise, context, context_mask, pooled)
    dt, pdt, ch = spec.dtype, spec.param_dtype, spec.channels
    res_cls, attn_cls = layers.ResBlock, SpatialAttention
    if spec.remat:  # self=0, x=1, emb=2, train=3 (static).
      res_cls = nn.remat(layers.ResBlock, static_argnums=(3,), policy=REMAT_POLICY)
      attn_cls = nn.remat(SpatialAttention, policy=REMAT_POLICY)

    def res_block(h, out_channels, name):
      block = res_cls(out_channels, spec.norm_groups, spec.dropout, dt, pdt, name=name)
      return block(h, emb, train)

    def attn_block(h, name):
      heads, head_dim = _heads(spec, h.shape[-1])
      return attn_cls(heads, head_dim, spec.norm_groups, dt, pdt, name=name)(
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
    for level, mult in enumerate(spec.channel_mult):
      for i in range(spec.num_res_blocks):
        h = res_block(h, ch * mult, f'down_{level}_res_{i}')
        if h.shape[1] in spec.attn_resolutions:
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
        if h.shape[1] in spec.attn_resolutions:
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


def count_params(params: Any) -> int:
  """Total number of scalars in a (possibly `nn.Partitioned`-boxed) parameter pytree."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(nn.unbox(params)))
