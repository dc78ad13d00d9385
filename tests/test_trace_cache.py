"""Traced programs on disk (runtime/trace_cache.py): a later Program, or a later process, loads
the trace instead of tracing (counted by the Python function's own trace counter), gives the
jitted function's outputs bit for bit, and never uses an entry whose key differs; a damaged
file, an unexportable function and the off switches fall back to tracing. The sampler
(sampling/generate.py) goes through it too."""
import json
import logging as pylogging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from runtime import trace_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_dir(tmp_path):
  """A fresh compilation cache folder for this test (jax's options restored after it)."""
  names = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'xla'))
  yield tmp_path / 'xla'
  for name, value in saved.items():
    jax.config.update(name, value)


class Step:
  """A train-step-like function of (state, x) that counts how often Python traces it."""

  def __init__(self):
    self.traces = 0

  def __call__(self, state, x):
    self.traces += 1
    w = state['w'] - 0.1 * jnp.tanh(x.T @ x @ state['w'])
    return {'w': w, 'n': state['n'] + 1}, {'loss': jnp.mean(w ** 2)}


def _state(seed=0):
  w = jax.random.normal(jax.random.PRNGKey(seed), (8, 8))
  return {'w': w, 'n': jnp.zeros((), jnp.int32)}


def _program(fn, key='k'):
  return trace_cache.Program(jax.jit(fn, donate_argnums=(0,)), name='step', key={'k': key},
                             donate_argnums=(0,))


def _entries(folder):
  return sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                if f.endswith(trace_cache.SUFFIX))


def _reference(steps, x):
  state, out = _state(), None
  for _ in range(steps):
    state, out = jax.jit(Step())(state, x)
  return state, out


def _assert_same(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_a_later_program_loads_the_trace_and_gives_the_same_outputs(cache_dir):
  x = jnp.ones((4, 8))
  fn = Step()
  first = _program(fn)
  out = first(_state(), x)
  assert fn.traces == 1 and not first.loaded
  assert _entries(cache_dir) == [os.path.basename(first.path)]

  fn2 = Step()  # Another function object: jax's in-memory caches know nothing of it.
  second = _program(fn2)
  state = _state()
  out2 = second(state, x)
  assert second.loaded and fn2.traces == 0  # Loaded, not traced.
  assert state['w'].is_deleted()  # The state was donated, as the jitted function donates it.
  _assert_same(out, _reference(1, x))
  _assert_same(out2, _reference(1, x))
  out3 = second(out2[0], x)
  _assert_same(out3, _reference(2, x))
  assert fn2.traces == 0 and len(_entries(cache_dir)) == 1


def test_the_key_holds_the_callers_key_the_shapes_and_the_source(cache_dir, monkeypatch):
  x = jnp.ones((4, 8))
  first = _program(Step())
  first(_state(), x)
  others = [_program(Step(), key='other'), _program(Step()), _program(Step())]
  others[0](_state(), x)  # Another config.
  others[1](_state(), jnp.ones((2, 8)))  # Other shapes.
  monkeypatch.setattr(trace_cache, '_source_digest', 'edited')  # A source file changed.
  others[2](_state(), x)
  assert not any(p.loaded for p in others)
  assert len({first.path, *(p.path for p in others)}) == 4 == len(_entries(cache_dir))
  leaves, tree = jax.tree.flatten((_state(), x))
  assert (trace_cache.program_key('step', 'k', tree, leaves)
          == trace_cache.program_key('step', 'k', tree, leaves))


def test_a_damaged_file_is_one_warning_and_a_new_trace(cache_dir, caplog):
  x = jnp.ones((4, 8))
  fn = Step()
  first = _program(fn)
  first(_state(), x)
  with open(first.path, 'wb') as f:
    f.write(b'not a traced program')
  second = _program(Step())
  with caplog.at_level(pylogging.WARNING):
    out = second(_state(), x)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == pylogging.WARNING]
  assert len(warnings) == 1 and first.path in warnings[0] and 'tracing it again' in warnings[0]
  assert not second.loaded
  _assert_same(out, _reference(1, x))
  third = _program(Step())  # The rewritten file is whole again.
  third(_state(), x)
  assert third.loaded


def test_other_shapes_in_a_later_call_go_to_jit(cache_dir):
  fn = Step()
  program = _program(fn)
  program(_state(), jnp.ones((4, 8)))
  out = program(_state(), jnp.ones((2, 8)))
  _assert_same(out, _reference(1, jnp.ones((2, 8))))


@pytest.mark.parametrize('switch', ['env', 'cache_off'])
def test_the_off_switches_trace_as_usual_and_write_nothing(cache_dir, monkeypatch, switch):
  if switch == 'env':
    monkeypatch.setenv(trace_cache.ENV_SWITCH, 'off')
  else:
    jax.config.update('jax_enable_compilation_cache', False)
  assert trace_cache.directory() is None
  fn = Step()
  out = _program(fn)(_state(), jnp.ones((4, 8)))
  _assert_same(out, _reference(1, jnp.ones((4, 8))))
  assert _entries(cache_dir) == []


def test_an_unexportable_function_is_traced_as_usual(cache_dir):
  def with_callback(state, x):
    y = jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return Step()(state, y)

  program = _program(with_callback)
  out = program(_state(), jnp.ones((4, 8)))
  _assert_same(out, jax.jit(with_callback)(_state(), jnp.ones((4, 8))))
  assert not program.loaded and _entries(cache_dir) == []


def test_a_sharded_program_round_trips_on_a_mesh(cache_dir):
  mesh = jax.make_mesh((2, 2), ('data', 'fsdp'), (jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  w = jax.device_put(_state()['w'], NamedSharding(mesh, P('fsdp', None)))
  x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P('data', None)))
  def program(fn):
    return trace_cache.Program(
        jax.jit(fn, donate_argnums=(0,),
                out_shardings=({'w': NamedSharding(mesh, P('fsdp', None)),
                                'n': NamedSharding(mesh, P())}, None)),
        name='step', key='mesh', donate_argnums=(0,))

  with jax.set_mesh(mesh):
    first = program(Step())({'w': w.copy(), 'n': jnp.zeros((), jnp.int32)}, x)
    fn = Step()
    second = program(fn)
    state, out = second({'w': w.copy(), 'n': jnp.zeros((), jnp.int32)}, x)
  assert second.loaded and fn.traces == 0
  _assert_same((state, out), first)
  assert state['w'].sharding.is_equivalent_to(NamedSharding(mesh, P('fsdp', None)), 2)


# A process that runs one Program and prints whether its trace was loaded.
_PROCESS = """
import json, sys
from runtime import compile_cache
compile_cache.enable()
import jax, jax.numpy as jnp
from runtime import trace_cache

def step(state, x):
  for i in range(4):
    state = jnp.tanh(state @ x) + i
  return state

program = trace_cache.Program(jax.jit(step, donate_argnums=(0,)), name='step', key='p',
                              donate_argnums=(0,))
out = program(jnp.ones((8, 8)), jnp.full((8, 8), 0.1))
print(json.dumps({'loaded': program.loaded, 'sum': float(out.sum())}))
"""


@pytest.mark.full  # Two processes (second starts from the caches); one process: the tests above.
def test_a_second_process_loads_the_trace(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['JAXDIFF_CACHE_DIR'] = str(tmp_path / 'xla')
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, '-c', _PROCESS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert [r['loaded'] for r in runs] == [False, True]
  assert runs[0]['sum'] == runs[1]['sum']


def test_each_shape_gets_its_own_program_on_disk(cache_dir):
  """Aspect-ratio buckets: batches of several shapes; a later Program that meets them in another
  order (a resume) loads every one, and `precompile` prepares a shape without running it."""
  small, big = jnp.ones((4, 8)), jnp.full((6, 8), 0.5)
  placed = lambda: jax.device_put(_state(), jax.devices()[0])  # Committed, as a step's outputs.
  fn = Step()
  first = _program(fn)
  state = placed()
  for x in (small, big, small, big):
    state, out = first(state, x)
  assert fn.traces == 2 and len(_entries(cache_dir)) == 2
  want_state, want = _state(), None
  for x in (small, big, small, big):
    want_state, want = jax.jit(Step())(want_state, x)
  _assert_same((state, out), (want_state, want))

  later_fn = Step()
  later = _program(later_fn)
  later.precompile(placed(), big)  # The resume's first batch is the other shape.
  later.precompile(placed(), small)
  state = placed()
  for x in (big, small):
    state, out = later(state, x)
  assert later_fn.traces == 0 and later.loaded and len(_entries(cache_dir)) == 2
  want_state, want = _state(), None
  for x in (big, small):
    want_state, want = jax.jit(Step())(want_state, x)
  _assert_same((state, out), (want_state, want))


def tiny_sampler():
  """(A function making a new Generator of the tiny config's networks over all devices, as a new
  process would make it; random parameters placed as sample.py restores them; the sampler
  settings)."""
  from configs import shapes, specs  # pylint: disable=g-import-not-at-top
  from runtime import sharding, state as state_lib  # pylint: disable=g-import-not-at-top
  from runtime.settings import MeshSpec  # pylint: disable=g-import-not-at-top
  from sampling import generate  # pylint: disable=g-import-not-at-top
  run = specs.build(shapes.get_config('tiny'))
  unet, text = state_lib.build_networks(run, autoencoder=None)
  mesh = sharding.make_mesh(MeshSpec.data_parallel())
  abstract = state_lib.abstract_params(
      mesh, run.mesh.logical_axis_rules, unet=unet, text_encoder=text,
      input_shape=state_lib.diffusion_shape(run.data.image_size, None))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jax.device_put(
      (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding), abstract)
  new = lambda: generate.Generator(unet, text, run.diffusion, run.data.image_size, mesh)
  return new, (params['unet'], params['text'] if text.trainable else text.init(None)), run.sampler


@pytest.mark.full  # Three samplers of the tiny networks (~15 s); the cache itself: the tests above.
def test_the_sampler_loads_its_trace_and_gives_the_same_images(cache_dir, monkeypatch):
  """sampling/generate.py: a later Generator (sample.py's second start) loads the sampler's trace
  instead of tracing the networks, and draws the uncached program's images bit for bit; the
  static arguments (sampler, thresholding) are in the key."""
  from sampling import generate  # pylint: disable=g-import-not-at-top
  traces = []
  sample = generate.Generator._sample  # pylint: disable=protected-access
  monkeypatch.setattr(generate.Generator, '_sample',
                      lambda self, *a, **k: traces.append(k) or sample(self, *a, **k))
  prompts = ['a red square', 'a blue circle', 'a green triangle', 'a white square'] * 2
  new, params, recipe = tiny_sampler()
  recipe = recipe.replace(name='ddim', num_steps=2, guidance_scale=2.0, thresholding=False)

  def draw():
    gen = new()
    return gen, gen(*params, prompts, seed=5, settings=recipe)

  with monkeypatch.context() as off:
    off.setenv(trace_cache.ENV_SWITCH, 'off')
    _, reference = draw()  # Plain jit, as before the trace cache.
  assert _entries(cache_dir) == [] and len(traces) == 1
  _, out = draw()
  assert len(traces) == 2 and len(_entries(cache_dir)) == 1
  later, again = draw()
  assert len(traces) == 2  # Loaded, not traced.
  assert later.compiled_count() == 1 and later.compile_seconds > 0
  np.testing.assert_array_equal(out, reference)
  np.testing.assert_array_equal(again, reference)
  # What the profiler reads (benchmarks/profile.py): the loaded program, not a new trace.
  assert 'jit_sample_ddim' in later.lower(*params, prompts, seed=5, settings=recipe).as_text()
  assert len(traces) == 2
  # The static arguments are in the key: another sampler or thresholding is another program.
  program = later._program  # pylint: disable=protected-access
  programs = [program({'sampler_name': name, 'thresholding': t}, False)
              for name, t in (('ddim', False), ('ddim', True), ('euler', False))]
  assert programs[0].loaded and programs[0].path == os.path.join(cache_dir, _entries(cache_dir)[0])
  keys = [trace_cache.program_key(p.name, p.key, None, []) for p in programs]
  assert len(set(keys)) == 3
