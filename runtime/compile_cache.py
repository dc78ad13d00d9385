"""The persistent XLA compilation cache: a second run of the same programs loads them from disk.

`train.py` and `sample.py` call `enable()` before their first jit, so a resumed `train.py` or a
second `sample.py` on a workdir loads its programs instead of compiling them (evaluate.py compiles
nothing). The folder, first match wins:

  JAXDIFF_CACHE_DIR=off (0, none, false, no)  no persistent cache
  JAX_COMPILATION_CACHE_DIR=DIR              jax's own variable (tests/conftest.py sets it)
  JAXDIFF_CACHE_DIR=DIR
  ${XDG_CACHE_HOME:-~/.cache}/jaxdiff/xla    shared by every run of the user on the machine

jax keys each entry by the program, the devices, the compile options and the jax/XLA version, so
a stale entry is never used; the cache changes no result (a config value that is a constant of
the program, e.g. the learning-rate schedule's, makes a new entry). Only process 0 writes. Like any
compilation cache it is trusted code: never point it at a folder others can write.

`CompileCounter` counts what a block of code compiled and what it loaded from the cache (from
jax.monitoring's events), for the logs, the tests and the benchmarks.

`gc_paused()` wraps the calls that trace a program (a jitted function's first call): tracing
allocates millions of objects that stay alive until the program is lowered, and each full pass of
Python's cyclic garbage collector that they set off walks all of them again (the quickstart
model's train step: 1.8 -> 1.3 s of tracing, BENCHMARKS.md). The cycles made meanwhile are
collected after the block.
"""

import contextlib
import gc
import os
import tempfile
import threading
from typing import Mapping

from absl import logging

from cluster.contract import OFF_WORDS

ENV_DIR = 'JAXDIFF_CACHE_DIR'
JAX_ENV_DIR = 'JAX_COMPILATION_CACHE_DIR'
# Programs that compile faster than this are not written (jax's default is 1 s). Each entry is a
# file, and a loaded entry still costs a read and a deserialisation.
MIN_COMPILE_SECS = 0.5

# jax 0.10 event names (jax/_src/compiler.py, compilation_cache.py, dispatch.py).
HIT_EVENT = '/jax/compilation_cache/cache_hits'
WRITE_EVENT = '/jax/compilation_cache/cache_misses'  # Recorded when a compiled entry is written.
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # Compile or cache load; fun_name=.


def resolve_dir(environ: Mapping[str, str] | None = None) -> str | None:
  """The cache folder the environment asks for (see the module docstring); None: turned off."""
  env = os.environ if environ is None else environ
  if env.get(ENV_DIR, '').strip().lower() in OFF_WORDS:
    return None
  for name in (JAX_ENV_DIR, ENV_DIR):
    if path := env.get(name, '').strip():
      return path if '://' in path else os.path.abspath(os.path.expanduser(path))
  cache_home = env.get('XDG_CACHE_HOME', '').strip() or os.path.join(os.path.expanduser('~'),
                                                                     '.cache')
  return os.path.join(cache_home, 'jaxdiff', 'xla')


def _why_unwritable(path: str) -> str | None:
  """Why `path` cannot hold the cache (created if missing), or None when it can."""
  if '://' in path and not path.startswith('file://'):
    return None  # A remote store (gs://...): jax's to open.
  local = path.removeprefix('file://')
  try:
    os.makedirs(local, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=local, prefix='.jaxdiff-probe-'):
      pass
  except OSError as e:
    return f'{type(e).__name__}: {e.strerror or e}'
  return None


def enable(environ: Mapping[str, str] | None = None) -> str | None:
  """Turns on jax's persistent compilation cache; returns its folder, or None when it is off.

  Call before the first jit of the process. An unusable folder is one warning, and the run goes
  on without the cache: the cache never fails a run. `environ` (default os.environ) is read for
  the folder and for the jax variables that override the thresholds set here.
  """
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ if environ is None else environ
  path = resolve_dir(env)
  if path is not None and not jax.config.jax_enable_compilation_cache:
    path = None  # JAX_ENABLE_COMPILATION_CACHE=false: the user's own off switch.
  if path is not None and (why := _why_unwritable(path)):
    logging.warning('The XLA compilation cache folder %s cannot be written (%s): every program '
                    'is compiled. Set %s=DIR to move the cache, or %s=off.', path, why, ENV_DIR,
                    ENV_DIR)
    path = None
  if path is None:
    jax.config.update('jax_enable_compilation_cache', False)
    logging.info('XLA compilation cache: off.')
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in env:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECS)
  if 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES' not in env:
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  logging.info('XLA compilation cache: %s (programs compiling in >= %.2g s; %s=off turns it off).',
               path, jax.config.jax_persistent_cache_min_compile_time_secs, ENV_DIR)
  return path


class _GCPause:
  """Process-wide, thread-safe: the collector is off while any thread is inside a pause, and back
  to its previous state when the last one leaves."""

  def __init__(self):
    self._lock = threading.Lock()
    self._depth = 0
    self._was_enabled = False

  @contextlib.contextmanager
  def __call__(self):
    with self._lock:
      if self._depth == 0:
        self._was_enabled = gc.isenabled()
        gc.disable()
      self._depth += 1
    try:
      yield
    finally:
      with self._lock:
        self._depth -= 1
        if self._depth == 0 and self._was_enabled:
          gc.enable()


gc_paused = _GCPause()


class CompileCounter:
  """Counts the XLA programs compiled, and those loaded from the persistent cache, while open.

    with compile_cache.CompileCounter() as counter:
      step(state, batch)
    counter.compiled  # ['train_step']: names of the programs XLA compiled
    counter.loaded    # names of those loaded from the cache instead

  `programs` holds (name, seconds, loaded) in order; `written` counts the entries this block added
  to the cache. Counts every thread of the process.
  """

  def __init__(self):
    self.programs: list[tuple[str, float, bool]] = []
    self.written = 0
    self._hit = threading.local()  # A cache hit is reported inside its compile event's span.
    self._lock = threading.Lock()

  @property
  def compiled(self) -> list[str]:
    return [name for name, _, loaded in self.programs if not loaded]

  @property
  def loaded(self) -> list[str]:
    return [name for name, _, loaded in self.programs if loaded]

  @property
  def compile_seconds(self) -> float:
    return sum(seconds for _, seconds, loaded in self.programs if not loaded)

  @property
  def load_seconds(self) -> float:
    return sum(seconds for _, seconds, loaded in self.programs if loaded)

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event == HIT_EVENT:
      self._hit.value = True
    elif event == WRITE_EVENT:
      with self._lock:
        self.written += 1

  def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
    if event != COMPILE_EVENT:
      return
    hit, self._hit.value = getattr(self._hit, 'value', False), False
    with self._lock:
      self.programs.append((str(kwargs.get('fun_name', '?')), seconds, hit))

  def __enter__(self) -> 'CompileCounter':
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.register_event_listener(self._on_event)
    monitoring.register_event_duration_secs_listener(self._on_duration)
    return self

  def __exit__(self, *exc) -> None:
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.unregister_event_listener(self._on_event)
    monitoring.unregister_event_duration_listener(self._on_duration)

  def summary(self, slowest: int = 3) -> str:
    """One line for the log, naming the `slowest` compiles."""
    top = sorted((p for p in self.programs if not p[2]), key=lambda p: -p[1])[:slowest]
    named = ', '.join(f'{name} {seconds:.1f} s' for name, seconds, _ in top)
    return (f'XLA: compiled {len(self.compiled)} programs in {self.compile_seconds:.1f} s'
            + (f' ({named})' if named else '') + f', loaded {len(self.loaded)} from the '
            f'compilation cache in {self.load_seconds:.1f} s, wrote {self.written} cache entries.')
