"""Webdataset tar shards read as a stream of raw examples (what `tools.prepare` converts).

A webdataset tar holds one example per key: the members that share a basename up to its first dot
(`dir/000123.jpg`, `dir/000123.txt`, `dir/000123.json` are example `dir/000123`), stored next to
each other. The image is the member with a .jpg/.jpeg/.png/.webp extension; the captions come from
the .txt member (one per non-empty line, as for the folder source) or else from the .json member's
`caption_key` field, falling back to 'caption' (what img2dataset writes). Tars are read with
`tarfile` in streaming mode (.tar, .tar.gz, ...), so none is read twice or held in memory.

  source = TarSource('/data/wds/{00000..00099}.tar')   # brace ranges and/or glob patterns
  for raw in source.examples(source.tars[0]):          # {'key', 'image', 'captions'} in tar order
    ...                                                # or {'key', 'error'} for an unusable group
"""
from __future__ import annotations

import glob as globlib
import json
import os
import re
import tarfile
import zlib
from typing import Any, Iterator

from data import images, sources

IMAGE_EXTS = tuple(e.lstrip('.') for e in images.EXTENSIONS)
_BRACE = re.compile(r'\{(\d+)\.\.(\d+)\}')
_KEY_EXT = re.compile(r'^((?:.*/|)[^./]+)\.([^/]*)$')  # webdataset's base_plus_ext.


def expand(pattern: str) -> list[str]:
  """A pattern with {a..b} ranges (zero padding kept) and/or glob characters -> sorted files.

  FileNotFoundError if a glob matches nothing or a file named by a brace range does not exist.
  """
  if not pattern:
    raise ValueError('--input is empty: give the tar shards, e.g. --input=/data/wds/{00000..00099}.tar')
  patterns = [pattern]
  while any(_BRACE.search(p) for p in patterns):
    out = []
    for p in patterns:
      m = _BRACE.search(p)
      if not m:
        out.append(p)
        continue
      lo, hi = m.group(1), m.group(2)
      width = len(lo) if lo.startswith('0') else 0
      out += [p[:m.start()] + str(i).zfill(width) + p[m.end():] for i in range(int(lo), int(hi) + 1)]
    patterns = out
  files, missing = [], []
  for p in patterns:
    if globlib.has_magic(p):
      matched = sorted(f for f in globlib.glob(p) if os.path.isfile(f))
      if not matched:
        raise FileNotFoundError(f'--input={pattern!r}: {p!r} matches no files.')
      files += matched
    else:
      (files if os.path.isfile(p) else missing).append(p)
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise FileNotFoundError(f'--input={pattern!r}: {missing[0]!r}{more} does not exist.')
  return sorted(set(files))


def split_name(name: str) -> tuple[str, str]:
  """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); ('', '') for names without an extension."""
  m = _KEY_EXT.match(name)
  return (m.group(1), m.group(2).lower()) if m else ('', '')


def _groups(path: str, read: bool = True) -> Iterator[tuple[str, dict[str, bytes] | Exception]]:
  """(key, {extension: bytes}) for each run of members sharing a key. A broken tar ends with
  (the key being read or '', the error): that group and the rest of the tar are lost."""
  key, members = None, {}
  try:
    with tarfile.open(path, mode='r|*') as tar:
      for info in tar:
        if not info.isfile():
          continue
        k, ext = split_name(info.name)
        if not k:
          continue
        if k != key:
          if key is not None:
            yield key, members
          key, members = k, {}
        members[ext] = tar.extractfile(info).read() if read else None
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    yield key or '', e
    return
  if key is not None:
    yield key, members


def _captions(members: dict[str, bytes], caption_key: str) -> list[str]:
  """Captions of a group: .txt lines, else json[caption_key], else json['caption']."""
  if members.get('txt') is not None:
    text = members['txt'].decode('utf-8', 'replace')
    return sources._as_captions(text.splitlines())  # pylint: disable=protected-access
  if members.get('json') is not None:
    try:
      row = json.loads(members['json'])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'unreadable .json ({e})') from None
    if isinstance(row, dict):
      return sources._as_captions(row.get(caption_key, row.get('caption')))  # pylint: disable=protected-access
  return []


class TarSource:
  """Sorted webdataset tars; `examples(tar)` streams one tar's raw examples in order."""

  def __init__(self, pattern: str, caption_key: str = 'text'):
    self.pattern, self.caption_key = pattern, caption_key
    self.tars = expand(pattern)

  def count(self, tar: str) -> int:
    """Examples (key groups) in `tar`, the same that `examples` yields (reads it through once)."""
    return sum(1 for _, members in _groups(tar, read=False) if isinstance(members, dict))

  def units(self, limit: int = 0) -> tuple[list[list], int | None]:
    """[[tar, examples to take or None (all)], ...] in order, and their total (None: unknown).

    With a `limit`, the tars are counted (read through) until it is reached; the last is capped.
    """
    if not limit:
      return [[t, None] for t in self.tars], None
    units, total = [], 0
    for tar in self.tars:
      take = min(self.count(tar), limit - total)
      units.append([tar, take])
      total += take
      if total >= limit:
        break
    return units, total

  def examples(self, tar: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw examples {'key': 'tar:key', 'image': bytes, 'captions'}, or {'key', 'error': reason}."""
    n = 0
    for key, members in _groups(tar):
      if limit is not None and n >= limit:
        return
      full = f'{tar}:{key}' if key else tar
      if isinstance(members, Exception):
        yield {'key': full, 'error': f'unreadable tar ({members})'}
        return
      n += 1
      image = next((members[e] for e in IMAGE_EXTS if e in members), None)
      if image is None:
        yield {'key': full, 'error': f'no image member ({", ".join(IMAGE_EXTS)})'}
        continue
      try:
        captions = _captions(members, self.caption_key)
      except ValueError as e:
        yield {'key': full, 'error': str(e)}
        continue
      yield {'key': full, 'image': image, 'captions': captions}
