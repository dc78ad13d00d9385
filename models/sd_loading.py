"""Stable Diffusion 1.x/2.x U-Net weights from a local diffusers `unet/` folder (no torch).

The folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or a sharded
`diffusion_pytorch_model.safetensors.index.json` and its shards). `load_sd_unet` checks config.json
(`models.sd_unet.spec_from_config`), converts every tensor (OIHW convs -> HWIO, Linear (out, in) ->
(in, out), attention projections split into [in, heads, head_dim]), checking each shape against
the config and refusing leftovers, and returns the spec and a parameter tree equal in structure,
shapes and dtypes to `SDUNet(spec).init(...)['params']`:

  spec, params = load_sd_unet('/data/stable-diffusion-2-1/unet', dtype='bfloat16')
  out = jax.jit(functools.partial(SDUNet(spec).apply, train=False))(
      {'params': params}, latents, timesteps, text_states, mask, pooled)

Pickled checkpoints (diffusion_pytorch_model.bin, *.ckpt) are refused, never opened.

`save_sd_unet(out, params, source=folder)` writes params (e.g. fine-tuned ones) back in the same
layout, with `source`'s config.json; `diffusers_unet_tensors` is the conversion it writes, the
exact inverse of `convert_diffusers_weights` (derived from it: `weights.invert_conversion`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import weights
from models.sd_unet import (CROSS_DOWN, CROSS_UP, SDUNet, SDUNetSpec, check_sample_side,
                            spec_from_config)

__all__ = ['LoadedSDUNet', 'abstract_params', 'abstract_variables', 'check_sample_side',
           'convert_diffusers_weights', 'diffusers_unet_tensors', 'load_sd_unet', 'read_spec',
           'save_sd_unet']

WEIGHTS = 'diffusion_pytorch_model.safetensors'
_LAYOUT = (f'a diffusers UNet2DConditionModel folder needs config.json and {WEIGHTS} (or its '
           'sharded .index.json), e.g. the unet/ subfolder of a Stable Diffusion 1.x/2.x pipeline')
_CONVERT = ("convert it once where torch is installed: `UNet2DConditionModel.from_pretrained(DIR)"
            ".save_pretrained(DIR, safe_serialization=True)` (diffusers)")


class LoadedSDUNet(NamedTuple):
  """`spec, params = load_sd_unet(...)`; `.fingerprint` names the weights (for caches/logs)."""
  spec: SDUNetSpec
  params: Any  # Plain (unboxed) arrays in spec.param_dtype, the tree of SDUNet(spec).init.

  @property
  def fingerprint(self) -> str:
    """'sd_unet:<config.json path>:dtype=<compute dtype>:<weights.digest of params>'."""
    return f'sd_unet:{self.spec.source}:dtype={self.spec.dtype}:{weights.digest(self.params)}'


# ----------------------------------------------------------------------------- locating files


def read_spec(folder: str, **run_fields: Any) -> SDUNetSpec:
  """The `SDUNetSpec` of FOLDER/config.json (and `run_fields`, see `load_sd_unet`), checked."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    hint = ''
    if os.path.isfile(os.path.join(folder, 'unet', 'config.json')):
      hint = f' (a pipeline folder: point at {os.path.join(folder, "unet")} instead)'
    raise FileNotFoundError(f'{path} not found{hint}: {_LAYOUT}.')
  try:
    with open(path) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); {_LAYOUT}.') from None
  if not isinstance(cfg, dict):
    raise ValueError(f'{path} must hold a JSON object (the UNet2DConditionModel config).')
  return spec_from_config(cfg, path, **run_fields)


def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of diffusion_pytorch_model.safetensors, or of its index's shards."""
  found = weights.read_safetensors(folder, WEIGHTS)
  if found is not None:
    return found
  single = os.path.join(folder, WEIGHTS)
  names = sorted(os.listdir(folder))
  pickles = [n for n in names if n.endswith(('.bin', '.ckpt', '.pt', '.pth'))]
  variants = [n for n in names if n.startswith('diffusion_pytorch_model') and
              n.endswith('.safetensors')]
  if pickles:
    hint = (f' The folder has {pickles}: pickled PyTorch checkpoints, which are never opened '
            f'here (unpickling runs arbitrary code); {_CONVERT}.')
  elif variants:
    hint = (f' The folder has {variants}: rename a variant (e.g. .fp16.safetensors) to {WEIGHTS}.')
  else:
    hint = ''
  raise FileNotFoundError(f'{single} not found: {_LAYOUT}.{hint}')


# ----------------------------------------------------------------------------- conversion


class _UsedTensors:
  """`weights.TensorGetter` that also records which checkpoint names it returned."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str, dtype: Any):
    self.used: set[str] = set()
    self._get = weights.TensorGetter(tensors, source, ('',), dtype)

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    value = self._get(name, shape)
    self.used.add(name)
    return value


def convert_diffusers_weights(get: Any, spec: SDUNetSpec) -> dict[str, Any]:
  """diffusers UNet2DConditionModel tensors (PyTorch layout) -> `SDUNet` params.

  `get(name, shape)` returns the tensor `name`, raising unless its shape is `shape` (the PyTorch
  shape config.json implies).
  """
  chans, n, ctx, temb = (spec.block_out_channels, spec.layers_per_block, spec.cross_attention_dim,
                         spec.time_embed_dim)
  levels = len(chans)

  def conv(p, c_in, c_out, k=3):
    w = get(f'{p}.weight', (c_out, c_in, k, k))
    return {'kernel': np.transpose(w, (2, 3, 1, 0)), 'bias': get(f'{p}.bias', (c_out,))}

  def linear(p, c_in, c_out, out_shape=None, bias=True):
    """Linear (out, in) -> kernel [in, *out_shape]; bias [*out_shape]."""
    out_shape = out_shape or (c_out,)
    out = {'kernel': get(f'{p}.weight', (c_out, c_in)).T.reshape((c_in,) + out_shape)}
    if bias:
      out['bias'] = get(f'{p}.bias', (c_out,)).reshape(out_shape)
    return out

  def norm(p, c):
    return {'scale': get(f'{p}.weight', (c,)), 'bias': get(f'{p}.bias', (c,))}

  def resnet(p, c_in, c_out):
    out = {'norm1': norm(f'{p}.norm1', c_in), 'conv1': conv(f'{p}.conv1', c_in, c_out),
           'time_emb_proj': linear(f'{p}.time_emb_proj', temb, c_out),
           'norm2': norm(f'{p}.norm2', c_out), 'conv2': conv(f'{p}.conv2', c_out, c_out)}
    if c_in != c_out:
      out['conv_shortcut'] = conv(f'{p}.conv_shortcut', c_in, c_out, k=1)
    return out

  def attention(p, inner, kv, heads):
    hd = inner // heads
    qkv = lambda name, c_in: linear(f'{p}.{name}', c_in, inner, (heads, hd), bias=False)
    out = linear(f'{p}.to_out.0', inner, inner)
    return {'to_q': qkv('to_q', inner), 'to_k': qkv('to_k', kv), 'to_v': qkv('to_v', kv),
            'to_out_0': {'kernel': out['kernel'].reshape(heads, hd, inner), 'bias': out['bias']}}

  def block(p, inner, heads):
    return {'norm1': norm(f'{p}.norm1', inner),
            'attn1': attention(f'{p}.attn1', inner, inner, heads),
            'norm2': norm(f'{p}.norm2', inner), 'attn2': attention(f'{p}.attn2', inner, ctx, heads),
            'norm3': norm(f'{p}.norm3', inner),
            'ff': {'net_0_proj': linear(f'{p}.ff.net.0.proj', inner, 8 * inner, (2, 4 * inner)),
                   'net_2': linear(f'{p}.ff.net.2', 4 * inner, inner)}}

  def transformer(p, c, level):
    heads, hd = spec.level_heads(level)
    inner = heads * hd
    proj = linear if spec.use_linear_projection else (lambda q, a, b: conv(q, a, b, k=1))
    out = {'norm': norm(f'{p}.norm', c), 'proj_in': proj(f'{p}.proj_in', c, inner),
           'proj_out': proj(f'{p}.proj_out', inner, c)}
    for t in range(spec.level_transformer_layers(level)):
      out[f'transformer_blocks_{t}'] = block(f'{p}.transformer_blocks.{t}', inner, heads)
    return out

  params: dict[str, Any] = {
      'conv_in': conv('conv_in', spec.in_channels, chans[0]),
      'time_embedding': {'linear_1': linear('time_embedding.linear_1', chans[0], temb),
                         'linear_2': linear('time_embedding.linear_2', temb, temb)}}
  c_prev = chans[0]
  for i, c in enumerate(chans):
    p, down = f'down_blocks.{i}', {}
    for j in range(n):
      down[f'resnets_{j}'] = resnet(f'{p}.resnets.{j}', c_prev, c)
      c_prev = c
      if spec.down_block_types[i] == CROSS_DOWN:
        down[f'attentions_{j}'] = transformer(f'{p}.attentions.{j}', c, i)
    if i != levels - 1:
      down['downsamplers_0'] = {'conv': conv(f'{p}.downsamplers.0.conv', c, c)}
    params[f'down_blocks_{i}'] = down
  params['mid_block'] = {'resnets_0': resnet('mid_block.resnets.0', chans[-1], chans[-1]),
                         'attentions_0': transformer('mid_block.attentions.0', chans[-1],
                                                     levels - 1),
                         'resnets_1': resnet('mid_block.resnets.1', chans[-1], chans[-1])}
  # Skip widths in the order the up path pops them (last pushed first).
  skips = [chans[0]] + [c for i, c in enumerate(chans)
                        for _ in range(n + (i != levels - 1))]
  c_prev = chans[-1]
  for i in range(levels):
    level, p, up = levels - 1 - i, f'up_blocks.{i}', {}
    c = chans[level]
    for j in range(n + 1):
      up[f'resnets_{j}'] = resnet(f'{p}.resnets.{j}', c_prev + skips.pop(), c)
      c_prev = c
      if spec.up_block_types[i] == CROSS_UP:
        up[f'attentions_{j}'] = transformer(f'{p}.attentions.{j}', c, level)
    if level != 0:
      up['upsamplers_0'] = {'conv': conv(f'{p}.upsamplers.0.conv', c, c)}
    params[f'up_blocks_{i}'] = up
  params['conv_norm_out'] = norm('conv_norm_out', chans[0])
  params['conv_out'] = conv('conv_out', chans[0], spec.out_channels)
  return params


# ----------------------------------------------------------------------------- loading


def load_sd_unet(folder: str, **run_fields: Any) -> LoadedSDUNet:
  """Loads a local diffusers UNet2DConditionModel folder: `spec, params = load_sd_unet(...)`.

  Args:
    folder: with config.json and diffusion_pytorch_model.safetensors (or its sharded index).
    **run_fields: dtype ('float32' | 'bfloat16' | 'float16', the compute dtype), param_dtype
      (the dtype the weights are stored in), remat, attention: see `SDUNetSpec`.
  Returns:
    (spec, params); `.fingerprint` is 'sd_unet:<config.json>:dtype=...:<weights.digest>'.
  """
  folder = os.path.abspath(os.path.expanduser(str(folder)))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'SD U-Net folder {folder} not found (or not a folder): {_LAYOUT}.')
  spec = read_spec(folder, **run_fields)
  tensors, source = _read_tensors(folder)
  get = _UsedTensors(tensors, source, spec.weight_dtype)
  params = convert_diffusers_weights(get, spec)
  unused = sorted(set(tensors) - get.used)
  if unused:
    raise ValueError(
        f'{source}: {len(unused)} tensors are not used by the UNet2DConditionModel that '
        f'{spec.source} describes, e.g. {unused[:5]}; is this the U-Net checkpoint for that '
        'config.json (block_out_channels, layers_per_block, block types, '
        'transformer_layers_per_block)?')
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(spec))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if expected != got:  # A bug in the converter, not a user error.
    raise AssertionError(f'converted SD U-Net params do not match the module: {got} vs {expected}')
  return LoadedSDUNet(spec, jax.tree.map(jnp.asarray, params))


def abstract_params(spec: SDUNetSpec) -> Any:
  """ShapeDtypeStructs of `SDUNet(spec).init(...)['params']`, unboxed, without computing them."""
  return nn.meta.unbox(abstract_variables(spec))


@functools.lru_cache(maxsize=8)
def abstract_variables(spec: SDUNetSpec) -> Any:
  """`jax.eval_shape` of `SDUNet(spec).init(...)['params']`: `nn.Partitioned` boxes (logical axis
  names) of ShapeDtypeStructs, for shardings. Traced once per spec (`source` aside), so loading
  the same architecture again skips the tracing."""
  side = 2 ** spec.num_downsamplers
  x = jax.ShapeDtypeStruct((1, side, side, spec.in_channels), jnp.float32)
  c_noise = jax.ShapeDtypeStruct((1,), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, spec.cross_attention_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  pooled = jax.ShapeDtypeStruct((1, spec.cross_attention_dim), jnp.float32)
  init = lambda *a: SDUNet(spec).init(jax.random.key(0), *a, train=False)
  return jax.eval_shape(init, x, c_noise, context, mask, pooled)['params']


# ----------------------------------------------------------------------------- saving


def diffusers_unet_tensors(spec: SDUNetSpec, params: Any) -> dict[str, np.ndarray]:
  """`SDUNet(spec)` params -> {diffusers tensor name: float32 array in PyTorch layout}: the exact
  inverse of `convert_diffusers_weights`, derived from it (`weights.invert_conversion`)."""
  return weights.invert_conversion(
      lambda get: convert_diffusers_weights(get, spec), params,
      f'the U-Net params are not those of the UNet2DConditionModel that {spec.source} describes '
      f'(block_out_channels={list(spec.block_out_channels)}, layers_per_block='
      f'{spec.layers_per_block}); save them with the config.json they were trained from.')


def save_sd_unet(folder: str, params: Any, *, source: str) -> str:
  """Writes `params` as a diffusers UNet2DConditionModel folder that `load_sd_unet` and diffusers
  read: `source`'s config.json copied byte for byte (fine-tuning changes no architecture) and
  float32 diffusion_pytorch_model.safetensors (`weights.write_weights`: never half-written).

  Args:
    folder: destination (created if missing; other files in it are left alone).
    params: `SDUNet` parameters (plain or boxed, any float dtype) of `source`'s architecture.
    source: the U-Net folder the params were trained from (e.g. a pipeline's unet/).
  Returns:
    The absolute folder.
  """
  source = os.path.abspath(os.path.expanduser(str(source)))
  tensors = diffusers_unet_tensors(read_spec(source), params)
  with open(os.path.join(source, 'config.json'), 'rb') as f:
    config = f.read()
  return weights.write_weights(folder, WEIGHTS, tensors, config)
