"""The record format of jaxdiff's ArrayRecord shards (what `python -m tools.prepare` writes).

Each record is one msgpack map:

  key       str    where the example came from (a file path, 'tfds:name/split/i', a tar member)
  image     bytes  the encoded image (JPEG, PNG or WebP), decoded by the loader
  captions  [str]  one or more captions; the loader draws one per step
  text      map    optional precomputed frozen-encoder outputs for every caption:
                   {'encoder': fingerprint, 'emb': [C, L, D], 'mask': [C, L], 'pooled': [C, D]}
  size      [int]  the image's (height, width) as the loader sees it (EXIF rotation applied)
  bucket    [int]  optional (--buckets): the (height, width) of its aspect-ratio bucket
  latent    map    optional posterior moments of a frozen VAE (data/latents.py): {'encoder',
                   'image_size': side or the bucket's [height, width], 'buckets'?: all of
                   them, 'mean', 'logvar'}

Arrays are stored as {'nd': dtype name, 'shape': [...], 'data': raw bytes} (bfloat16 by name).
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np

FORMAT_VERSION = 1
_DTYPES = {'bfloat16': ml_dtypes.bfloat16}


def _pack_default(obj):
  if isinstance(obj, np.ndarray):
    name = 'bfloat16' if obj.dtype == ml_dtypes.bfloat16 else obj.dtype.str
    return {'nd': name, 'shape': list(obj.shape), 'data': np.ascontiguousarray(obj).tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f'cannot store {type(obj).__name__} in a record')


def _unpack_hook(obj):
  if 'nd' in obj and 'data' in obj and len(obj) == 3:
    dtype = _DTYPES.get(obj['nd']) or np.dtype(obj['nd'])
    return np.frombuffer(obj['data'], dtype=dtype).reshape(obj['shape'])
  return obj


def encode(record: dict[str, Any]) -> bytes:
  """A record (key, image bytes, captions, optional text) -> msgpack bytes."""
  missing = [k for k in ('key', 'image', 'captions') if k not in record]
  if missing:
    raise ValueError(f'record is missing {missing}')
  if not isinstance(record['image'], (bytes, bytearray)):
    raise TypeError('record image must be encoded bytes (JPEG, PNG or WebP)')
  record = dict(record, captions=[str(c) for c in record['captions']], v=FORMAT_VERSION)
  return msgpack.packb(record, default=_pack_default, use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
  """msgpack bytes -> the record; ValueError if they are not a jaxdiff record."""
  try:
    record = msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)
  except (msgpack.UnpackException, ValueError, TypeError) as e:
    raise ValueError(f'not a jaxdiff record ({e})') from None
  if not isinstance(record, dict) or 'image' not in record or 'captions' not in record:
    raise ValueError('not a jaxdiff record (no image or captions); write shards with tools.prepare')
  return record


def stored(source, field: str) -> Any:
  """What the first record of `source` stores under an optional `field` ('text' or 'latent',
  written by tools.prepare), or None: the training start-up checks it against the run's encoder."""
  try:
    return source[0].get(field)
  except (OSError, IndexError):
    return None


def pack_sizes(sizes) -> str:
  """Records' (height, width) sizes as a shard sidecar's `sizes`: 'HxW HxW ...' (one line)."""
  return ' '.join(f'{int(h)}x{int(w)}' for h, w in sizes)


def unpack_sizes(text: str) -> list[list[int]]:
  """`pack_sizes`'s text -> [[height, width], ...]; ValueError if it is not such text."""
  return [[int(v) for v in size.split('x')] for size in text.split()]
