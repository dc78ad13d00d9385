"""Stable Diffusion 1.x/2.x's U-Net (diffusers' `UNet2DConditionModel`, Rombach et al. 2022,
arXiv:2112.10752) in Flax, NHWC, with our model-family call:

  SDUNet(spec)(x [B,H,W,C], c_noise [B], context [B,L,D], context_mask [B,L], pooled [B,D], *,
               train) -> [B,H,W,C] float32

`c_noise` is diffusers' timestep (float, 0 .. num_train_timesteps - 1, fractional allowed): the
caller maps its noise levels to it. `context` is the text encoder's hidden states (D =
cross_attention_dim); `context_mask` and `pooled` are accepted and ignored, as diffusers' SD
pipelines pass no encoder mask (padding tokens are attended to, as SD was trained). `train` changes
nothing (SD's configs have no dropout).

`SDUNetSpec` holds the config.json keys SD 1.x and 2.x use plus our run fields (dtype, param_dtype,
remat, attention); `spec_from_config` builds it from a parsed config.json and refuses, naming the
key and the file, every key whose value needs a feature this port lacks (SDXL's added embeddings,
class embeddings, LCM's time_cond_proj_dim, ...). Weights: `models.sd_loading.load_sd_unet`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention as attention_lib
from models import layers
from models import lora
from models import sd_blocks
from models.unet import REMAT_POLICIES

CROSS_DOWN, PLAIN_DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
CROSS_UP, PLAIN_UP = 'CrossAttnUpBlock2D', 'UpBlock2D'
MID_BLOCK = 'UNetMidBlock2DCrossAttn'


@dataclasses.dataclass(frozen=True)
class SDUNetSpec:
  """The UNet2DConditionModel config keys SD 1.x/2.x use (defaults: diffusers'), and run fields.

  attention_head_dim is, as diffusers reads it for these models, the NUMBER OF HEADS per level
  (diffusers' naming quirk: num_attention_heads defaults to it); num_attention_heads, when set,
  overrides it (diffusers itself still refuses configs that set it). Each head is channels /
  heads wide. Per-level fields are an int (every level) or a tuple with one entry per level.
  """
  sample_size: int | tuple[int, ...] | None = None  # Recorded (the training latent side).
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  mid_block_type: str = MID_BLOCK
  attention_head_dim: int | tuple[int, ...] = 8  # Heads per level (see above).
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 1280  # Width D of `context`.
  use_linear_projection: bool = False  # proj_in/proj_out: Linear (SD 2.x) or 1x1 conv (SD 1.x).
  upcast_attention: bool = False  # q k^T in float32 (SD 2.1 at 768 px).
  transformer_layers_per_block: int | tuple[int, ...] = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5  # ResnetBlock2D and conv_norm_out GroupNorms.
  flip_sin_to_cos: bool = True  # Timestep features [cos | sin] (True) or [sin | cos].
  freq_shift: float = 0  # get_timestep_embedding's downscale_freq_shift.
  act_fn: str = 'silu'
  resnet_time_scale_shift: str = 'default'
  time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0].
  dtype: str = 'float32'  # Compute dtype; norms' statistics, softmax and the output stay float32.
  param_dtype: str = 'float32'
  remat: str = 'none'  # models.unet.REMAT_POLICIES, applied to each resnet and transformer block.
  attention: str = 'auto'  # models.attention.IMPLEMENTATIONS, for the self-attention.
  lora: Any = None  # models.lora.LoRASpec: adapters on its target layers (None: the network alone).
  source: str = dataclasses.field(default='SDUNetSpec', compare=False)  # Names it in errors.

  def __post_init__(self):
    src = self.source
    for name in ('block_out_channels', 'down_block_types', 'up_block_types', 'sample_size',
                 'attention_head_dim', 'num_attention_heads', 'transformer_layers_per_block'):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if not isinstance(self.block_out_channels, tuple) or not self.block_out_channels:
      raise ValueError(f'{src}: block_out_channels={self.block_out_channels!r} must be a '
                       'non-empty list of positive integers.')
    levels = len(self.block_out_channels)
    for name in ('in_channels', 'out_channels', 'layers_per_block', 'cross_attention_dim',
                 'norm_num_groups'):
      _positive_int(getattr(self, name), name, src)
    for c in self.block_out_channels:
      _positive_int(c, 'block_out_channels', src)
      if c % self.norm_num_groups:
        raise ValueError(f'{src}: norm_num_groups={self.norm_num_groups} must divide every entry '
                         f'of block_out_channels={list(self.block_out_channels)}.')
    if self.time_embedding_dim is not None:
      _positive_int(self.time_embedding_dim, 'time_embedding_dim', src)
    for name, allowed in (('down_block_types', (CROSS_DOWN, PLAIN_DOWN)),
                          ('up_block_types', (CROSS_UP, PLAIN_UP))):
      types = getattr(self, name)
      if not isinstance(types, tuple) or len(types) != levels or any(
          t not in allowed for t in types):
        raise ValueError(f'{src}: {name}={_show(types)} is not supported: it must list one of '
                         f'{list(allowed)} per block_out_channels entry ({levels}).')
    if self.mid_block_type != MID_BLOCK:
      raise ValueError(f'{src}: mid_block_type={self.mid_block_type!r} is not supported; only '
                       f'{MID_BLOCK!r} (Stable Diffusion 1.x/2.x) is.')
    if self.act_fn not in ('silu', 'swish'):
      raise ValueError(f"{src}: act_fn={self.act_fn!r} is not supported; only 'silu' is.")
    if self.resnet_time_scale_shift != 'default':
      raise ValueError(f'{src}: resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not '
                       "supported; only 'default' (the time embedding added after conv1) is.")
    for name in ('attention_head_dim', 'num_attention_heads', 'transformer_layers_per_block'):
      self._per_level(name)  # Checks each entry.
    for level, c in enumerate(self.block_out_channels):
      heads = self._per_level('num_attention_heads' if self.num_attention_heads is not None
                              else 'attention_head_dim')[level]
      if heads > c:
        raise ValueError(f'{src}: {heads} attention heads at level {level} (attention_head_dim / '
                         f'num_attention_heads: the number of heads) exceed its {c} channels.')
    for name in ('use_linear_projection', 'upcast_attention', 'flip_sin_to_cos'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{src}: {name}={getattr(self, name)!r} must be true or false.')
    for name in ('norm_eps', 'freq_shift'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{src}: {name}={value!r} must be a number.')
    if self.norm_eps <= 0:
      raise ValueError(f'{src}: norm_eps={self.norm_eps} must be positive.')
    if not isinstance(self.remat, str) or self.remat not in REMAT_POLICIES:
      raise ValueError(f"SD U-Net remat must be one of {', '.join(map(repr, REMAT_POLICIES))}, "
                       f'got {self.remat!r}.')
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f'SD U-Net attention must be one of {attention_lib.IMPLEMENTATIONS}, got '
                       f'{self.attention!r}.')
    layers.resolve_dtype(self.dtype, 'SD U-Net dtype')
    layers.resolve_dtype(self.param_dtype, 'SD U-Net param_dtype')

  def _per_level(self, name: str) -> tuple[int, ...]:
    value, levels = getattr(self, name), len(self.block_out_channels)
    if name == 'num_attention_heads' and value is None:
      return ()
    values = value if isinstance(value, tuple) else (value,) * levels
    if len(values) != levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                    for v in values):
      raise ValueError(f'{self.source}: {name}={_show(value)} must be a positive integer or a '
                       f'list of {levels} of them (one per block_out_channels entry).')
    return values

  def level_heads(self, level: int) -> tuple[int, int]:
    """(number of heads, head width) of the transformers at `level` (0 = the input's)."""
    name = 'attention_head_dim' if self.num_attention_heads is None else 'num_attention_heads'
    heads = self._per_level(name)[level]
    return heads, self.block_out_channels[level] // heads

  def level_transformer_layers(self, level: int) -> int:
    return self._per_level('transformer_layers_per_block')[level]

  @property
  def num_downsamplers(self) -> int:
    return len(self.block_out_channels) - 1

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def compute_dtype(self):
    return layers.resolve_dtype(self.dtype, 'SD U-Net dtype')

  @property
  def weight_dtype(self):
    return layers.resolve_dtype(self.param_dtype, 'SD U-Net param_dtype')

  def replace(self, **changes) -> SDUNetSpec:
    return dataclasses.replace(self, **changes)


def _positive_int(value: Any, name: str, source: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{source}: {name}={value!r} must be a positive integer.')


def _show(value: Any) -> str:
  return repr(list(value) if isinstance(value, tuple) else value)


# ----------------------------------------------------------------------------- config.json

RUN_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention')
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SDUNetSpec)
                       if f.name not in RUN_FIELDS + ('source',))
# Keys accepted only at the value that leaves SD 1.x/2.x's network unchanged: key -> (that value,
# what another value would need).
_FIXED = {
    'center_input_sample': (False, 'the input rescaled to 2x - 1'),
    'downsample_padding': (1, 'another Downsample2D padding'),
    'mid_block_scale_factor': (1, 'mid-block resnet outputs divided by a factor'),
    'dropout': (0, 'dropout (fine-tuning with dropout is not implemented)'),
    'dual_cross_attention': (False, 'DualTransformer2DModel (two text encoders)'),
    'class_embed_type': (None, 'class embeddings added to the time embedding'),
    'num_class_embeds': (None, 'class embeddings added to the time embedding'),
    'projection_class_embeddings_input_dim': (None, 'projected class embeddings (SDXL, SD x4 '
                                              'upscaler)'),
    'class_embeddings_concat': (False, 'class embeddings concatenated to the time embedding'),
    'addition_embed_type': (None, "added conditioning embeddings (SDXL's text_time, Kandinsky)"),
    'addition_time_embed_dim': (None, "SDXL's size/crop time embeddings"),
    'encoder_hid_dim': (None, 'a projection of the text states before cross-attention'),
    'encoder_hid_dim_type': (None, 'a projection of the text states before cross-attention'),
    'time_cond_proj_dim': (None, "a guidance-scale condition on the time embedding (LCM)"),
    'time_embedding_type': ('positional', 'Fourier time features'),
    'time_embedding_act_fn': (None, 'an activation on the time embedding'),
    'timestep_post_act': (None, 'an activation after the time MLP'),
    'conv_in_kernel': (3, 'another conv_in kernel size'),
    'conv_out_kernel': (3, 'another conv_out kernel size'),
    'attention_type': ('default', 'GLIGEN gated attention'),
    'reverse_transformer_layers_per_block': (None, 'an asymmetric U-Net (SDXL refiner-style)'),
    'cross_attention_norm': (None, 'a norm on the text states in cross-attention'),
}
# Keys of UNet2DConditionModel that only act in blocks SD does not use (any value is harmless).
_INERT = ('resnet_skip_time_act', 'resnet_out_scale_factor', 'mid_block_only_cross_attention',
          'addition_embed_type_num_heads')
_UNIFORM = ('layers_per_block', 'cross_attention_dim', 'use_linear_projection')


def spec_from_config(cfg: Mapping[str, Any], source: str, **run_fields: Any) -> SDUNetSpec:
  """A parsed diffusers UNet2DConditionModel config.json (at `source`) -> `SDUNetSpec`.

  Absent keys take diffusers' defaults. ValueError, naming the key and `source`, for a key whose
  value needs a feature this port lacks, and for a key diffusers' UNet2DConditionModel does not
  have. `run_fields`: dtype, param_dtype, remat, attention.
  """
  unknown_run = sorted(set(run_fields) - set(RUN_FIELDS))
  if unknown_run:
    raise TypeError(f'spec_from_config: unknown run fields {unknown_run}; use {RUN_FIELDS}.')
  cls = cfg.get('_class_name', 'UNet2DConditionModel')
  if cls != 'UNet2DConditionModel':
    raise ValueError(f"{source}: _class_name={cls!r} is not supported; only diffusers' "
                     "'UNet2DConditionModel' (the Stable Diffusion 1.x/2.x U-Net) is.")
  for key, (default, needs) in _FIXED.items():
    value = cfg.get(key, default)
    if value != default or type(value) is bool and type(default) is not bool:
      raise ValueError(f'{source}: {key}={value!r} is not supported: it needs {needs}, which this '
                       'Stable Diffusion 1.x/2.x port lacks. Only '
                       f'{key}={default!r} (or no such key) is.')
  only_cross = cfg.get('only_cross_attention', False)
  if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
    raise ValueError(f'{source}: only_cross_attention={only_cross!r} is not supported: SD 1.x/2.x '
                     'transformer blocks have self-attention. Only false is.')
  known = set(_CONFIG_FIELDS) | set(_FIXED) | set(_INERT) | {'only_cross_attention'}
  unknown = sorted(k for k in cfg if not k.startswith('_') and k not in known)
  if unknown:
    raise ValueError(f'{source}: keys {unknown} are not UNet2DConditionModel keys this Stable '
                     'Diffusion 1.x/2.x port knows; is this a UNet2DConditionModel config.json? '
                     '(Remove a key only if it leaves the network unchanged.)')
  # null is diffusers' default only where ours is None too; elsewhere (mid_block_type=null: no mid
  # block, norm_num_groups=null: no norms) the spec's checks refuse it.
  defaults = {f.name: f.default for f in dataclasses.fields(SDUNetSpec)}
  kwargs = {k: cfg[k] for k in _CONFIG_FIELDS if k in cfg and (
      cfg[k] is not None or defaults[k] is not None)}
  for key in _UNIFORM:  # Per-level lists diffusers allows but SD never varies.
    value = kwargs.get(key)
    if isinstance(value, (list, tuple)):
      if not value or any(v != value[0] for v in value):
        raise ValueError(f'{source}: {key}={value!r} varies per level, which is not supported; '
                         'give one value for every level.')
      kwargs[key] = value[0]
  layers_per = kwargs.get('transformer_layers_per_block')
  if isinstance(layers_per, (list, tuple)) and any(isinstance(v, (list, tuple))
                                                    for v in layers_per):
    raise ValueError(f'{source}: transformer_layers_per_block={layers_per!r} gives per-block '
                     'lists (an asymmetric U-Net), which is not supported; give an int or one '
                     'int per level.')
  return SDUNetSpec(**kwargs, **run_fields, source=source)


# ----------------------------------------------------------------------------- the network


def check_sample_side(spec: SDUNetSpec, latent_side: int, name: str) -> None:
  """ValueError naming `name` unless latents of side `latent_side` fit the U-Net: a positive
  multiple of 2 ** (number of downsamplers)."""
  factor = 2 ** spec.num_downsamplers
  if isinstance(latent_side, bool) or not isinstance(latent_side, int) or latent_side <= 0:
    raise ValueError(f'{name}={latent_side!r} must be a positive integer.')
  if latent_side % factor:
    raise ValueError(f'{name}={latent_side} must be divisible by {factor}: the SD U-Net '
                     f'({spec.source}) halves it {spec.num_downsamplers} times '
                     f'(len(block_out_channels) - 1).')


def _check_inputs(spec: SDUNetSpec, x, c_noise, context, context_mask, pooled) -> None:
  if x.ndim != 4 or x.shape[-1] != spec.in_channels:
    raise ValueError(f'SD U-Net input x must be NHWC [B, H, W, in_channels={spec.in_channels}], '
                     f'got shape {x.shape}.')
  b = x.shape[0]
  check_sample_side(spec, x.shape[1], 'SD U-Net input height')
  check_sample_side(spec, x.shape[2], 'SD U-Net input width')
  if c_noise.shape != (b,):
    raise ValueError(f'c_noise (the diffusers timestep) must have shape [B]=({b},), got '
                     f'{c_noise.shape}.')
  if context.ndim != 3 or context.shape[0] != b or context.shape[2] != spec.cross_attention_dim:
    raise ValueError(f'context must be [B={b}, L, cross_attention_dim={spec.cross_attention_dim}] '
                     f'({spec.source}), got shape {context.shape}; is the text encoder the one '
                     'this U-Net was trained with?')
  if context_mask.shape != context.shape[:2]:
    raise ValueError(f'context_mask must be [B, L]={context.shape[:2]}, got {context_mask.shape}.')
  if pooled.ndim != 2 or pooled.shape[0] != b:
    raise ValueError(f'pooled must be [B={b}, D], got shape {pooled.shape}.')


class SDUNet(nn.Module):
  """UNet2DConditionModel: time embedding, conv_in, down blocks, mid block, up blocks with skip
  concatenation, GroupNorm-SiLU-conv_out (the output head in float32)."""
  spec: SDUNetSpec
  takes_timestep = True  # models/denoiser.py: c_noise is diffusers' timestep (models/family.py).

  @nn.compact
  def __call__(self, x: jax.Array, c_noise: jax.Array, context: jax.Array,
               context_mask: jax.Array, pooled: jax.Array, *, train: bool) -> jax.Array:
    """x [B,H,W,C], c_noise = diffusers timestep [B], context [B,L,D] -> [B,H,W,C] float32.

    context_mask and pooled are ignored (SD attends to every token); `train` applies only LoRA's
    dropout (SD 1.x/2.x configs have none).
    """
    with lora.active(self.spec.lora, train):
      return self._forward(x, c_noise, context, context_mask, pooled)

  def _forward(self, x, c_noise, context, context_mask, pooled):
    spec = self.spec
    _check_inputs(spec, x, c_noise, context, context_mask, pooled)
    dt, pdt, c0 = spec.compute_dtype, spec.weight_dtype, spec.block_out_channels[0]
    context = context.astype(dt)
    t_emb = sd_blocks.timestep_embedding(c_noise, c0, spec.flip_sin_to_cos, spec.freq_shift)
    temb = sd_blocks.TimestepEmbedding(spec.time_embed_dim, dt, pdt, name='time_embedding')(t_emb)

    h = sd_blocks.conv(c0, 3, dt, pdt, 'conv_in')(x.astype(dt))
    skips = [h]
    for level in range(len(spec.block_out_channels)):
      h, added = sd_blocks.DownBlock(spec, level, name=f'down_blocks_{level}')(h, temb, context)
      skips += added
    h = sd_blocks.MidBlock(spec, name='mid_block')(h, temb, context)
    n = spec.layers_per_block + 1
    for i in range(len(spec.block_out_channels)):
      h = sd_blocks.UpBlock(spec, i, name=f'up_blocks_{i}')(h, skips[-n:], temb, context)
      skips = skips[:-n]

    norm = layers.GroupNorm(spec.norm_num_groups, spec.norm_eps, jnp.float32, pdt,
                            name='conv_norm_out')
    h = nn.silu(norm(h))
    out = sd_blocks.conv(spec.out_channels, 3, jnp.float32, pdt, 'conv_out')(h)
    return out.astype(jnp.float32)
