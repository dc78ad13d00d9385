"""The CPU host set-up the entry points apply before jax starts (runtime/host.py): how many XLA
CPU devices, and malloc that keeps freed memory instead of mapping it afresh each step."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from runtime import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('cores,batch,accum,mesh,want', [
    (2, 32, 1, (-1, 1, 1), 2),   # Every core.
    (3, 32, 1, (-1, 1, 1), 2),   # 3 does not split 32.
    (8, 12, 1, (-1, 1, 1), 6),
    (8, 32, 4, (-1, 1, 1), 8),   # 32 / 4 micro-batches = 8 a micro-batch.
    (8, 32, 16, (-1, 1, 1), 2),  # 2 a micro-batch.
    (1, 32, 1, (-1, 1, 1), 1),
    (8, 32, 1, (-1, 2, 1), 8),   # fsdp=2: a multiple of 2.
    (2, 32, 1, (-1, 4, 1), 4),   # The mesh needs more than the cores: what it needs.
    (8, 2, 1, (-1, 1, 2), 4),    # tensor=2: the batch splits over data only (4 / 2 = 2).
    (8, 32, 1, (2, 1, 1), 2),    # No -1 axis: the mesh's size.
])
def test_the_device_count_is_the_most_cores_the_batch_splits_over(cores, batch, accum, mesh, want):
  assert host.cpu_devices(cores, batch, accum, mesh) == want


def _config(**changes):
  c = ml_collections.ConfigDict({
      'data': {'global_batch_size': 32}, 'optim': {'grad_accum_steps': 1},
      'mesh': {'data': -1, 'fsdp': 1, 'tensor': 1}, 'model': {'pretrained': ''}})
  c.update_from_flattened_dict(changes)
  return c


def test_setup_sets_the_device_count_unless_xla_flags_has_one(monkeypatch):
  monkeypatch.setattr(host, 'keep_freed_memory', lambda environ: False)  # Not this process's.
  monkeypatch.setattr(host, 'cores', lambda: 4)
  env = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_cpu_enable_fast_math=false'}
  assert host.setup(_config(), env) == '4 XLA CPU devices on 4 cores'
  assert env['XLA_FLAGS'] == ('--xla_cpu_enable_fast_math=false '
                              '--xla_force_host_platform_device_count=4')
  mine = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  assert host.setup(_config(), mine) == ''
  assert mine['XLA_FLAGS'] == '--xla_force_host_platform_device_count=1'


def test_setup_for_a_sampling_batch_takes_the_devices_it_splits_over(monkeypatch):
  monkeypatch.setattr(host, 'keep_freed_memory', lambda environ: False)
  monkeypatch.setattr(host, 'cores', lambda: 4)
  for batch, want in ((8, 4), (6, 3), (1, 1)):
    env = {'JAX_PLATFORMS': 'cpu'}
    host.setup(batch=batch, environ=env)
    assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count={want}'
  env = {'JAX_PLATFORMS': 'cpu'}
  host.setup(environ=env)  # No batch (evaluate.py, sample.py --pretrained): jax's default.
  assert 'XLA_FLAGS' not in env


@pytest.mark.parametrize('env,changes', [
    ({'JAX_PLATFORMS': 'cuda'}, {}),                             # An accelerator: nothing.
    ({'JAX_PLATFORMS': 'cpu', 'JAXDIFF_NUM_PROCESSES': '2'}, {}),  # Its launcher decides.
    ({'JAX_PLATFORMS': 'cpu', 'JAXDIFF_COORDINATOR': 'h:1'}, {}),
    ({'JAX_PLATFORMS': 'cpu'}, {'model.pretrained': '/models/sd15'}),  # Weights per device.
])
def test_setup_leaves_the_device_count_alone(monkeypatch, env, changes):
  monkeypatch.setattr(host, 'keep_freed_memory', lambda environ: False)
  monkeypatch.setattr(host, 'cores', lambda: 4)
  host.setup(_config(**changes), env)
  assert 'XLA_FLAGS' not in env


def test_cpu_only_reads_jax_platforms():
  assert host.cpu_only({'JAX_PLATFORMS': 'cpu'})
  assert not host.cpu_only({'JAX_PLATFORMS': 'cuda,cpu'})
  assert not host.cpu_only({'JAX_PLATFORMS': 'tpu'})


# A thread mallocs, touches and frees 256 MiB five times; the faults of the last three rounds.
_CHURN = textwrap.dedent('''
    import ctypes, resource, sys, threading
    sys.path.insert(0, sys.argv[2])
    from runtime import host
    applied = host.keep_freed_memory({'JAXDIFF_KEEP_MEMORY': sys.argv[1]})
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size, faults = 256 << 20, []
    def rounds():
      for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=rounds)
    t.start(); t.join()
    print(applied, sum(faults[2:]))
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_keeping_freed_memory_stops_the_page_faults_of_a_threads_large_blocks():
  def run(switch):
    out = subprocess.run([sys.executable, '-c', _CHURN, switch, REPO], capture_output=True,
                         text=True, check=True, env={k: v for k, v in os.environ.items()
                                              if not k.startswith(('MALLOC_', 'GLIBC_'))})
    applied, faults = out.stdout.split()
    return applied == 'True', int(faults)

  off_applied, off_faults = run('off')
  on_applied, on_faults = run('on')
  assert not off_applied and on_applied
  pages = 3 * (256 << 20) // os.sysconf('SC_PAGE_SIZE')
  assert off_faults > pages // 2  # Fresh pages each round (mmap, then munmap at free)...
  assert on_faults < pages // 100  # ... but the same heap pages once malloc keeps them.


@pytest.mark.full
def test_train_py_uses_every_core_and_resumes_on_another_device_count(tmp_path):
  """A CPU run without a device count in XLA_FLAGS gets one device per core (as far as the
  batch splits); its checkpoint resumes on one device."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                              if host.DEVICE_COUNT_FLAG not in f)  # conftest's speed flags.
  workdir = tmp_path / 'w'
  args = [sys.executable, 'train.py', '--config=configs/shapes.py:tiny', f'--workdir={workdir}',
          '--config.data.dataset=shapes_rendered', '--config.logging.eval_at_end=False']
  first = subprocess.run([*args, '--config.optim.num_steps=2'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  n = host.cpu_devices(host.cores(), 8)  # The tiny config's batch.
  log = (workdir / 'train.log').read_text()
  assert f'{n} XLA CPU device{"s" * (n != 1)} on {host.cores()} cores' in log
  assert 'malloc keeps freed memory' in log
  one = dict(env, XLA_FLAGS=f'{env["XLA_FLAGS"]} {host.DEVICE_COUNT_FLAG}=1')
  second = subprocess.run([*args, '--config.optim.num_steps=3'], cwd=REPO, env=one,
                          capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  log = (workdir / 'train.log').read_text()
  assert 'Resumed from step 2' in log
  assert '3' in os.listdir(workdir / 'checkpoints')
