"""Pretrained weights: shape-checked tensor lookup, a digest that fingerprints them, and the
inverse of a loader's conversion (`invert_conversion`) that writes them back.

Shared by the text encoders (text/pretrained.py, text/clip.py), the autoencoder
(models/vae_loading.py) and the Stable Diffusion U-Net (models/sd_loading.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
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


def read_safetensors(folder: str, filename: str, keep: Callable[[str], bool] | None = None
                     ) -> tuple[dict[str, np.ndarray], str] | None:
  """(tensors, source) of `folder/filename`, or of the shards its `.index.json` lists; None if
  neither is there. A listed shard that is missing raises FileNotFoundError naming it.
  `keep(name)`: read only the tensors it accepts (the others are not loaded)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  single = os.path.join(folder, filename)
  index = os.path.splitext(single)[0] + '.safetensors.index.json'
  if os.path.isfile(single):
    paths, source = [single], single
  elif os.path.isfile(index):
    with open(index) as f:
      paths = [os.path.join(folder, s) for s in sorted(set(json.load(f)['weight_map'].values()))]
    source = index
  else:
    return None
  tensors = {}
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: {index} lists it as a shard of the weights.')
    if keep is None:
      tensors.update(load_file(path))
    else:
      with safe_open(path, 'np') as f:
        tensors.update({k: f.get_tensor(k) for k in f.keys() if keep(k)})
  return tensors, source


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


def write_weights(folder: str, filename: str, tensors: Mapping[str, np.ndarray],
                  config: bytes | None, *, metadata: Mapping[str, str] | None = None) -> str:
  """Writes `tensors` to folder/filename (safetensors with metadata format 'pt', as diffusers and
  transformers write, and `metadata`) and `config` (None: none) to folder/config.json, each to a
  temporary file in `folder` moved into place with os.replace, weights first, so neither is ever
  half-written; other files in `folder` are left alone. Returns the absolute folder (created if
  missing)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = os.path.abspath(os.path.expanduser(str(folder)))
  os.makedirs(folder, exist_ok=True)
  tmp = f'.tmp-{os.getpid()}'
  weights_path, config_path = os.path.join(folder, filename), os.path.join(folder, 'config.json')
  try:
    save_file(dict(tensors), weights_path + tmp, metadata={'format': 'pt', **(metadata or {})})
    mask = os.umask(0o022)  # (Read back at once: os.umask only reads by setting.)
    os.umask(mask)
    os.chmod(weights_path + tmp, 0o666 & ~mask)  # What open() gives; safetensors makes it 0600.
    if config is not None:
      with open(config_path + tmp, 'wb') as f:
        f.write(config)
    os.replace(weights_path + tmp, weights_path)
    if config is not None:
      os.replace(config_path + tmp, config_path)
  finally:
    for path in (weights_path + tmp, config_path + tmp):
      if os.path.exists(path):
        os.remove(path)
  return folder



# ----------------------------------------------------------------------------- writing back


class _Traced:
  """Stands in for checkpoint tensor `name` while a converter runs: records the reshapes and
  transposes that turn it into a parameter leaf, so that `undo` turns the leaf back."""

  def __init__(self, name: str, shape: Sequence[int], steps: tuple = ()):
    self.name, self.shape, self._steps = name, tuple(int(d) for d in shape), steps

  @property
  def steps(self) -> tuple:
    """('reshape', the shape before) and ('transpose', axes), in the order they were applied."""
    return self._steps

  @property
  def source_shape(self) -> tuple[int, ...]:
    """The checkpoint tensor's shape."""
    shape = self.shape
    for kind, arg in reversed(self._steps):
      shape = arg if kind == 'reshape' else tuple(shape[a] for a in np.argsort(arg))
    return tuple(shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def reshape(self, *shape) -> _Traced:
    shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
    if -1 in shape or math.prod(shape) != math.prod(self.shape):
      raise ValueError(f'{self.name!r}: cannot reshape {self.shape} to {shape} (give every size).')
    return _Traced(self.name, shape, self._steps + (('reshape', self.shape),))

  def transpose(self, *axes) -> _Traced:
    if len(axes) == 1 and not isinstance(axes[0], int):
      axes = () if axes[0] is None else tuple(axes[0])
    axes = tuple(axes) or tuple(reversed(range(self.ndim)))
    return _Traced(self.name, tuple(self.shape[a] for a in axes),
                   self._steps + (('transpose', axes),))

  @property
  def T(self) -> _Traced:  # pylint: disable=invalid-name
    return self.transpose()

  def __array_function__(self, func, types, args, kwargs):
    del types
    if func is np.transpose:
      return self.transpose(kwargs.get('axes', args[1] if len(args) > 1 else None))
    return self.__array__()  # Anything else: refused.

  def __array__(self, *args, **kwargs):
    raise TypeError(f'the converter computes with tensor {self.name!r} beyond reshapes and '
                    'transposes: weights.invert_conversion cannot invert it.')

  def undo(self, value: np.ndarray) -> np.ndarray:
    for kind, arg in reversed(self._steps):
      value = value.reshape(arg) if kind == 'reshape' else np.transpose(value, np.argsort(arg))
    return value


def _flat(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _difference(got: dict[str, tuple], want: dict[str, tuple]) -> str:
  """Where two {path: shape} trees differ, briefly."""
  parts = []
  for what, names in (('missing', sorted(set(want) - set(got))),
                      ('unexpected', sorted(set(got) - set(want)))):
    if names:
      parts.append(f'{len(names)} {what} ({", ".join(names[:3])}{", ..." * (len(names) > 3)})')
  shapes = [f'{n} is {got[n]}, not {want[n]}' for n in sorted(set(got) & set(want))
            if got[n] != want[n]]
  if shapes:
    parts.append(f'{len(shapes)} of another shape ({"; ".join(shapes[:3])}'
                 f'{"; ..." * (len(shapes) > 3)})')
  return '; '.join(parts)


def _trace(convert: Callable[[Callable[..., Any]], Any]) -> tuple[dict[tuple, _Traced], set[str]]:
  """({leaf path: its stand-in}, the tensor names read) of `convert(get)` run on stand-ins."""
  read: set[str] = set()

  def get(names: str | tuple[str, ...], shape: tuple[int, ...]) -> _Traced:
    name = names if isinstance(names, str) else names[0]
    if name in read:  # A bug in the converter, not a user error.
      raise AssertionError(f'the converter reads {name!r} twice: it cannot be inverted.')
    read.add(name)
    return _Traced(name, shape)

  return dict(jax.tree_util.tree_flatten_with_path(convert(get))[0]), read


def conversion_sources(convert: Callable[[Callable[..., Any]], Any]
                       ) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], tuple]]:
  """{parameter leaf path (its keys): (checkpoint tensor name, that tensor's shape, the steps
  that made the leaf, see `_Traced.steps`)} of a loader's converter `convert(get)`, traced as
  `invert_conversion` traces it, without reading a tensor."""
  traced, _ = _trace(convert)
  return {tuple(str(getattr(k, 'key', k)) for k in path): (t.name, t.source_shape, t.steps)
          for path, t in traced.items()}


def invert_conversion(convert: Callable[[Callable[..., Any]], Any], params: Any, mismatch: str
                      ) -> dict[str, np.ndarray]:
  """The checkpoint tensors that `convert(get)` turns into `params`: {name: float32 array in the
  checkpoint's layout}, bit for bit (any float parameter dtype widens to float32 exactly).

  `convert(get)` is a loader's converter, `get(names, shape)` handing it the checkpoint tensor of
  the first of `names` (a str or a tuple: current name first, older ones after). It runs once on
  stand-ins that record, for every parameter leaf, the tensor it came from and the reshapes and
  transposes that made it (OIHW -> HWIO, (out, in) -> (in, out), [in, heads, head_dim] splits);
  undoing them on the leaf gives the tensor. So the inverse is derived from the converter, never
  restated, and a converter that does more than that raises TypeError here.

  Raises ValueError starting with `mismatch` (what the params were supposed to be) when `params`
  (plain or boxed) are not the tree of shapes the converter makes.
  """
  traced, read = _trace(convert)
  traced = {jax.tree_util.keystr(path): t for path, t in traced.items()}
  values = _flat(nn.meta.unbox(flax.core.unfreeze(params)))
  got = {path: tuple(np.shape(v)) for path, v in values.items()}
  want = {path: t.shape for path, t in traced.items()}
  if got != want:
    raise ValueError(f'{mismatch} The params differ from it: {_difference(got, want)}.')
  tensors = {t.name: np.ascontiguousarray(t.undo(np.asarray(values[path], np.float32)))
             for path, t in traced.items()}
  if set(tensors) != read:  # A tensor read but dropped: its values are not in the params.
    raise AssertionError(f'the converter drops {sorted(read - set(tensors))}: not invertible.')
  return tensors
