"""Traced programs kept on disk: a warm start skips tracing the model in Python, not only XLA.

jax's persistent compilation cache (runtime/compile_cache.py) is keyed by the lowered program,
so every process still traces the model in Python to find its key: 1.3 of the quickstart's
3.1 s warm start, 2.5 s for configs/base.py. `Program` wraps a jitted function: its first call
exports the traced program (`jax.export`, StableHLO) to the cache folder, and a later process
with the same key deserialises it (0.02 s) and lowers a call to it (0.2 s) instead of tracing;
XLA's program then comes from the compilation cache as before. The outputs are those of the
jitted function, bit for bit (tests/test_trace_cache.py). The train step (training/builder.py)
and the sampler (sampling/generate.py) go through it.

A traced program depends on more than its arguments' shapes, so the key holds everything the
trace reads:
  - `key`, from the caller: the config and the constants the function closes over;
  - the arguments' pytree structure, shapes, dtypes and shardings (mesh axes and device ids);
  - the flax logical-axis rules and abstract mesh in effect, and every jax config value (those
    about caches and logging aside);
  - the platform, device kind and count, the jax/jaxlib/flax/optax versions;
  - the source: the bytes of every .py file in this repository's packages, and the size and
    modification time of every other module loaded (site-packages), as Python's .pyc does.
Any change makes a new key, so an entry is never used for a program it did not come from; a
file that cannot be read or called is one warning, and the function is traced as usual.

Off when the compilation cache is off (JAXDIFF_CACHE_DIR=off), with JAXDIFF_TRACE_CACHE=off, for
a cache folder that is not local, and with several processes (each would export its own copy; a
multi-host job traces as before). A program that cannot be exported (a host callback, a custom
call jax.export does not allow) is traced as usual. The files are pickles: like the compilation
cache, the folder is trusted code, never one that others can write.
"""

import hashlib
import os
import pickle
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import numpy as np

from cluster.contract import OFF_WORDS
from runtime import compile_cache

ENV_SWITCH = 'JAXDIFF_TRACE_CACHE'
SUFFIX = '.jaxexport'  # jax's LRU cache only reads its own '*-cache' files in the same folder.
_FORMAT = 1
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_source_digest: str | None = None


def directory() -> str | None:
  """The folder traced programs go to (the compilation cache's), or None when it is off."""
  if os.environ.get(ENV_SWITCH, '').strip().lower() in OFF_WORDS:
    return None
  if not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
    return None
  path = jax.config.jax_compilation_cache_dir
  if not path or ('://' in path and not path.startswith('file://')):
    return None
  return path.removeprefix('file://')


def source_digest() -> str:
  """The code a trace can read: this repository's .py files by content, other modules by stat."""
  global _source_digest
  if _source_digest is None:
    h = hashlib.sha256()
    ours = []
    for top in sorted(os.listdir(_REPO)):
      if os.path.isfile(os.path.join(_REPO, top, '__init__.py')) and top != 'tests':
        for root, dirs, files in os.walk(os.path.join(_REPO, top)):
          dirs[:] = sorted(d for d in dirs if d != '__pycache__')
          ours += [os.path.join(root, f) for f in sorted(files) if f.endswith('.py')]
    for path in ours:
      with open(path, 'rb') as f:
        h.update(os.path.relpath(path, _REPO).encode() + b'\0' + f.read() + b'\0')
    for name, module in sorted(sys.modules.items()):
      path = getattr(module, '__file__', None)
      if not path or path.startswith(_REPO + os.sep):
        continue
      try:
        st = os.stat(path)
      except OSError:
        continue
      h.update(f'{name}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
    _source_digest = h.hexdigest()
  return _source_digest


def _update(h, value: Any) -> None:
  """Hashes nested dicts, sequences, arrays and scalars canonically (dict keys in order)."""
  if isinstance(value, dict):
    h.update(b'{')
    for k in sorted(value, key=str):
      _update(h, str(k))
      _update(h, value[k])
    h.update(b'}')
  elif isinstance(value, (list, tuple)):
    h.update(b'[')
    for v in value:
      _update(h, v)
    h.update(b']')
  elif isinstance(value, (np.ndarray, jax.Array)):
    a = np.asarray(value)
    h.update(f'array{a.shape}{a.dtype}'.encode() + np.ascontiguousarray(a).tobytes())
  else:
    h.update(repr(value).encode() + b'\0')


def _sharding_key(sharding) -> str:
  mesh = getattr(sharding, 'mesh', None)
  ids = getattr(mesh, 'device_ids', None)
  return repr(sharding) + ('' if ids is None else repr(np.asarray(ids).tolist()))


def _leaf_key(x) -> tuple:
  aval = jax.typeof(x)
  return (aval.shape, str(aval.dtype), aval.weak_type, bool(getattr(x, 'committed', False)),
          _sharding_key(getattr(x, 'sharding', None)))


def program_key(name: str, key: Any, in_tree, leaves: Sequence[Any]) -> str:
  """The hash a traced program is filed under (see the module docstring for what it holds)."""
  import flax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  config = {k: v for k, v in jax.config.values.items()
            if not any(s in k for s in ('cache', 'log', 'dump', 'pprint', 'traceback'))}
  devices = jax.devices()
  _update(h, [_FORMAT, name, key, str(in_tree), [_leaf_key(x) for x in leaves],
              repr(nn.get_logical_axis_rules()), repr(jax.sharding.get_abstract_mesh()), config,
              [devices[0].platform, devices[0].device_kind, len(devices), jax.process_count()],
              [jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__],
              source_digest()])
  return h.hexdigest()[:40]


def _write_atomic(path: str, data: bytes) -> None:
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=SUFFIX)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # As jax writes its entries (mkstemp makes them private).
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class Program:
  """A jitted function whose traced program is exported to disk and reused by later processes.

    step = trace_cache.Program(jax.jit(train_step, ...), name='train_step',
                               key=(config.to_json(), null_inputs), donate_argnums=(0,))
    state, metrics = step(state, batch, rng)   # the first call traces, or loads the trace

  `key` is what else the trace reads (the config, constants the function closes over);
  `donate_argnums` are the jitted function's. Later calls run what the first call compiled; one
  whose shapes or dtypes differ (an aspect-ratio bucket, data/buckets.py) runs a Program of its
  own, kept and exported the same way, so a resume that meets the shapes in another order still
  finds each on disk; one whose argument structure differs goes to the jitted function. After it,
  `loaded` says whether the trace came from disk, `trace_seconds` how long tracing (or loading
  and lowering) took and `xla_seconds` XLA (or the compilation cache).
  """

  def __init__(self, jitted: Callable, *, name: str, key: Any, donate_argnums: Sequence[int] = ()):
    self.jitted, self.name, self.key = jitted, name, key
    self.donate_argnums = tuple(donate_argnums)
    self.loaded = False
    self.path: str | None = None
    self.trace_seconds = self.xla_seconds = 0.0
    self.compiled = None  # What the first call compiled (cost and memory analyses).
    self._lowered = None  # ...and lowered.
    self._flat = False  # Calls go to `compiled`, the exported program's (flat leaves), else to jit.
    self._ready = False
    self._in_tree = self._out_tree = self._signature = None
    self._shapes: dict[tuple, Program] | None = {}  # Other shapes than the first's: their Program.

  def __call__(self, *args):
    if not self._ready:
      self.compile(*args)
    if self._flat:
      leaves, tree = jax.tree.flatten(args)
      if tree == self._in_tree:
        try:
          return jax.tree.unflatten(self._out_tree, self.compiled(*leaves))
        except TypeError:  # Checked before it runs: other shapes or dtypes than the first call's.
          if self._shapes is not None:  # (None: this is such a Program itself.)
            return self._of_shapes(leaves)(*args)
    return self.jitted(*args)  # Reuses what compile() compiled; jit traces other structures.

  def compiled_count(self) -> int:
    """How many programs its calls have compiled: the first call's, each other shape's, and those
    the jitted function compiled itself (without the trace cache, or for other structures)."""
    own = [self, *(self._shapes or {}).values()]
    return sum(p._flat for p in own) + self.jitted._cache_size()  # pylint: disable=protected-access

  @property
  def start_seconds(self) -> float:
    """Seconds spent tracing (or loading traces) and compiling (or loading XLA's programs), for
    the first call's shapes and each other shape's."""
    return sum(p.trace_seconds + p.xla_seconds for p in [self, *(self._shapes or {}).values()])

  def _of_shapes(self, leaves) -> 'Program':
    """The Program of these leaves' shapes and dtypes (not the first call's): made once."""
    signature = tuple((np.shape(x), str(jax.typeof(x).dtype)) for x in leaves)
    if signature not in self._shapes:
      other = Program(self.jitted, name=self.name, key=self.key,
                      donate_argnums=self.donate_argnums)
      other._shapes = None  # pylint: disable=protected-access
      self._shapes[signature] = other
    return self._shapes[signature]

  def precompile(self, *args) -> jax.stages.Compiled | None:
    """Traces (or loads) and compiles for these arguments' shapes without running: what the
    first call with them would do (an aspect-ratio bucket's program, before training starts).
    Without the trace cache (several processes, or off) only the first call's: jit's own cache
    is filled by a call alone. The compiled program where it has it (its memory analysis)."""
    if not self._ready:
      self.compile(*args)
      return self.compiled
    leaves, tree = jax.tree.flatten(args)
    if not self._flat or tree != self._in_tree or self._shapes is None:
      return None
    if self._signature == tuple(np.shape(x) for x in leaves):
      return self.compiled
    program = self._of_shapes(leaves)
    if not program._ready:  # pylint: disable=protected-access
      program.compile(*args)
    return program.compiled

  def lower(self, *args) -> jax.stages.Lowered:
    """The program a call with these arguments runs, lowered (for its HLO: the exported trace's
    instruction names are not the jitted function's); traces (or loads) and compiles it first."""
    self.precompile(*args)
    leaves, tree = jax.tree.flatten(args)
    if not self._flat or tree != self._in_tree:
      return self.jitted.lower(*args)
    if self._signature == tuple(np.shape(x) for x in leaves) or self._shapes is None:
      return self._lowered
    return self._of_shapes(leaves).lower(*args)

  def compile(self, *args) -> None:
    """Traces (or loads the trace) and compiles for these arguments; the first call does it."""
    self._ready = True
    leaves, self._in_tree = jax.tree.flatten(args)
    self._signature = tuple(np.shape(x) for x in leaves)
    folder = directory()
    t0 = time.perf_counter()
    if folder is not None:
      self.path = os.path.join(
          folder, f'jaxdiff-{self.name}-{program_key(self.name, self.key, self._in_tree, leaves)}'
          f'{SUFFIX}')
      exported = self._load() if os.path.exists(self.path) else None
      self.loaded = exported is not None
      if exported is None:
        exported = self._export(leaves)
      if exported is not None:
        def call(*xs):
          return exported.call(*xs)
        call.__name__ = call.__qualname__ = self.name  # jit(train_step) in the logs, as before.
        try:
          with compile_cache.gc_paused():
            lowered = jax.jit(call, donate_argnums=_leaf_indices(
                args, self.donate_argnums)).lower(*leaves)
          self._flat = True
        except Exception as e:  # pylint: disable=broad-except
          logging.warning('%s: the traced program %s does not take these arguments (%s: %s); '
                          'tracing it again.', self.name, self.path, type(e).__name__, e)
          self.loaded = False
    if not self._flat:
      with compile_cache.gc_paused():
        lowered = self.jitted.lower(*args)
    t1 = time.perf_counter()
    self._lowered = lowered
    self.compiled = lowered.compile()  # Without the export, jit's own call finds it in its caches.
    self.trace_seconds, self.xla_seconds = t1 - t0, time.perf_counter() - t1
    if self._flat:
      logging.info('%s: traced program %s %s (%.2f s).', self.name,
                   'loaded from' if self.loaded else 'written to', self.path, self.trace_seconds)

  def _load(self):
    try:
      with open(self.path, 'rb') as f:
        fmt, serialized, out_tree = pickle.load(f)
      if fmt != _FORMAT:
        raise ValueError(f'format {fmt}, expected {_FORMAT}')
      self._out_tree = out_tree
      return jax.export.deserialize(bytearray(serialized))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: the traced program %s cannot be read (%s: %s); tracing it again.',
                      self.name, self.path, type(e).__name__, e)
      return None

  def _export(self, leaves):
    out_trees = []
    in_tree, jitted = self._in_tree, self.jitted

    def flat(*xs):
      out, tree = jax.tree.flatten(jitted(*jax.tree.unflatten(in_tree, xs)))
      out_trees.append(tree)
      return out
    flat.__name__ = flat.__qualname__ = self.name

    try:
      # An uncommitted array (a fresh PRNG key) goes where jit puts it: no sharding of its own.
      specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type,
                                    sharding=x.sharding if getattr(x, 'committed', False) else None)
               for x, a in zip(leaves, map(jax.typeof, leaves))]
      with compile_cache.gc_paused():
        exported = jax.export.export(jax.jit(flat))(*specs)
      serialized = exported.serialize()
      self._out_tree = out_trees[-1]
      # What a later process loads, so that both compile the same module (one cache entry).
      exported = jax.export.deserialize(serialized)
    except Exception as e:  # pylint: disable=broad-except
      logging.info('%s: not keeping the traced program (%s: %s); tracing as usual.', self.name,
                   type(e).__name__, str(e).splitlines()[0] if str(e) else '')
      return None
    try:
      _write_atomic(self.path, pickle.dumps((_FORMAT, bytes(serialized), self._out_tree)))
    except OSError as e:
      logging.warning('%s: cannot write the traced program to %s (%s); the next start traces '
                      'it again.', self.name, self.path, e)
    return exported


def _leaf_indices(args, argnums: Sequence[int]) -> tuple[int, ...]:
  """The positions, among all of `args`' leaves, of the leaves of the arguments `argnums`."""
  out, start = [], 0
  for i, a in enumerate(args):
    n = len(jax.tree.leaves(a))
    if i in argnums:
      out += range(start, start + n)
    start += n
  return tuple(out)
