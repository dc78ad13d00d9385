"""Random-access sources of raw examples, one per `config.data.dataset`.

A source is a sequence: `len(source)` examples, `source[i]` the raw example i as a dict

  key       str           where it came from (a path, 'tfds:name/split/i', a shard record)
  image     bytes | array encoded file bytes, or a decoded uint8 array (TFDS, Shapes)
  captions  list[str]     possibly empty (a missing caption: the loader skips the example)
  text      dict          optional precomputed encoder outputs per caption (ArrayRecord only)

and `source.captions(i)` reads only the captions where it can (for tokenizer training and eval
prompts). Reading `source[i]` may raise OSError (an unreadable file): the loader treats that as a
bad record. A truncated or corrupt ArrayRecord file (a shard, or a TFDS file) is no bad record but
DataError, which names the file, the config field that points at it and the command that rebuilds
it. Sources are picklable: grain worker processes receive them.

  folder        a directory tree of .jpg/.jpeg/.png/.webp files; captions from metadata.jsonl
                (`file_name` + `data.caption_key`, Hugging Face imagefolder) or a .txt beside each
  tfds          any TFDS dataset prepared as ArrayRecord, by name and split from `data.data_dir`
  array_record  shards written by `python -m tools.prepare` (a glob)
  shapes        the built-in benchmark (TFDS builder); `shapes_rendered`: the same, rendered
"""
from __future__ import annotations

import glob as globlib
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from data import images, records, shapes

METADATA = 'metadata.jsonl'


class DataError(ValueError):
  """Data that cannot be trained on (a path, key or record); the message says which and why."""


def _as_captions(value: Any) -> list[str]:
  """A caption field (str, bytes, or a sequence/array of them) -> list of non-empty str."""
  if value is None:
    return []
  if isinstance(value, (str, bytes, np.bytes_, np.str_)):
    value = [value]
  elif isinstance(value, np.ndarray):
    value = value.ravel().tolist()
  out = []
  for v in value:
    text = v.decode('utf-8', 'replace') if isinstance(v, (bytes, np.bytes_)) else str(v)
    if text.strip():
      out.append(text.strip())
  return out


class FolderSource(Sequence):
  """Images under `root` with captions from metadata.jsonl files or .txt files beside them.

  A metadata.jsonl line {"file_name": "a/b.jpg", "<caption_key>": "..." or [...]} captions the
  file at that path relative to the metadata file's directory (as in Hugging Face imagefolder);
  otherwise `b.txt` beside `b.jpg` holds the caption (one per non-empty line). Example i is the
  i-th relative path in sorted order, the same on every host.
  """

  def __init__(self, root: str, caption_key: str = 'text'):
    if not root:
      raise DataError('data.path is empty: set it to the folder of images '
                       '(e.g. --config.data.path=/data/my_images).')
    if not os.path.isdir(root):
      raise FileNotFoundError(f'data.path={root!r}: no such directory.')
    self.root, self.caption_key = os.path.abspath(root), caption_key
    files, meta, texts = [], {}, set()
    for dirpath, dirnames, names in os.walk(self.root, followlinks=True):
      dirnames.sort()
      rel_dir = os.path.relpath(dirpath, self.root)
      for name in sorted(names):
        rel = os.path.normpath(os.path.join(rel_dir, name))
        lower = name.lower()
        if lower.endswith(images.EXTENSIONS):
          files.append(rel)
        elif lower.endswith('.txt'):
          texts.add(rel)
        elif name == METADATA:
          meta.update(self._read_metadata(os.path.join(dirpath, name), rel_dir))
    if not files:
      raise DataError(f'data.path={root!r} holds no images ({", ".join(images.EXTENSIONS)}).')
    self.files = sorted(files)
    self._meta = meta
    self._texts = texts

  def _read_metadata(self, path: str, rel_dir: str) -> dict[str, list[str]]:
    out = {}
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f'{path}:{number}: not a JSON line ({e.msg}).') from None
        if not isinstance(row, dict) or 'file_name' not in row:
          raise DataError(f'{path}:{number}: no "file_name" field.')
        if self.caption_key not in row:
          raise DataError(f'{path}:{number}: no caption field {self.caption_key!r} '
                           f'(data.caption_key); the line has {sorted(row)}.')
        out[os.path.normpath(os.path.join(rel_dir, row['file_name']))] = _as_captions(
            row[self.caption_key])
    return out

  def __len__(self) -> int:
    return len(self.files)

  def captions(self, index: int) -> list[str]:
    rel = self.files[index]
    if rel in self._meta:
      return self._meta[rel]
    txt = os.path.splitext(rel)[0] + '.txt'
    if txt in self._texts:
      with open(os.path.join(self.root, txt), encoding='utf-8', errors='replace') as f:
        return _as_captions([line for line in f])
    return []

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = os.path.join(self.root, self.files[index])
    with open(path, 'rb') as f:
      data = f.read()
    return {'key': path, 'image': data, 'captions': self.captions(index)}


class ArrayRecordSource(Sequence):
  """Shards written by `python -m tools.prepare`, matched by a glob, in sorted order.

  `field` is the config field that holds the glob (data.path, or data.eval_path), for errors.
  """

  def __init__(self, pattern: str, field: str = 'data.path'):
    import grain  # pylint: disable=g-import-not-at-top
    if not pattern:
      raise DataError(f'{field} is empty: set it to a glob of ArrayRecord shards '
                      f'(e.g. --config.{field}=/data/train-*.array_record).')
    self.pattern, self.field = pattern, field
    self.files = sorted(globlib.glob(pattern))
    if not self.files:
      raise FileNotFoundError(f'{field}={pattern!r} matches no files.')
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.files)
    except RuntimeError as e:  # What array_record raises for a file that does not open.
      raise self._unopenable(_first_line(e)) from None
    if len(self._source) == 0:
      raise DataError(f'{field}={pattern!r}: the shards hold no records.')

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      data = self._source[index]
    except RuntimeError as e:  # A checksum failed, or the file cannot be read: a damaged shard.
      shard, why = self._shard_of(index)
      raise self._damaged(shard, why or _first_line(e)) from None
    if not data:  # What array_record reads from a file that it cannot open (truncated since).
      shard, why = self._shard_of(index)
      if why:
        raise self._damaged(shard, why)
    try:
      record = records.decode(data)
    except ValueError as e:  # The file is sound but the record is not ours: a bad record.
      raise OSError(f'record {index}: {e}') from None
    record['key'] = record.get('key') or f'{self.pattern}[{index}]'
    return record

  def captions(self, index: int) -> list[str]:
    return list(self[index]['captions'])

  def _shard_of(self, index: int) -> tuple[str, str]:
    """The shard holding record `index` (or an earlier one that no longer opens), and why it
    does not open ('' if it does). Opens the shards in order: only after a read failed."""
    start = 0
    for shard in self.files:
      count, why = _open_status(shard)
      if why or index < start + count:
        return shard, why
      start += count
    return self.files[-1], ''

  def _unopenable(self, error: str) -> DataError:
    for shard in self.files:
      why = _open_status(shard)[1]
      if not why:
        continue
      if _written_as_array_record(shard):
        return self._damaged(shard, why)
      return DataError(f'{self.field}={self.pattern!r}: {shard} is not an ArrayRecord file '
                       f'({why}); write shards with python -m tools.prepare.')
    return DataError(f'{self.field}={self.pattern!r}: the shards cannot be opened ({error}).')

  def _damaged(self, shard: str, why: str) -> DataError:
    """The error for a truncated or corrupt shard: which, where it is set, how to rebuild it."""
    name = _SHARD_NAME.fullmatch(shard)
    flags = f'--output={name[1]} --num_shards={int(name[3])}' if name else '--output=...'
    sidecar = f'; {shard}.json records its input and settings' if os.path.isfile(
        shard + '.json') else ''
    return DataError(
        f'{self.field}={self.pattern!r}: shard {shard} is truncated or corrupt ({why}); a damaged '
        'shard stops the run whatever data.on_bad_record says. Delete it and rerun the python -m '
        f'tools.prepare command that wrote it, with the same flags (... {flags}): it keeps the '
        f'finished shards and writes only the missing ones{sidecar}.')


# `{output}-{k:05d}-of-{N:05d}.array_record`: tools.prepare's shard names (prepare.shard_path).
_SHARD_NAME = re.compile(r'(.*)-(\d{5})-of-(\d{5})\.array_record')
# Every Riegeli file (the container of ArrayRecord) begins with this block header.
_RIEGELI_MAGIC = bytes.fromhex('83af70d10d884a3f')


def _first_line(error: BaseException, limit: int = 160) -> str:
  return (str(error).strip().splitlines() or [''])[0][:limit]


def _open_status(path: str) -> tuple[int, str]:
  """(records, '') for an ArrayRecord file that opens, else (0, why it does not)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  count, ok = reader.num_records(), reader.ok()
  try:
    reader.close()  # Raises why the file did not open (no message for some truncated files).
  except RuntimeError as e:
    return 0, _first_line(e) or 'array_record cannot open it and gives no reason, as for a cut file'
  return (count, '') if ok else (0, 'it does not open')


def _written_as_array_record(path: str) -> bool:
  """Whether `path` was written as an ArrayRecord file: it has tools.prepare's sidecar or the
  Riegeli header."""
  if os.path.isfile(path + '.json'):
    return True
  with open(path, 'rb') as f:
    return f.read(len(_RIEGELI_MAGIC)) == _RIEGELI_MAGIC


def _read_tfds(records, index: int, damaged) -> Any:
  """`records[index]` of a TFDS ArrayRecord data source; `damaged(file, why)`: the DataError to
  raise when the file holding the record is truncated or corrupt (else the record's own error)."""
  try:
    return records[index]
  except Exception as e:  # pylint: disable=broad-except  (a cut file reads b'': any decode error)
    start = 0
    for instruction in records.dataset_info.splits[records.split].file_instructions:
      if index < start + instruction.take:
        why = _open_status(instruction.filename)[1]
        if why or isinstance(e, RuntimeError):  # array_record raises RuntimeError for a bad chunk.
          raise damaged(instruction.filename, why or _first_line(e)) from None
        break
      start += instruction.take
    raise


def _feature(example: dict[str, Any], key: str) -> Any:
  node = example
  for part in key.split('/'):
    node = node[part]
  return node


def _feature_keys(features: Any, prefix: str = '') -> list[str]:
  out = []
  for name, feature in features.items():
    full = f'{prefix}{name}'
    inner = getattr(feature, 'feature', feature)  # tfds.features.Sequence wraps a dict.
    if hasattr(inner, 'items'):
      out += _feature_keys(inner, full + '/')
    else:
      out.append(full)
  return out


class TfdsSource(Sequence):
  """A TFDS dataset prepared as ArrayRecord in `data_dir`, read with `as_data_source` (no TF graph)."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, caption_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not name:
      raise DataError("data.tfds_name is empty: set it to a TFDS dataset (e.g. 'coco_captions').")
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises several kinds)
      raise DataError(f'data.tfds_name={name!r}: {e}'.splitlines()[0]) from None
    keys = _feature_keys(builder.info.features)
    for field, key in (('data.image_key', image_key), ('data.caption_key', caption_key)):
      if key not in keys:
        raise DataError(f'{field}={key!r} is not a feature of {name}; it has {keys}.')
    if split not in builder.info.splits:
      raise DataError(f'split {split!r} is not in {name} (it has {list(builder.info.splits)}); '
                       'set data.train_split / data.eval_split.')
    try:
      self._source = builder.as_data_source(split)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f'{name} in {builder.data_dir} cannot be read randomly ({str(e).splitlines()[0]}); '
          "prepare it with file_format='array_record' (tfds build --file_format=array_record), "
          'or convert it with python -m tools.prepare.') from None
    self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key
    self.data_dir, self._folder = data_dir, str(builder.data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def _damaged(self, file: str, why: str) -> DataError:
    data_dir = f' --data_dir={self.data_dir}' if self.data_dir else ''
    return DataError(
        f'data.tfds_name={self.name!r} (data.data_dir={self.data_dir!r}): {file} is truncated or '
        f'corrupt ({why}); a damaged file stops the run whatever data.on_bad_record says. To '
        f'rebuild it, delete {self._folder} and prepare the dataset again (tfds build {self.name}'
        f'{data_dir} --file_format=array_record, or its builder\'s download_and_prepare).')

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = _read_tfds(self._source, index, self._damaged)
    return {'key': f'tfds:{self.name}/{self.split}/{index}',
            'image': _feature(example, self.image_key),
            'captions': _as_captions(_feature(example, self.caption_key))}

  def captions(self, index: int) -> list[str]:
    return self[index]['captions']


class ShapesSource(Sequence):
  """The Shapes benchmark split: TFDS records (prepared once in data_dir) or rendered on demand."""

  def __init__(self, split: str, image_size: int, num_examples: int, data_dir: str | None,
               rendered: bool, num_train: int = 0, num_test: int = 0):
    shapes.check_sizes(image_size, num_train or num_examples, num_test or num_examples)
    self.split, self.image_size, self.num_examples = split, image_size, num_examples
    self.data_dir, self._records = data_dir, None
    if not rendered:
      from data import shapes_tfds  # pylint: disable=g-import-not-at-top  (TFDS is heavy)
      builder = shapes_tfds.prepare(data_dir, image_size, num_train, num_test)
      self._records = builder.as_data_source(split)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range [0, {self.num_examples}).')
    if self._records is None:
      image, text = shapes.example(self.split, int(index), self.image_size)
    else:
      record = _read_tfds(self._records, int(index), self._damaged)
      image, text = record['image'], record['caption'].decode()
    return {'key': f'shapes/{self.split}/{index}', 'image': image, 'captions': [text]}

  def captions(self, index: int) -> list[str]:
    return [shapes.example(self.split, int(index), self.image_size)[1]] if (
        self._records is None) else [self[index]['captions'][0]]

  def _damaged(self, file: str, why: str) -> DataError:
    folder = self._records.dataset_info.data_dir
    return DataError(f'data.data_dir={self.data_dir!r}: the Shapes file {file} is truncated or '
                     f'corrupt ({why}); delete {folder} and run again: it is prepared anew.')


def make(cfg, split: str = 'train') -> Sequence | None:
  """The source of `split` ('train' or 'eval') for `config.data`; None if it has no eval split."""
  if split not in ('train', 'eval'):
    raise ValueError(f"Unknown split {split!r}: use 'train' or 'eval'.")
  train = split == 'train'
  kind = cfg.dataset
  if kind in ('shapes', 'shapes_rendered'):
    num = cfg.num_train if train else cfg.num_test
    return ShapesSource('train' if train else 'test', cfg.image_size, num, cfg.data_dir,
                        rendered=kind == 'shapes_rendered', num_train=cfg.num_train,
                        num_test=cfg.num_test)
  if kind == 'folder':
    path = cfg.path if train else cfg.eval_path
    return FolderSource(path, cfg.caption_key) if path else None
  if kind == 'array_record':
    path = cfg.path if train else cfg.eval_path
    return ArrayRecordSource(path, 'data.path' if train else 'data.eval_path') if path else None
  if kind == 'tfds':
    split_name = cfg.train_split if train else cfg.eval_split
    return TfdsSource(cfg.tfds_name, split_name, cfg.data_dir, cfg.image_key,
                      cfg.caption_key) if split_name else None
  raise ValueError(f'Unknown data.dataset {kind!r}: use folder, tfds, array_record, shapes or '
                   'shapes_rendered.')


def caption_sample(source: Sequence, max_records: int = 20_000) -> list[str]:
  """Captions of up to `max_records` records spread evenly over the source (tokenizer training)."""
  n = len(source)
  indices = range(n) if n <= max_records else np.linspace(0, n - 1, max_records).astype(np.int64)
  out = []
  for i in indices:
    try:
      out += source.captions(int(i))
    except OSError:  # An unreadable record: the loader will skip it too.
      continue
  return out
