"""On-disk cache of frozen-encoder caption embeddings for a finite caption set.

A frozen text encoder gives the same output for the same caption every step, so for datasets with
a bounded set of captions (class-label templates, procedural shapes) each unique caption is encoded
once and looked up afterwards. A cache folder holds

  index.json   fingerprint of the encoder, storage dtype, the caption list (row order)
  emb.npy      [N, L, D] token embeddings in a compact dtype (float16 by default)
  mask.npy     [N, L] bool
  pooled.npy   [N, D] float32 masked-mean (not normalised) embeddings

The empty caption "" is always present: it is the classifier-free-guidance null condition.
The fingerprint (the encoder's own: folder, max_len, compute dtype, a weight hash; plus the
storage dtype) detects a stale cache, which `build_cache` rebuilds; new captions are appended
without re-encoding old ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_dtypes
import numpy as np

_VERSION = 1
_FILES = ('emb.npy', 'mask.npy', 'pooled.npy')
_STORE_DTYPES = {'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}
NULL_CAPTION = ''


def encoder_fingerprint(encoder: Any, store_dtype: str = 'float16') -> dict[str, Any]:
  """What a cache depends on: the encoder's fingerprint (weights, folder, max_len), shapes, dtype."""
  if not getattr(encoder, 'fingerprint', ''):
    raise ValueError('the encoder has no fingerprint, so a stale cache could not be detected; '
                     'use text.pretrained.load_pretrained to build it.')
  return {'version': _VERSION, 'encoder': encoder.fingerprint, 'max_len': int(encoder.max_len),
          'dim': int(encoder.dim), 'store_dtype': store_dtype}


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingCache:
  """Cached (emb, mask, pooled) rows, one per unique caption; `lookup` gathers rows by caption."""
  path: str
  fingerprint: dict[str, Any]
  captions: tuple[str, ...]
  emb: np.ndarray       # [N, L, D] storage dtype (may be a read-only memmap)
  mask: np.ndarray      # [N, L] bool
  pooled: np.ndarray    # [N, D] float32
  row: dict[str, int] = dataclasses.field(repr=False, default_factory=dict)

  def __post_init__(self):
    if not self.row:
      self.row.update({c: i for i, c in enumerate(self.captions)})

  def __len__(self) -> int:
    return len(self.captions)

  def __contains__(self, caption: str) -> bool:
    return caption in self.row

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """captions -> (emb [B, L, D] float32, mask [B, L] bool, pooled [B, D] float32)."""
    missing = [c for c in captions if c not in self.row]
    if missing:
      raise ValueError(f'{len(missing)} caption(s) not in the embedding cache {self.path}, e.g. '
                       f'{missing[0]!r}; rebuild it with build_cache over all dataset captions.')
    idx = np.asarray([self.row[c] for c in captions], np.int64)
    order = np.argsort(idx)  # Sorted reads are kinder to a memmap.
    emb = np.empty((len(idx),) + self.emb.shape[1:], np.float32)
    emb[order] = self.emb[idx[order]].astype(np.float32)
    return emb, np.asarray(self.mask[idx]), np.asarray(self.pooled[idx], np.float32)

  @classmethod
  def load(cls, path: str, fingerprint: dict[str, Any] | None = None) -> 'EmbeddingCache':
    """Opens a cache folder; with `fingerprint`, raises ValueError if it was built differently."""
    index_path = os.path.join(path, 'index.json')
    if not os.path.isfile(index_path):
      raise FileNotFoundError(f'{index_path} not found: build the cache first with '
                              'text.embedding_cache.build_cache(encoder, captions, path).')
    with open(index_path) as f:
      index = json.load(f)
    if fingerprint is not None and index.get('fingerprint') != fingerprint:
      raise ValueError(f'embedding cache {path} was built by a different encoder setup: '
                       f'{_diff(index.get("fingerprint", {}), fingerprint)}; rebuild it with '
                       'build_cache.')
    captions = tuple(index['captions'])
    store = _STORE_DTYPES[index['fingerprint']['store_dtype']]
    arrays = {}
    for name in _FILES:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise FileNotFoundError(f'{file} missing from embedding cache; rebuild with build_cache.')
      arrays[name] = np.load(file, mmap_mode='r')
    emb = arrays['emb.npy']
    if store is ml_dtypes.bfloat16:  # .npy has no bfloat16: stored as its uint16 bits.
      emb = emb.view(ml_dtypes.bfloat16)
    if any(a.shape[0] != len(captions) for a in arrays.values()):
      raise ValueError(f'embedding cache {path} is inconsistent (index and arrays disagree, '
                       'e.g. an interrupted write); rebuild it with build_cache.')
    return cls(path=path, fingerprint=index['fingerprint'], captions=captions, emb=emb,
               mask=arrays['mask.npy'], pooled=arrays['pooled.npy'])


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys)


def _unique(captions: Sequence[str]) -> list[str]:
  for c in captions:
    if not isinstance(c, str):
      raise ValueError(f'captions must be str, got {type(c).__name__}: {c!r}.')
  return list(dict.fromkeys([NULL_CAPTION, *captions]))


def _encode_all(encoder: Any, params: Any, captions: Sequence[str], batch_size: int,
                out: dict[str, Any], start: int, store: Any) -> None:
  """Encodes `captions` in fixed-size batches into rows start.. of the `out` arrays."""
  encode = jax.jit(encoder.encode)  # Fixed batch shape: one compilation.
  t0, n, last_log = time.time(), len(captions), 0.0
  for lo in range(0, n, batch_size):
    chunk = captions[lo:lo + batch_size]
    ids = encoder.tokenize(chunk)
    if len(chunk) < batch_size:  # Pad with copies of a row, not extra captions.
      ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - len(chunk), axis=0)])
    emb, mask, pooled = jax.device_get(encode(params, ids))
    rows = slice(start + lo, start + lo + len(chunk))
    out['emb.npy'][rows] = _to_store(emb[:len(chunk)], store)
    out['mask.npy'][rows] = mask[:len(chunk)]
    out['pooled.npy'][rows] = pooled[:len(chunk)]
    done, now = lo + len(chunk), time.time()
    if now - last_log > 10 or done == n:
      last_log = now
      logging.info('embedding cache: encoded %d/%d captions (%.1f/s)', done, n,
                   done / max(now - t0, 1e-9))


def _to_store(x: np.ndarray, store: Any) -> np.ndarray:
  x = np.asarray(x).astype(store)
  return x.view(np.uint16) if store is ml_dtypes.bfloat16 else x


def build_cache(encoder: Any, captions: Sequence[str], path: str, batch_size: int = 64, *,
                params: Any = None, store_dtype: str = 'float16') -> EmbeddingCache:
  """Returns a cache covering `captions` and "", reusing/extending `path` when still valid.

  Args:
    encoder: a `text.pretrained.PretrainedEncoder` (or anything with tokenize, encode,
      fingerprint, max_len, dim and, unless `params` is given, params).
    captions: dataset captions (duplicates fine; each unique caption is encoded once).
    path: cache folder (created if needed).
    batch_size: captions per jitted encode call.
    params: encoder parameters (default `encoder.params`).
    store_dtype: 'float16' | 'bfloat16' | 'float32' storage of the token embeddings.
  """
  if store_dtype not in _STORE_DTYPES:
    raise ValueError(f'store_dtype={store_dtype!r} is not supported; use one of '
                     f'{sorted(_STORE_DTYPES)}.')
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive int.')
  fingerprint = encoder_fingerprint(encoder, store_dtype)
  wanted = _unique(captions)
  old = None
  if os.path.isfile(os.path.join(path, 'index.json')):
    try:
      old = EmbeddingCache.load(path, fingerprint)
    except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
      logging.warning('embedding cache %s is stale, rebuilding: %s', path, e)
  if old is not None:
    new = [c for c in wanted if c not in old.row]
    if not new:
      logging.info('embedding cache %s: reusing %d captions', path, len(old))
      return old
    logging.info('embedding cache %s: adding %d new captions to %d', path, len(new), len(old))
    all_captions = list(old.captions) + new
  else:
    new, all_captions = wanted, wanted

  os.makedirs(path, exist_ok=True)
  store = _STORE_DTYPES[store_dtype]
  n, length, dim = len(all_captions), encoder.max_len, encoder.dim
  file_dtype = np.uint16 if store is ml_dtypes.bfloat16 else store
  shapes = {'emb.npy': ((n, length, dim), file_dtype), 'mask.npy': ((n, length), np.bool_),
            'pooled.npy': ((n, dim), np.float32)}
  out = {name: np.lib.format.open_memmap(os.path.join(path, name + '.tmp'), mode='w+',
                                         dtype=dt, shape=shape)
         for name, (shape, dt) in shapes.items()}
  start = 0
  if old is not None:
    start = len(old)
    out['emb.npy'][:start] = _to_store(old.emb, store)
    out['mask.npy'][:start] = old.mask
    out['pooled.npy'][:start] = old.pooled
    del old  # Release the memmaps before replacing their files.
  _encode_all(encoder, encoder.params if params is None else params, new, batch_size, out,
              start, store)
  for array in out.values():
    array.flush()
  out.clear()
  index_tmp = os.path.join(path, 'index.json.tmp')
  with open(index_tmp, 'w') as f:
    json.dump({'fingerprint': fingerprint, 'captions': all_captions}, f)
  # Drop the old index first and write the new one last: an interrupted write reads as stale.
  if os.path.exists(os.path.join(path, 'index.json')):
    os.remove(os.path.join(path, 'index.json'))
  for name in _FILES:
    os.replace(os.path.join(path, name + '.tmp'), os.path.join(path, name))
  os.replace(index_tmp, os.path.join(path, 'index.json'))
  return EmbeddingCache.load(path, fingerprint)
