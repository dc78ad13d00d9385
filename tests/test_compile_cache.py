"""The persistent compilation cache: a second process loads what the first compiled (counted from
jax's events, and seen in the cache folder, never from timings), where the folder comes from, and
that an unusable folder is one warning, not a failed run."""
import json
import logging as pylogging
import os
import re
import subprocess
import sys

import jax
import pytest

from runtime import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One small program in a fresh process: what enable() returned, what was compiled and loaded.
_PROGRAM = """
import json
from runtime import compile_cache
path = compile_cache.enable()
import jax, jax.numpy as jnp

@jax.jit
def poly(x):
  for i in range(8):
    x = jnp.tanh(x @ x.T) + i
  return x

x = jnp.ones((8, 8))
with compile_cache.CompileCounter() as counter:
  poly(x).block_until_ready()
print(json.dumps({'path': path, 'compiled': counter.compiled, 'loaded': counter.loaded,
                  'written': counter.written}))
"""


def _env(cache_dir, **extra):
  """This environment with a fresh cache folder (not the session's) that keeps every program."""
  env = {k: v for k, v in os.environ.items() if k != compile_cache.JAX_ENV_DIR}
  env.update({'JAXDIFF_CACHE_DIR': str(cache_dir),
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', **extra})
  return env


def _run_program(env):
  proc = subprocess.run([sys.executable, '-c', _PROGRAM], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.full  # Two processes (second starts from the caches).
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  cache = tmp_path / 'xla'
  first = _run_program(_env(cache))
  assert first['path'] == str(cache)
  assert 'jit(poly)' in first['compiled'] and first['loaded'] == []
  assert first['written'] == len(first['compiled'])  # Threshold 0: every program is kept.
  files = sorted(os.listdir(cache))
  assert any(f.startswith('jit_poly-') for f in files), files

  second = _run_program(_env(cache))
  assert 'jit(poly)' in second['loaded']
  assert second['compiled'] == [] and second['written'] == 0
  assert sorted(os.listdir(cache)) == files  # Nothing new written, no probe file left behind.


def test_the_off_switch_compiles_every_time_and_writes_nothing(tmp_path):
  cache = tmp_path / 'xla'
  env = _env(cache, JAXDIFF_CACHE_DIR='off', JAX_COMPILATION_CACHE_DIR=str(cache))
  for _ in range(2):
    run = _run_program(env)
    assert run['path'] is None and 'jit(poly)' in run['compiled'] and run['loaded'] == []
  assert not cache.exists() or not os.listdir(cache)


@pytest.mark.parametrize('environ, expected', [
    ({'XDG_CACHE_HOME': '/x/cache'}, '/x/cache/jaxdiff/xla'),
    ({}, os.path.expanduser('~/.cache/jaxdiff/xla')),
    ({'XDG_CACHE_HOME': ''}, os.path.expanduser('~/.cache/jaxdiff/xla')),
    ({'JAXDIFF_CACHE_DIR': '/mine', 'XDG_CACHE_HOME': '/x'}, '/mine'),
    ({'JAXDIFF_CACHE_DIR': '~/c'}, os.path.expanduser('~/c')),
    ({'JAXDIFF_CACHE_DIR': 'rel/xla'}, os.path.abspath('rel/xla')),
    ({'JAX_COMPILATION_CACHE_DIR': '/jax', 'JAXDIFF_CACHE_DIR': '/mine'}, '/jax'),
    ({'JAXDIFF_CACHE_DIR': 'off', 'JAX_COMPILATION_CACHE_DIR': '/jax'}, None),
    ({'JAXDIFF_CACHE_DIR': 'OFF'}, None),
    ({'JAXDIFF_CACHE_DIR': '0'}, None),
    ({'JAXDIFF_CACHE_DIR': 'none'}, None),
])
def test_the_folder_comes_from_the_environment(environ, expected):
  assert compile_cache.resolve_dir(environ) == expected


@pytest.fixture
def jax_cache_config():
  """enable() sets process-wide jax options: this test's changes are undone after it."""
  names = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs', 'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_enable_creates_the_folder_and_sets_the_thresholds(tmp_path, jax_cache_config):
  cache = tmp_path / 'new' / 'xla'
  assert compile_cache.enable({'JAXDIFF_CACHE_DIR': str(cache)}) == str(cache)
  assert cache.is_dir() and os.listdir(cache) == []  # The write probe is gone.
  assert jax.config.jax_compilation_cache_dir == str(cache)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECS
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0


def test_enable_leaves_thresholds_the_user_set(tmp_path, jax_cache_config):
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 3.0)
  compile_cache.enable({'JAXDIFF_CACHE_DIR': str(tmp_path),
                        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '3'})
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0


def test_an_unwritable_folder_is_one_warning_and_no_cache(tmp_path, caplog, jax_cache_config):
  (tmp_path / 'a_file').write_text('')
  cache = tmp_path / 'a_file' / 'xla'  # Cannot be created, not even by root.
  with caplog.at_level(pylogging.INFO):
    assert compile_cache.enable({'JAXDIFF_CACHE_DIR': str(cache)}) is None
  warnings = [r.getMessage() for r in caplog.records if r.levelno == pylogging.WARNING]
  assert len(warnings) == 1, warnings
  assert str(cache) in warnings[0] and 'JAXDIFF_CACHE_DIR=off' in warnings[0]
  assert not jax.config.jax_enable_compilation_cache


def test_the_off_switch_turns_off_jax_own_folder_too(tmp_path, jax_cache_config):
  assert compile_cache.enable({'JAXDIFF_CACHE_DIR': 'off',
                               'JAX_COMPILATION_CACHE_DIR': str(tmp_path)}) is None
  assert not jax.config.jax_enable_compilation_cache


def _xla_summary(text):
  """(compiled, loaded) of the entry point's 'XLA: compiled N programs ...' log line."""
  found = re.findall(r'XLA: compiled (\d+) programs in .*?, loaded (\d+) from the compilation',
                     text)
  assert len(found) == 1, text[-3000:]
  return tuple(int(n) for n in found[0])


@pytest.mark.full  # Two sample.py processes (~20 s); a second process loading: the tests above.
def test_a_second_sample_cli_loads_its_programs_from_the_cache(tiny_run, tmp_path):
  """sample.py twice on the tiny workdir with a fresh cache: the second compiles nothing."""
  env = _env(tmp_path / 'xla')
  runs = []
  for name in ('first', 'second'):
    proc = subprocess.run(
        [sys.executable, 'sample.py', f'--workdir={tiny_run.workdir}', '--prompt=a red circle',
         '--steps=2', f'--out={tmp_path / name}', '--verbose'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs.append(_xla_summary(proc.stderr))
  (compiled, loaded), (compiled_again, loaded_again) = runs
  assert compiled > 0 and loaded == 0
  assert compiled_again == 0 and loaded_again == compiled


# A run of the tiny config pre-empted at step 2 (training.loop's `stop_at`), in its own process.
_PREEMPTED_RUN = """
import json, sys
from runtime import compile_cache
compile_cache.enable()
from configs import loading
from training import loop
config = loading.load('configs/shapes.py:tiny', sys.argv[2:])
with compile_cache.CompileCounter() as counter:
  loop.train_and_evaluate(config, sys.argv[1], stop_at=2)
print(json.dumps({'compiled': counter.compiled, 'loaded': counter.loaded}))
"""


@pytest.mark.full  # Two training processes (about 2.5 minutes on 2 shared cores).
def test_a_resumed_train_cli_loads_its_train_step_from_the_cache(tmp_path):
  """A run pre-empted at step 2, then `train.py` re-run to finish it: the train step comes from
  the cache. (With threshold 0 a compiled program is always written: no new train_step entry
  means it was not compiled. A different optim.num_steps is another program: the learning-rate
  schedule is compiled in.)"""
  cache, workdir = tmp_path / 'xla', tmp_path / 'run'
  overrides = ['--config.optim.num_steps=4', '--config.logging.eval_at_end=False']
  train_steps = lambda: sorted(f for f in os.listdir(cache) if f.startswith('jit_train_step-'))
  first = subprocess.run([sys.executable, '-c', _PREEMPTED_RUN, str(workdir), *overrides],
                         cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'jit(train_step)' in json.loads(first.stdout.strip().splitlines()[-1])['compiled']
  written = train_steps()
  assert len(written) == 1, written

  second = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/shapes.py:tiny', f'--workdir={workdir}',
       *overrides], cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'steps 2 -> 4' in second.stdout, second.stdout
  log = (workdir / 'train.log').read_text()
  assert f'XLA compilation cache: {cache} ' in log
  assert train_steps() == written
  assert 'jit(train_step)' not in log.split('XLA: compiled')[-1].split(', loaded')[0]
  assert _xla_summary(log)[1] >= 1  # Loaded from the cache.


def test_gc_paused_turns_the_collector_off_and_back_on():
  import gc  # pylint: disable=g-import-not-at-top
  assert gc.isenabled()
  with compile_cache.gc_paused():
    assert not gc.isenabled()
    with compile_cache.gc_paused():  # Nested (a sampler traced inside an evaluation).
      assert not gc.isenabled()
    assert not gc.isenabled()  # Still inside the outer pause.
  assert gc.isenabled()
  with pytest.raises(ZeroDivisionError):
    with compile_cache.gc_paused():
      _ = 1 / 0
  assert gc.isenabled()  # An error inside does not leave it off.
  gc.disable()
  try:
    with compile_cache.gc_paused():
      pass
    assert not gc.isenabled()  # Off before: left off.
  finally:
    gc.enable()


def test_gc_paused_across_threads_ends_with_the_last_pause():
  import gc  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  inside, release = threading.Event(), threading.Event()

  def hold():
    with compile_cache.gc_paused():
      inside.set()
      release.wait(10)

  thread = threading.Thread(target=hold)
  thread.start()
  inside.wait(10)
  with compile_cache.gc_paused():
    pass
  assert not gc.isenabled()  # The other thread is still tracing.
  release.set()
  thread.join(10)
  assert gc.isenabled()
