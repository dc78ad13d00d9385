"""Reading pretrained weights: shape-checked tensor lookup and a digest that fingerprints them.

Shared by the frozen text encoders (text/pretrained.py) and the autoencoder (models/vae_loading.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np


class TensorGetter:
  """`get(names, shape)`: first tensor present under `names` (any known prefix), shape-checked."""

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str, prefixes: Sequence[str],
               dtype: Any):
    self._tensors, self._source, self._prefixes, self._dtype = tensors, source, prefixes, dtype

  def __call__(self, names: str | tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    names = (names,) if isinstance(names, str) else names
    for name in names:
      for prefix in self._prefixes:
        if prefix + name in self._tensors:
          value = self._tensors[prefix + name]
          if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f'{self._source}: tensor {prefix + name!r} has shape {tuple(value.shape)} but '
                f'config.json implies {tuple(shape)}; the weights and config.json do not match.')
          return np.asarray(value, self._dtype)
    raise ValueError(f'{self._source}: tensor {names[0]!r} is missing (looked for '
                     f'{[p + n for n in names for p in self._prefixes]}); is this checkpoint the '
                     'architecture config.json names?')


def digest(params: Any) -> str:
  """sha256 (16 hex digits) of every parameter name and shape plus the leading values of a few."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  digest = hashlib.sha256()
  for key, leaf in leaves:
    digest.update(f'{jax.tree_util.keystr(key)}{tuple(leaf.shape)}'.encode())
  for _, leaf in leaves[:: max(1, len(leaves) // 4)]:
    digest.update(np.asarray(np.ravel(leaf)[:4096], np.float32).tobytes())
  return digest.hexdigest()[:16]


def read_safetensors(folder: str, filename: str) -> tuple[dict[str, np.ndarray], str] | None:
  """(tensors, source) of `folder/filename`, or of the shards its `.index.json` lists; None if
  neither is there. A listed shard that is missing raises FileNotFoundError naming it."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  single = os.path.join(folder, filename)
  index = os.path.splitext(single)[0] + '.safetensors.index.json'
  if os.path.isfile(single):
    return load_file(single), single
  if not os.path.isfile(index):
    return None
  with open(index) as f:
    shards = sorted(set(json.load(f)['weight_map'].values()))
  tensors = {}
  for shard in shards:
    path = os.path.join(folder, shard)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: {index} lists it as a shard of the weights.')
    tensors.update(load_file(path))
  return tensors, index


def dataclass_fields(cls, cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The keyword arguments of dataclass `cls` found in a parsed config.json (None counts as
  absent); a missing required field is a ValueError naming `source`."""
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name in cfg and cfg[field.name] is not None:
      kwargs[field.name] = cfg[field.name]
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ValueError(f'{source}: required field {field.name!r} is missing.')
  return kwargs
