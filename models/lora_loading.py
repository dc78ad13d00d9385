"""LoRA adapters as diffusers' LoRA files (pytorch_lora_weights.safetensors), both ways, no torch.

diffusers' `StableDiffusionPipeline.save_lora_weights` writes, and `load_lora_weights(DIR)` reads,
one safetensors file of peft's adapter weights in PyTorch's Linear layout:

  unet.<module>.lora_A.weight   [r, in_features]
  unet.<module>.lora_B.weight   [out_features, r]

<module> being the diffusers path of the adapted Linear
(down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q), with the peft LoraConfig it builds
the layers from in the metadata entry `lora_adapter_metadata`, JSON
{"unet.r": r, "unet.lora_alpha": alpha, "unet.target_modules": [...]}: its scale alpha / r is
ours. Here an adapter is lora_A [*in, r] and lora_B [r, *out] beside its layer's kernel
[*in, *out], which the U-Net loader makes from the Linear's weight by a transpose and reshapes
(models/sd_loading.py), so

  lora_A.weight = A.reshape(in_features, r).T      lora_B.weight = B.reshape(r, out_features).T

Which Linear each of our layers is, and its shape, is read off the loader's conversion itself
(`weights.conversion_sources`), never restated here. Files in kohya's format
(lora_unet_..._lora_down.weight) are refused, not converted.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from models import lora, sd_loading, weights
from models.sd_unet import SDUNetSpec

FILE = 'pytorch_lora_weights.safetensors'  # diffusers' LORA_WEIGHT_NAME_SAFE.
PREFIX = 'unet.'  # diffusers' key prefix of the U-Net's adapters (text encoders': 'text_encoder.').
METADATA = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY.
_WEIGHTS = {'lora_A': '.lora_A.weight', 'lora_B': '.lora_B.weight'}  # Our name -> key suffix.
# Metadata entries (peft LoraConfig fields) that ask for something else than W + (alpha/r) x A B.
_UNSUPPORTED = ('rank_pattern', 'alpha_pattern', 'use_rslora', 'use_dora', 'lora_bias')
_CONVERT = ('load it in diffusers (pipe.load_lora_weights(FILE)) and save it again with '
            'StableDiffusionPipeline.save_lora_weights(DIR, unet_lora_layers='
            'peft.get_peft_model_state_dict(pipe.unet))')


class Linear(NamedTuple):
  """A layer LoRA can adapt, as diffusers names and shapes it."""
  name: str  # Its diffusers module path ('mid_block.attentions.0.transformer_blocks.0.attn1.to_q').
  target: str  # Its `lora.TARGETS` name: 'to_q', 'to_out.0', 'ff.net.0.proj', ...
  in_features: int
  out_features: int


@functools.lru_cache(maxsize=8)
def linear_layers(spec: SDUNetSpec) -> dict[tuple[str, ...], Linear]:
  """{module path in `SDUNet(spec)`'s params: its Linear} for every layer LoRA can adapt."""
  modules = {module: target for target, module in lora.TARGETS.items()}
  sources = weights.conversion_sources(lambda get: sd_loading.convert_diffusers_weights(get, spec))
  layers = {}
  for path, (name, shape, steps) in sources.items():
    if path[-1] != 'kernel' or path[-2] not in modules:
      continue
    # A Linear's (out, in) weight transposed, then only reshaped: kernel.reshape(in, out) == W.T.
    if (len(shape) != 2 or not steps or steps[0] != ('transpose', (1, 0))
        or any(kind != 'reshape' for kind, _ in steps[1:]) or not name.endswith('.weight')):
      raise AssertionError(f'{name}: the loader does not read it as a Linear layer ({steps}).')
    layers[path[:-1]] = Linear(name[:-len('.weight')], modules[path[-2]], shape[1], shape[0])
  return layers


def _modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
  """(module path, its dict) of every module of a nested dict that holds an adapter."""
  if lora.ADAPTERS[0] in tree:
    yield path, tree
    return
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _modules(value, path + (name,))


def diffusers_tensors(spec: SDUNetSpec, adapters: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The adapters of `SDUNet(spec)` (a nested dict, e.g. `lora.split`'s) -> {diffusers key:
  float32 array in PyTorch's layout}, what FILE holds."""
  layers, tensors = linear_layers(dataclasses.replace(spec, lora=None)), {}
  for path, module in _modules(adapters):
    layer = layers.get(path)
    if layer is None:
      raise ValueError(f'adapter {"/".join(path)} is not a layer LoRA can adapt in the U-Net of '
                       f'{spec.source}.')
    a, b = (np.asarray(module[n], np.float32) for n in lora.ADAPTERS)
    rank = a.shape[-1]
    tensors[PREFIX + layer.name + _WEIGHTS['lora_A']] = np.ascontiguousarray(
        a.reshape(layer.in_features, rank).T)
    tensors[PREFIX + layer.name + _WEIGHTS['lora_B']] = np.ascontiguousarray(
        b.reshape(rank, layer.out_features).T)
  return tensors


def adapter_metadata(spec: lora.LoRASpec) -> dict[str, Any]:
  """The LoraConfig fields diffusers builds the adapters from, as `save_lora_weights(...,
  unet_lora_adapter_metadata=...)` writes them (keys under PREFIX)."""
  config = {'r': spec.rank, 'lora_alpha': spec.effective_alpha,
            'target_modules': list(spec.targets)}
  return {PREFIX + key: value for key, value in config.items()}


def save(folder: str, unet: SDUNetSpec, adapters: Mapping[str, Any], spec: lora.LoRASpec) -> str:
  """Writes `adapters` (of `SDUNet(unet)`, rank and scale `spec`) as folder/FILE, which diffusers'
  `pipe.load_lora_weights(folder)` loads (never half-written: `weights.write_weights`). Returns
  the file's path."""
  metadata = {METADATA: json.dumps(adapter_metadata(spec), indent=2, sort_keys=True)}
  folder = weights.write_weights(folder, FILE, diffusers_tensors(unet, adapters), None,
                                 metadata=metadata)
  return os.path.join(folder, FILE)


# ----------------------------------------------------------------------------- reading


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """(tensors, the parsed METADATA or {}, the file) of a LoRA file or of folder/FILE."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(str(path)))
  if os.path.isdir(path):
    path = os.path.join(path, FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: name a diffusers LoRA file ({FILE}, as '
                            "diffusers' save_lora_weights writes) or the folder holding it.")
  try:
    with safe_open(path, 'np') as f:
      tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own errors)
    raise ValueError(f'{path} is not a readable safetensors file ({e}).') from None
  try:
    config = json.loads(metadata.get(METADATA) or '{}')
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: its {METADATA} metadata is not JSON ({e}).') from None
  return tensors, config, path


def _checked_keys(tensors: Mapping[str, np.ndarray], layers: dict[str, Linear], path: str
                  ) -> dict[tuple[str, str], str]:
  """{(module name, 'lora_A'|'lora_B'): key} of a file's keys, refusing any other key."""
  keys = sorted(tensors)
  kohya = [k for k in keys if k.startswith(('lora_unet_', 'lora_te')) or '.lora_down.' in k]
  if kohya:
    raise ValueError(f'{path} is a LoRA file in kohya\'s format ({kohya[0]!r}): only diffusers\' '
                     f'peft format is read ({PREFIX}<module>.lora_A.weight / .lora_B.weight); '
                     f'{_CONVERT}.')
  found = {}
  for key in keys:
    module, kind = key[len(PREFIX):], None
    for ours, suffix in _WEIGHTS.items():
      if key.startswith(PREFIX) and module.endswith(suffix):
        module, kind = module[:-len(suffix)], ours
    if kind is None or module not in layers:
      what = ('a text encoder\'s adapter: only the U-Net\'s are read'
              if key.startswith('text_encoder') else
              f'not {PREFIX}<module>.lora_A.weight / .lora_B.weight of a layer LoRA can adapt '
              f'in this U-Net ({", ".join(lora.TARGETS)})')
      raise ValueError(f'{path}: key {key!r} matches no layer of the network: it is {what}.')
    found[module, kind] = key
  if not found:
    raise ValueError(f'{path} holds no tensors.')
  return found


def read(path: str, unet: SDUNetSpec) -> tuple[dict, lora.LoRASpec]:
  """A diffusers LoRA file (or the folder holding FILE) -> (the adapters as `lora.split` gives
  them from `SDUNet(unet)` with that LoRA, numpy float32; its `LoRASpec`, dropout 0).

  The rank is the file's, alpha its metadata's (none: alpha = rank, as diffusers reads such a
  file), the targets those its keys adapt, each of which must then be in the file for every layer
  it names. Raises ValueError naming the file and the first key that matches no layer of `unet`,
  or has the shape of another base model's, or is missing; or for a kohya-format file.
  """
  tensors, config, path = _read(path)
  base = dataclasses.replace(unet, lora=None)
  layers = {layer.name: layer for layer in linear_layers(base).values()}
  found = _checked_keys(tensors, layers, path)
  ranks = {tensors[key].shape[0] if kind == 'lora_A' else tensors[key].shape[-1]
           for (_, kind), key in found.items() if tensors[key].ndim == 2}
  rank = config.get(PREFIX + 'r') or min(ranks or {0})
  for (module, kind), key in sorted(found.items(), key=lambda item: item[1]):
    layer = layers[module]
    want = (rank, layer.in_features) if kind == 'lora_A' else (layer.out_features, rank)
    if tuple(tensors[key].shape) != want:
      raise ValueError(f'{path}: {key!r} has shape {tuple(tensors[key].shape)}, but this U-Net '
                       f'({unet.source}) needs {want} (rank {rank}): the file adapts another base '
                       'model, or gives its layers other ranks (jaxdiff\'s LoRA has one rank).')
  unsupported = [k for k in _UNSUPPORTED if config.get(PREFIX + k)]
  if unsupported:
    raise ValueError(f'{path}: its {METADATA} sets {PREFIX}{unsupported[0]}='
                     f'{config[PREFIX + unsupported[0]]!r}: only plain LoRA, W + (alpha / r) A B '
                     'with one rank and alpha, is read.')
  targets = tuple(t for t in lora.TARGETS if any(layers[m].target == t for m, _ in found))
  for layer in sorted(layers.values()):
    for kind, suffix in _WEIGHTS.items():
      if layer.target in targets and (layer.name, kind) not in found:
        raise ValueError(f'{path}: {PREFIX}{layer.name}{suffix} is missing: jaxdiff\'s LoRA adapts '
                         f'every {layer.target!r} layer of the U-Net, and the file adapts some.')
  spec = lora.LoRASpec(rank=int(rank), alpha=float(config.get(PREFIX + 'lora_alpha') or rank),
                       targets=targets, dropout=0.0)
  abstract, _ = lora.split(sd_loading.abstract_params(dataclasses.replace(unet, lora=spec)))
  adapters = {}
  for path_, module in _modules(abstract):
    name = linear_layers(base)[path_].name
    node = adapters
    for key in path_:
      node = node.setdefault(key, {})
    for kind in lora.ADAPTERS:
      value = np.asarray(tensors[PREFIX + name + _WEIGHTS[kind]], np.float32).T
      node[kind] = np.ascontiguousarray(value.reshape(module[kind].shape))
  return adapters, spec
