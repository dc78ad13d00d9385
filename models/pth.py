"""PyTorch `.pth` state dicts read without executing their pickles, and written without torch.

`read_pth(path)` reads what `torch.save(module.state_dict(), path)` writes: the zip format
(PyTorch >= 1.6: `<stem>/data.pkl`, one `<stem>/data/<key>` record per storage) and the older
stream format (five pickles, then each storage as an int64 element count and its bytes). The
pickle runs through `_Unpickler`, whose `find_class` hands out only tensor rebuilding
(`torch._utils._rebuild_tensor_v2`), `collections.OrderedDict` and the storage types; any other
global (the way a pickle runs code) is refused, naming the file and the global, before anything
is called. Tensors come back as numpy arrays rebuilt from (storage, offset, size, stride), the
strides checked against the storage's length.

`write_pth(path, tensors)` writes the zip format (what torch.load reads), for tests and tools.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# torch's storage types by pickled name -> numpy dtype.
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64), 'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}
_DTYPE_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_REBUILD = ('torch._utils', '_rebuild_tensor_v2')
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER (stream format).
_LEGACY_PROTOCOL = 1001


class _Storage:
  """A storage named in the pickle (or a view `offset` elements into a `root` one); its bytes
  are attached to the root once the file has given them."""

  def __init__(self, dtype: np.dtype, key: str, root: _Storage | None = None, offset: int = 0):
    self.dtype, self.key, self.root, self.offset, self.data = dtype, key, root, offset, None

  def elements(self) -> np.ndarray | None:
    if self.root is not None:
      return None if self.root.data is None else self.root.data[self.offset:]
    return self.data


class _Tensor:
  """`_rebuild_tensor_v2`'s arguments, made into an array once the storages are read."""

  def __init__(self, storage, storage_offset, size, stride, *unused):
    del unused  # requires_grad, backward hooks, metadata: nothing a state dict's values need.
    self.storage, self.offset = storage, storage_offset
    self.size, self.stride = tuple(size), tuple(stride)

  def array(self, source: str, name: str) -> np.ndarray:
    data = self.storage.elements() if isinstance(self.storage, _Storage) else None
    numbers = (self.offset,) + self.size + self.stride
    if data is None or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
      raise ValueError(f'{source}: tensor {name!r} names no storage of the file; the file is '
                       'damaged or not a PyTorch state dict.')
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if (len(self.size) != len(self.stride) or min(self.stride, default=0) < 0 or self.offset < 0
        or (0 not in self.size and last >= data.size)):
      raise ValueError(f'{source}: tensor {name!r} (size {self.size}, stride {self.stride}, '
                       f'offset {self.offset}) reaches past its storage of {data.size} '
                       'elements; the file is damaged.')
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size, tuple(s * data.itemsize for s in self.stride),
        writeable=False)
    return np.array(view)  # A copy: the file's buffer is not kept alive.


class _Unpickler(pickle.Unpickler):
  """Builds only OrderedDicts, storages and (lazy) tensors; refuses every other global."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self.source, self.storages, self.views = source, {}, {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == _REBUILD:
      return _Tensor
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch' and name in STORAGE_DTYPES:
      return STORAGE_DTYPES[name]
    raise ValueError(
        f'{self.source}: refused: its pickle names {module}.{name}, which is not a tensor, a '
        'storage or an OrderedDict (loading it could run code). Only plain state dicts are read: '
        'save `model.state_dict()` with torch.save, or convert the weights to .safetensors.')

  def persistent_load(self, pid: Any) -> _Storage:
    # Zip: ('storage', type, key, location, numel); stream: the same + view_metadata.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and _text(pid[0]) == 'storage'
            and isinstance(pid[1], np.dtype)):
      raise ValueError(f'{self.source}: refused: its pickle refers to {pid!r}, which is not a '
                       'tensor storage.')
    key = _text(pid[2])
    if key not in self.storages:
      self.storages[key] = _Storage(pid[1], key)
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return self.storages[key]
    view_key, offset, _ = view  # A view of the root storage, `offset` elements in.
    root = self.storages[key]
    return self.views.setdefault(_text(view_key), _Storage(root.dtype, key, root, int(offset)))


def _text(value: Any) -> Any:
  return value.decode('ascii') if isinstance(value, bytes) else value


def _state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict) or not all(isinstance(v, _Tensor) for v in obj.values()):
    raise ValueError(f'{source}: not a state dict ({{name: tensor}}); save `model.state_dict()` '
                     'with torch.save, or convert the weights to .safetensors.')
  return {_text(k): v.array(source, _text(k)) for k, v in obj.items()}


def _read_zip(path: str) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{path}: a zip without one <name>/data.pkl is not a torch.save file.')
    prefix = pickles[0][:-len('data.pkl')]
    if prefix + 'byteorder' in names and archive.read(prefix + 'byteorder') != b'little':
      raise ValueError(f'{path}: big-endian tensors are not supported; re-save it on a '
                       'little-endian machine or convert it to .safetensors.')
    unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), path)
    obj = unpickler.load()
    for key, store in unpickler.storages.items():
      record = f'{prefix}data/{key}'
      if record not in names:
        raise ValueError(f'{path}: storage record {record} is missing; the file is damaged.')
      raw = archive.read(record)
      store.data = np.frombuffer(raw, store.dtype, len(raw) // store.dtype.itemsize)
  return _state_dict(obj, path)


def _read_stream(path: str, f) -> dict[str, np.ndarray]:
  header = [_Unpickler(f, path).load() for _ in range(3)]  # Magic, protocol, system info.
  if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
    raise ValueError(f'{path}: not a torch.save file (neither a zip nor the older stream format).')
  if isinstance(header[2], dict) and not header[2].get('little_endian', True):
    raise ValueError(f'{path}: big-endian tensors are not supported; convert it to .safetensors.')
  unpickler = _Unpickler(f, path)
  obj = unpickler.load()
  keys = _Unpickler(f, path).load()
  for key in keys:
    store = unpickler.storages.get(_text(key))
    raw = f.read(8)
    count = struct.unpack('<q', raw)[0] if len(raw) == 8 else -1
    data = f.read(count * store.dtype.itemsize) if store is not None and count >= 0 else b''
    if store is None or count < 0 or len(data) != count * store.dtype.itemsize:
      raise ValueError(f'{path}: storage {key!r} is missing or cut short; the file is damaged.')
    store.data = np.frombuffer(data, store.dtype)
  return _state_dict(obj, path)


def read_pth(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a torch.save'd state dict at `path`; no code in the file runs.

  Raises ValueError naming `path` for a pickle that names anything but tensors, storages and
  OrderedDicts, for anything but a flat state dict, and for a damaged file.
  """
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    with open(path, 'rb') as f:
      return _read_stream(path, f)
  except (pickle.UnpicklingError, EOFError, TypeError, IndexError, KeyError, AttributeError,
          OverflowError, struct.error, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: not a readable torch.save state dict ({type(e).__name__}: '
                     f'{e}).') from None


# ----------------------------------------------------------------------------- writing


class _Global:
  """A module-level name written into the pickle as is (torch need not be importable)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # Pickle checks that a reduce function is callable; never called.
    raise NotImplementedError


class _StorageOut:
  """An array's storage: pickled as torch's persistent id, its bytes go to `data/<key>`."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _TensorOut:

  def __init__(self, storage: _StorageOut):
    self.storage = storage

  def __reduce__(self):
    a = self.storage.array
    strides = tuple(s // a.itemsize for s in a.strides)
    return (_Global(*_REBUILD), (self.storage, 0, a.shape, strides, False,
                                 collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Protocol-2 pickler that writes `_Global`s by name and storages as persistent ids."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_global(self, obj: _Global):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _StorageOut):
      return ('storage', _Global('torch', _DTYPE_STORAGES[obj.array.dtype]), obj.key, 'cpu',
              obj.array.size)
    return None


def write_pth(path: str, tensors: Mapping[str, np.ndarray]) -> str:
  """Writes `tensors` as torch.save writes a state dict (zip format, little-endian); returns
  `path`. torch.load (weights_only too) and `read_pth` read it."""
  storages = [_StorageOut(str(i), np.array(v, order='C')) for i, v in enumerate(tensors.values())]
  for name, store in zip(tensors, storages):
    if store.array.dtype not in _DTYPE_STORAGES:
      raise ValueError(f'write_pth: tensor {name!r} has dtype {store.array.dtype}, which has no '
                       f'torch storage type here ({sorted(map(str, _DTYPE_STORAGES))}).')
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=2).dump(
      collections.OrderedDict((n, _TensorOut(s)) for n, s in zip(tensors, storages)))
  stem = os.path.splitext(os.path.basename(path))[0] or 'archive'
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{stem}/data.pkl', buffer.getvalue())
    archive.writestr(f'{stem}/byteorder', 'little')
    for store in storages:
      archive.writestr(f'{stem}/data/{store.key}', store.array.tobytes())
    archive.writestr(f'{stem}/version', '3\n')
  return path
