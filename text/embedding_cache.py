"""On-disk cache of frozen-encoder caption embeddings, built in parts, one per process.

A frozen text encoder gives the same output for the same caption every step, so each unique
caption of the training set is encoded once and looked up afterwards. With millions of captions
and many hosts, process p of P encodes only the captions of its own share of the dataset into
part p; no process reads every caption. A cache folder (on a file system every host sees) holds

  part-{p:05d}-of-{P:05d}/
    index.json   fingerprint, row count, p and P (no captions)
    keys.npy     [n] uint64, sorted: a 64-bit hash of each caption (`caption_keys`)
    emb.npy      [n, L, D] token embeddings, float16 by default (bfloat16 as its uint16 bits)
    mask.npy     [n, L] bool
    pooled.npy   [n, D] float32 masked-mean (not normalised) embeddings

with rows in the order of the keys. Every part holds "" (the classifier-free-guidance null
caption); a caption in two parts has equal rows in both. `EmbeddingCache.load` memory-maps the
P parts and `lookup` finds rows by binary search on the keys, so it holds no caption list.

A part is written into a temporary folder and renamed into place, so readers never see half a
part. `build_part` reuses a part that already holds every caption it is given under the same
fingerprint (the encoder's: folder, max_len, compute dtype, a weight hash; plus the storage
dtype); otherwise it rewrites the part with exactly the given captions, copying rows it finds in
that part's earlier version or in parts of another P in the folder (an earlier run on another
number of hosts) and encoding only the rest. Parts of another P are ignored by `load` and left
on disk.

Two different captions with the same 64-bit key (chance ~N^2 / 2^65: ~3e-8 for 10^6 captions)
would share a row; within a part this is detected and raises.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from typing import Any, Sequence

from absl import logging
import jax
import ml_dtypes
import numpy as np

_VERSION = 2
_ARRAYS = ('keys.npy', 'emb.npy', 'mask.npy', 'pooled.npy')
_STORE_DTYPES = {'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}
_COPY_BYTES = 64 << 20  # Rows copied from an earlier part per chunk.
NULL_CAPTION = ''


def encoder_fingerprint(encoder: Any, store_dtype: str = 'float16') -> dict[str, Any]:
  """What a cache depends on: the encoder's fingerprint (weights, folder, max_len), shape, dtype."""
  if not getattr(encoder, 'fingerprint', ''):
    raise ValueError('the encoder has no fingerprint, so a stale cache could not be detected; '
                     'use text.pretrained.load_pretrained to build it.')
  return {'version': _VERSION, 'encoder': encoder.fingerprint, 'max_len': int(encoder.max_len),
          'dim': int(encoder.dim), 'store_dtype': store_dtype}


def caption_keys(captions: Sequence[str]) -> np.ndarray:
  """[B] uint64: the first 8 bytes (little-endian) of blake2b of each caption's UTF-8."""
  digests = b''.join(hashlib.blake2b(c.encode('utf-8', 'surrogatepass'), digest_size=8).digest()
                     for c in captions)
  return np.frombuffer(digests, '<u8').astype(np.uint64)


def part_name(part: int, num_parts: int) -> str:
  return f'part-{part:05d}-of-{num_parts:05d}'


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
  """One part's arrays, memory-mapped read-only; rows in the order of the sorted `keys`."""
  path: str
  keys: np.ndarray    # [n] uint64, sorted
  emb: np.ndarray     # [n, L, D] storage dtype
  mask: np.ndarray    # [n, L] bool
  pooled: np.ndarray  # [n, D] float32

  def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found [B] bool, row [B] int64; row is meaningless where not found)."""
    pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
    return np.asarray(self.keys[pos]) == keys, pos.astype(np.int64)


def _open_part(folder: str) -> tuple[dict[str, Any], Part]:
  """(index, Part) of a part folder; FileNotFoundError / ValueError if missing or inconsistent."""
  index_path = os.path.join(folder, 'index.json')
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f'{index_path} not found')
  with open(index_path) as f:
    index = json.load(f)
  arrays = {}
  for name in _ARRAYS:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
      raise FileNotFoundError(f'{file} not found')
    arrays[name] = np.load(file, mmap_mode='r')
  fp, n = index['fingerprint'], index['count']
  emb = arrays['emb.npy']
  if fp['store_dtype'] == 'bfloat16':  # .npy has no bfloat16: stored as its uint16 bits.
    emb = emb.view(ml_dtypes.bfloat16)
  shapes = {'keys.npy': (n,), 'emb.npy': (n, fp['max_len'], fp['dim']),
            'mask.npy': (n, fp['max_len']), 'pooled.npy': (n, fp['dim'])}
  if any(arrays[k].shape != s for k, s in shapes.items()) or arrays['keys.npy'].dtype != np.uint64:
    raise ValueError(f'{folder} is inconsistent: index.json and the arrays disagree')
  return index, Part(folder, arrays['keys.npy'], emb, arrays['mask.npy'], arrays['pooled.npy'])


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingCache:
  """The P parts of a cache folder; `lookup` gathers (emb, mask, pooled) rows by caption."""
  path: str
  num_parts: int
  fingerprint: dict[str, Any]
  parts: tuple[Part, ...]

  def __len__(self) -> int:
    """Rows over all parts ("" and captions shared by parts count once per part)."""
    return sum(len(p.keys) for p in self.parts)

  def __contains__(self, caption: str) -> bool:
    key = caption_keys([caption])
    return any(p.find(key)[0][0] for p in self.parts)

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """captions -> (emb [B, L, D] float32, mask [B, L] bool, pooled [B, D] float32)."""
    keys = caption_keys(captions)
    part_of = np.full(len(keys), -1, np.int64)
    row = np.zeros(len(keys), np.int64)
    for j, part in enumerate(self.parts):
      todo = np.flatnonzero(part_of < 0)
      if not todo.size:
        break
      found, pos = part.find(keys[todo])
      part_of[todo[found]], row[todo[found]] = j, pos[found]
    missing = np.flatnonzero(part_of < 0)
    if missing.size:
      raise ValueError(f'{missing.size} caption(s) not in the embedding cache {self.path}, e.g. '
                       f'{captions[missing[0]]!r}; every process must give build_part every '
                       'caption of its share of the dataset.')
    _, length, dim = self.parts[0].emb.shape
    emb = np.empty((len(keys), length, dim), np.float32)
    mask = np.empty((len(keys), length), np.bool_)
    pooled = np.empty((len(keys), dim), np.float32)
    for j in np.unique(part_of):
      sel = np.flatnonzero(part_of == j)
      sel = sel[np.argsort(row[sel], kind='stable')]  # Sorted reads are kinder to a memmap.
      part, rows = self.parts[j], row[sel]
      emb[sel] = part.emb[rows].astype(np.float32)
      mask[sel] = part.mask[rows]
      pooled[sel] = part.pooled[rows]
    return emb, mask, pooled

  @classmethod
  def load(cls, path: str, num_parts: int,
           fingerprint: dict[str, Any] | None = None) -> 'EmbeddingCache':
    """Opens parts 0..num_parts-1 of `path`; with `fingerprint`, checks they were built by it."""
    todo = (f'run text.embedding_cache.build_part(encoder, captions, {path!r}, p, {num_parts}) '
            f'on every process p of {num_parts} first')
    missing = [p for p in range(num_parts)
               if not os.path.isfile(os.path.join(path, part_name(p, num_parts), 'index.json'))]
    if missing:
      others = sorted({p_count for _, _, p_count in _part_folders(path)} - {num_parts})
      note = (f' (it holds parts built for num_parts={others})' if others else '')
      raise FileNotFoundError(
          f'embedding cache {path} lacks {len(missing)} of its {num_parts} parts, e.g. '
          f'{part_name(missing[0], num_parts)}{note}; {todo}.')
    parts, fingerprints = [], []
    for p in range(num_parts):
      folder = os.path.join(path, part_name(p, num_parts))
      try:
        index, part = _open_part(folder)
      except (FileNotFoundError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f'embedding cache part {folder} is unreadable ({e}); {todo}.') from e
      parts.append(part)
      fingerprints.append(index['fingerprint'])
    want = fingerprints[0] if fingerprint is None else fingerprint
    for p, fp in enumerate(fingerprints):
      if fp != want:
        raise ValueError(
            f'embedding cache {path}: {part_name(p, num_parts)} was built by a different encoder '
            f'setup ({_diff(fp, want)}); {todo}, with the same encoder.')
    return cls(path=path, num_parts=num_parts, fingerprint=want, parts=tuple(parts))


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys)


def _sorted_unique(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Unique captions plus "", sorted by key, and their keys; raises on a key collision."""
  for c in captions:
    if not isinstance(c, str):
      raise ValueError(f'captions must be str, got {type(c).__name__}: {c!r}.')
  unique = list(dict.fromkeys([NULL_CAPTION, *captions]))
  keys = caption_keys(unique)
  order = np.argsort(keys, kind='stable')
  unique, keys = [unique[i] for i in order], keys[order]
  same = np.flatnonzero(keys[1:] == keys[:-1])
  if same.size:
    a, b = unique[same[0]], unique[same[0] + 1]
    raise ValueError(f'captions {a!r} and {b!r} have the same 64-bit key; change one of them.')
  return unique, keys


def _part_folders(path: str) -> list[tuple[str, int, int]]:
  """(folder, p, P) of every completed part in `path`, of any part count."""
  names = os.listdir(path) if os.path.isdir(path) else []
  found = [(n, re.fullmatch(r'part-(\d{5})-of-(\d{5})', n)) for n in sorted(names)]
  return [(os.path.join(path, n), int(m[1]), int(m[2])) for n, m in found if m]


def _open_if_built_by(folder: str, fingerprint: dict[str, Any]) -> Part | None:
  """The part in `folder` if it exists, is readable and was built with `fingerprint`."""
  if not os.path.isdir(folder):
    return None
  try:
    index, part = _open_part(folder)
  except (FileNotFoundError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
    logging.warning('embedding cache: ignoring unreadable %s: %s', folder, e)
    return None
  if index['fingerprint'] != fingerprint:
    logging.info('embedding cache: %s is stale: %s', folder,
                 _diff(index['fingerprint'], fingerprint))
    return None
  return part


def _copy_rows(sources: list[Part], keys: np.ndarray, out: dict[str, np.ndarray]) -> np.ndarray:
  """Copies the rows of `keys` found in `sources` into `out`; returns which were found."""
  done = np.zeros(len(keys), np.bool_)
  row_bytes = out['emb.npy'][0].nbytes + out['mask.npy'][0].nbytes + out['pooled.npy'][0].nbytes
  step = max(1, _COPY_BYTES // row_bytes)
  for part in sources:
    todo = np.flatnonzero(~done)
    if not todo.size:
      break
    found, pos = part.find(keys[todo])
    dest, src = todo[found], pos[found]  # Both ascending: the keys are sorted in both.
    for lo in range(0, len(dest), step):
      d, s = dest[lo:lo + step], src[lo:lo + step]
      out['emb.npy'][d] = np.asarray(part.emb[s]).view(out['emb.npy'].dtype)
      out['mask.npy'][d] = part.mask[s]
      out['pooled.npy'][d] = part.pooled[s]
    done[dest] = True
  return done


def _encode_rows(encoder: Any, params: Any, captions: Sequence[str], rows: np.ndarray,
                 batch_size: int, out: dict[str, np.ndarray], store: Any, name: str) -> None:
  """Encodes `captions` in fixed-size batches into `rows` of the `out` arrays."""
  encode = jax.jit(encoder.encode)  # Fixed batch shape: one compilation.
  t0, n, last_log = time.time(), len(captions), 0.0
  for lo in range(0, n, batch_size):
    chunk = captions[lo:lo + batch_size]
    ids = encoder.tokenize(chunk)
    if len(chunk) < batch_size:  # Pad with copies of a row, not extra captions.
      ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - len(chunk), axis=0)])
    emb, mask, pooled = jax.device_get(encode(params, ids))
    dest = rows[lo:lo + len(chunk)]
    out['emb.npy'][dest] = _to_store(emb[:len(chunk)], store)
    out['mask.npy'][dest] = mask[:len(chunk)]
    out['pooled.npy'][dest] = pooled[:len(chunk)]
    done, now = lo + len(chunk), time.time()
    if now - last_log > 10 or done == n:
      last_log = now
      logging.info('embedding cache %s: encoded %d/%d captions (%.1f/s)', name, done, n,
                   done / max(now - t0, 1e-9))


def _to_store(x: np.ndarray, store: Any) -> np.ndarray:
  x = np.asarray(x).astype(store)
  return x.view(np.uint16) if store is ml_dtypes.bfloat16 else x


def build_part(encoder: Any, captions: Sequence[str], path: str, part: int, num_parts: int, *,
               params: Any = None, batch_size: int = 64, store_dtype: str = 'float16') -> None:
  """Writes part `part` of `num_parts` of the cache at `path`: `captions` and "", encoded.

  Process p of P calls it with the captions of its own share of the dataset (duplicates fine);
  once every process has, any of them can `EmbeddingCache.load(path, P)`. Reuses the part if it
  already holds every caption under the same fingerprint; otherwise rewrites it, copying rows
  found in its earlier version or in parts of another P and encoding only the rest.

  Args:
    encoder: a `text.pretrained.PretrainedEncoder` (or anything with tokenize, encode,
      fingerprint, max_len, dim and, unless `params` is given, params).
    captions: this process's captions.
    path: cache folder (created if needed), on a file system all processes share.
    part, num_parts: this process's index and the number of processes (parts).
    params: encoder parameters (default `encoder.params`).
    batch_size: captions per jitted encode call.
    store_dtype: 'float16' | 'bfloat16' | 'float32' storage of the token embeddings.
  """
  if store_dtype not in _STORE_DTYPES:
    raise ValueError(f'store_dtype={store_dtype!r} is not supported; use one of '
                     f'{sorted(_STORE_DTYPES)}.')
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive int.')
  if not (isinstance(num_parts, (int, np.integer)) and isinstance(part, (int, np.integer))
          and 0 <= part < num_parts):
    raise ValueError(f'part={part!r} of num_parts={num_parts!r}: need ints, 0 <= part < num_parts.')
  part, num_parts = int(part), int(num_parts)
  fingerprint = encoder_fingerprint(encoder, store_dtype)
  captions, keys = _sorted_unique(captions)
  name = part_name(part, num_parts)
  final = os.path.join(path, name)
  os.makedirs(path, exist_ok=True)
  for leftover in os.listdir(path):  # From an interrupted build of this part.
    if leftover.startswith((name + '.tmp-', name + '.old-')):
      shutil.rmtree(os.path.join(path, leftover), ignore_errors=True)

  own = _open_if_built_by(final, fingerprint)
  if own is not None and own.find(keys)[0].all():
    logging.info('embedding cache %s: reusing %d rows', final, len(own.keys))
    return
  # Rows to copy: this part's earlier version, then parts of another part count (an earlier run
  # on another number of hosts). Not other parts of this count: their processes may be writing.
  others = [_open_if_built_by(f, fingerprint) for f, _, p_count in _part_folders(path)
            if p_count != num_parts]
  sources = [s for s in [own, *others] if s is not None]
  del own, others

  tmp = f'{final}.tmp-{uuid.uuid4().hex}'
  os.makedirs(tmp)
  store = _STORE_DTYPES[store_dtype]
  n, length, dim = len(keys), encoder.max_len, encoder.dim
  file_dtype = np.uint16 if store is ml_dtypes.bfloat16 else store
  shapes = {'emb.npy': ((n, length, dim), file_dtype), 'mask.npy': ((n, length), np.bool_),
            'pooled.npy': ((n, dim), np.float32)}
  out = {file: np.lib.format.open_memmap(os.path.join(tmp, file), mode='w+', dtype=dt,
                                         shape=shape)
         for file, (shape, dt) in shapes.items()}
  copied = _copy_rows(sources, keys, out)
  del sources  # Release the memmaps of the version replaced below.
  new = np.flatnonzero(~copied)
  logging.info('embedding cache %s: %d captions, %d copied from earlier parts, %d to encode',
               final, n, n - new.size, new.size)
  _encode_rows(encoder, encoder.params if params is None else params,
               [captions[i] for i in new], new, batch_size, out, store, name)
  for array in out.values():
    array.flush()
  out.clear()
  np.save(os.path.join(tmp, 'keys.npy'), keys)
  with open(os.path.join(tmp, 'index.json'), 'w') as f:
    json.dump({'fingerprint': fingerprint, 'count': n, 'part': part, 'num_parts': num_parts}, f)
  old = None
  if os.path.exists(final):
    old = f'{final}.old-{uuid.uuid4().hex}'
    os.rename(final, old)
  os.rename(tmp, final)  # The part appears whole or not at all.
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def build_cache(encoder: Any, captions: Sequence[str], path: str, batch_size: int = 64, *,
                params: Any = None, store_dtype: str = 'float16') -> EmbeddingCache:
  """Single-process convenience: `build_part` as part 0 of 1, then `EmbeddingCache.load`."""
  build_part(encoder, captions, path, 0, 1, params=params, batch_size=batch_size,
             store_dtype=store_dtype)
  return EmbeddingCache.load(path, 1, encoder_fingerprint(encoder, store_dtype))
