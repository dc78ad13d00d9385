"""Reading pretrained weights: shape-checked tensor lookup and a digest that fingerprints them.

Shared by the frozen text encoders (text/pretrained.py) and the autoencoder (models/vae_loading.py).
"""
from __future__ import annotations

import hashlib
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
