"""A small random Stable Diffusion U-Net in diffusers' exact folder layout (numpy only).

`write_random_sd_unet(folder, preset='sd1', **config_overrides)` writes `config.json` (every key
diffusers' UNet2DConditionModel writes, `_class_name` 'UNet2DConditionModel') and float32
`diffusion_pytorch_model.safetensors` under diffusers' tensor names and PyTorch layouts (OIHW
convs, (out, in) Linears), as diffusers' `save_pretrained` would; `shards=N` writes N shards and
`diffusion_pytorch_model.safetensors.index.json` instead. Every tensor is small and random (no
zero-initialised output layers), so outputs compared between implementations are not trivial.

The tensor list comes from `diffusers_shapes(config)`, written here from diffusers' block layout,
independently of `models/sd_loading.py`'s converter, so tests that load these folders check it.

  python -m tools.random_sd_unet /tmp/tiny_sd2 --preset=sd2
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

WEIGHTS = 'diffusion_pytorch_model.safetensors'

# Every UNet2DConditionModel config key, at diffusers' defaults (diffusers 0.42).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    'sample_size': None, 'in_channels': 4, 'out_channels': 4, 'center_input_sample': False,
    'flip_sin_to_cos': True, 'freq_shift': 0,
    'down_block_types': ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
    'mid_block_type': 'UNetMidBlock2DCrossAttn',
    'up_block_types': ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
    'only_cross_attention': False, 'block_out_channels': [320, 640, 1280, 1280],
    'layers_per_block': 2, 'downsample_padding': 1, 'mid_block_scale_factor': 1, 'dropout': 0.0,
    'act_fn': 'silu', 'norm_num_groups': 32, 'norm_eps': 1e-05, 'cross_attention_dim': 1280,
    'transformer_layers_per_block': 1, 'reverse_transformer_layers_per_block': None,
    'encoder_hid_dim': None, 'encoder_hid_dim_type': None, 'attention_head_dim': 8,
    'num_attention_heads': None, 'dual_cross_attention': False, 'use_linear_projection': False,
    'class_embed_type': None, 'addition_embed_type': None, 'addition_time_embed_dim': None,
    'num_class_embeds': None, 'upcast_attention': False, 'resnet_time_scale_shift': 'default',
    'resnet_skip_time_act': False, 'resnet_out_scale_factor': 1.0,
    'time_embedding_type': 'positional', 'time_embedding_dim': None,
    'time_embedding_act_fn': None, 'timestep_post_act': None, 'time_cond_proj_dim': None,
    'conv_in_kernel': 3, 'conv_out_kernel': 3, 'projection_class_embeddings_input_dim': None,
    'attention_type': 'default', 'class_embeddings_concat': False,
    'mid_block_only_cross_attention': None, 'cross_attention_norm': None,
    'addition_embed_type_num_heads': 64,
}

PRESETS: dict[str, dict[str, Any]] = {
    # SD 1.x's layout, shrunk: 1x1-conv proj_in/proj_out, one head count for every level.
    'sd1': {
        'sample_size': 8, 'block_out_channels': [32, 64], 'layers_per_block': 1,
        'down_block_types': ['CrossAttnDownBlock2D', 'DownBlock2D'],
        'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D'], 'attention_head_dim': 8,
        'cross_attention_dim': 32, 'norm_num_groups': 8,
    },
    # SD 2.x's: Linear proj_in/proj_out, heads per level, upcast attention; three levels, two
    # with transformers, two resnets per level, and two transformer blocks at level 1 and in the
    # mid block (SD 2.x has one; the deeper stacks exercise the loop).
    'sd2': {
        'sample_size': 8, 'block_out_channels': [16, 32, 32], 'layers_per_block': 2,
        'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
        'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
        'attention_head_dim': [2, 4, 4], 'use_linear_projection': True, 'upcast_attention': True,
        'transformer_layers_per_block': [1, 2, 2], 'cross_attention_dim': 24, 'norm_num_groups': 8,
    },
}


def _per_level(value: Any, levels: int) -> list[Any]:
  return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def diffusers_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """{diffusers tensor name: PyTorch shape} of an SD 1.x/2.x UNet2DConditionModel config."""
  shapes: dict[str, tuple[int, ...]] = {}
  chans = list(cfg['block_out_channels'])
  levels = len(chans)
  heads = _per_level(cfg['num_attention_heads'] or cfg['attention_head_dim'], levels)
  depth = _per_level(cfg['transformer_layers_per_block'], levels)
  n = _per_level(cfg['layers_per_block'], levels)[0]
  ctx = _per_level(cfg['cross_attention_dim'], levels)[0]
  temb = cfg['time_embedding_dim'] or 4 * chans[0]

  def conv(p, c_in, c_out, k=3):
    shapes.update({f'{p}.weight': (c_out, c_in, k, k), f'{p}.bias': (c_out,)})

  def linear(p, c_in, c_out, bias=True):
    shapes[f'{p}.weight'] = (c_out, c_in)
    if bias:
      shapes[f'{p}.bias'] = (c_out,)

  def norm(p, c):
    shapes.update({f'{p}.weight': (c,), f'{p}.bias': (c,)})

  def resnet(p, c_in, c_out):
    norm(f'{p}.norm1', c_in)
    conv(f'{p}.conv1', c_in, c_out)
    linear(f'{p}.time_emb_proj', temb, c_out)
    norm(f'{p}.norm2', c_out)
    conv(f'{p}.conv2', c_out, c_out)
    if c_in != c_out:
      conv(f'{p}.conv_shortcut', c_in, c_out, k=1)

  def transformer(p, c, level):
    inner = heads[level] * (c // heads[level])
    norm(f'{p}.norm', c)
    proj = (lambda q, a, b: linear(q, a, b)) if cfg['use_linear_projection'] else (
        lambda q, a, b: conv(q, a, b, k=1))
    proj(f'{p}.proj_in', c, inner)
    for t in range(depth[level]):
      b = f'{p}.transformer_blocks.{t}'
      for attn, kv in (('attn1', inner), ('attn2', ctx)):
        linear(f'{b}.{attn}.to_q', inner, inner, bias=False)
        linear(f'{b}.{attn}.to_k', kv, inner, bias=False)
        linear(f'{b}.{attn}.to_v', kv, inner, bias=False)
        linear(f'{b}.{attn}.to_out.0', inner, inner)
      for i in (1, 2, 3):
        norm(f'{b}.norm{i}', inner)
      linear(f'{b}.ff.net.0.proj', inner, 8 * inner)
      linear(f'{b}.ff.net.2', 4 * inner, inner)
    proj(f'{p}.proj_out', inner, c)

  conv('conv_in', cfg['in_channels'], chans[0])
  linear('time_embedding.linear_1', chans[0], temb)
  linear('time_embedding.linear_2', temb, temb)
  out = chans[0]
  for i, kind in enumerate(cfg['down_block_types']):
    c_in, out = out, chans[i]
    for j in range(n):
      resnet(f'down_blocks.{i}.resnets.{j}', c_in if j == 0 else out, out)
      if kind == 'CrossAttnDownBlock2D':
        transformer(f'down_blocks.{i}.attentions.{j}', out, i)
    if i < levels - 1:
      conv(f'down_blocks.{i}.downsamplers.0.conv', out, out)
  resnet('mid_block.resnets.0', chans[-1], chans[-1])
  transformer('mid_block.attentions.0', chans[-1], levels - 1)
  resnet('mid_block.resnets.1', chans[-1], chans[-1])
  rev = chans[::-1]
  out = rev[0]
  for i, kind in enumerate(cfg['up_block_types']):
    prev, out, c_in = out, rev[i], rev[min(i + 1, levels - 1)]
    for j in range(n + 1):
      skip = c_in if j == n else out
      resnet(f'up_blocks.{i}.resnets.{j}', (prev if j == 0 else out) + skip, out)
      if kind == 'CrossAttnUpBlock2D':
        transformer(f'up_blocks.{i}.attentions.{j}', out, levels - 1 - i)
    if i < levels - 1:
      conv(f'up_blocks.{i}.upsamplers.0.conv', out, out)
  norm('conv_norm_out', chans[0])
  conv('conv_out', chans[0], cfg['out_channels'])
  return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """Small random float32 values: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales
  1 + N(0, 0.1^2), so activations stay O(1) and nothing is zero."""
  rng = np.random.RandomState(seed)
  tensors = {}
  for name, shape in shapes.items():
    if name.endswith('.weight') and len(shape) > 1:
      value = rng.randn(*shape) / np.sqrt(np.prod(shape[1:]))
    elif name.endswith('.weight'):
      value = 1.0 + 0.1 * rng.randn(*shape)
    else:
      value = 0.1 * rng.randn(*shape)
    tensors[name] = value.astype(np.float32)
  return tensors


def random_sd_unet_config(preset: str = 'sd1', **config_overrides: Any) -> dict[str, Any]:
  """The config.json dict of `preset` ('sd1' | 'sd2') with `config_overrides` applied."""
  if preset not in PRESETS:
    raise ValueError(f'preset={preset!r} is not one of {sorted(PRESETS)}.')
  return {'_class_name': 'UNet2DConditionModel', '_diffusers_version': '0.42.1',
          **DIFFUSERS_DEFAULTS, **PRESETS[preset], **config_overrides}


def write_random_sd_unet(folder: str, *, preset: str = 'sd1', seed: int = 0, shards: int = 1,
                         **config_overrides: Any) -> str:
  """Writes a random UNet2DConditionModel folder (see the module docstring); returns its path.

  Args:
    folder: destination (created if missing).
    preset: 'sd1' (SD 1.x-like) or 'sd2' (SD 2.x-like); see PRESETS.
    seed: of the random weights.
    shards: 1 writes diffusion_pytorch_model.safetensors; more writes that many shards and the
      index diffusers writes for sharded checkpoints.
    **config_overrides: config.json keys replacing the preset's.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
    raise ValueError(f'shards={shards!r} must be a positive integer.')
  cfg = random_sd_unet_config(preset, **config_overrides)
  tensors = random_tensors(diffusers_shapes(cfg), seed)
  folder = os.path.abspath(os.path.expanduser(str(folder)))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write('\n')
  if shards == 1:
    save_file(tensors, os.path.join(folder, WEIGHTS), metadata={'format': 'pt'})
    return folder
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    shard = f'diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[s::shards]}
    save_file(part, os.path.join(folder, shard), metadata={'format': 'pt'})
    weight_map.update({n: shard for n in part})
  index = {'metadata': {'total_size': int(sum(t.nbytes for t in tensors.values()))},
           'weight_map': weight_map}
  with open(os.path.join(folder, WEIGHTS.replace('.safetensors', '.safetensors.index.json')),
            'w') as f:
    json.dump(index, f, indent=2)
  return folder


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('folder')
  parser.add_argument('--preset', default='sd1', choices=sorted(PRESETS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shards', type=int, default=1)
  args = parser.parse_args(argv)
  print(write_random_sd_unet(args.folder, preset=args.preset, seed=args.seed, shards=args.shards))


if __name__ == '__main__':
  main()
