"""Real multi-process runs on CPU: a psum over 2 processes x 2 devices, and failure handling.

The worker script joins through `cluster.distributed.initialize`, builds one global array over
all 4 devices and runs collectives; a victim process then dies in one of several ways and the
survivor must exit non-zero, naming the victim, within `heartbeat_timeout_s` plus a margin.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster import contract
from launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import os, sys, time
from cluster import distributed
from configs import base, specs
info = distributed.initialize(specs.build(base.get_config()).distributed)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.array(jax.devices()), ('d',))
# Device j of process p holds 1 + j + 10 p: the global sum is known in closed form.
local = np.arange(info.local_device_count, dtype=np.float32) + 1 + 10 * info.process_index
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local)
psum = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(), 'd'), mesh=mesh, in_specs=P('d'),
                             out_specs=P()))
print('RESULT', info.environment, info.process_index, info.process_count,
      info.local_device_count, jax.device_count(), float(psum(x)), flush=True)
victim, how, loop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for step in range(100000):
  if loop == 'collectives':
    float(psum(x))  # Blocks in the collective once the victim is gone.
  time.sleep(0.05)  # A training step's worth of waiting.
  if info.process_index == victim and step == 10:
    print('DYING', how, flush=True)
    if how == 'exit':
      os._exit(1)
    if how == 'raise':
      raise ValueError('loss is NaN at step 10')
    if how == 'wait':
      time.sleep(1000)  # Killed from outside.
  if how == 'none' and step == 3:
    break
'''


def _env(extra=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAXDIFF_', 'SLURM_'))}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra or {})
  return env


@pytest.mark.full
def test_local_launcher_psum_over_two_processes(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  out = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--num_processes', '2', '--devices_per_process', '2',
       '--', sys.executable, str(script), '-1', 'none', 'collectives'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stdout + out.stderr
  results = sorted(line for line in out.stdout.splitlines() if 'RESULT' in line)
  # (1 + 2) + (11 + 12) = 26 on every rank; 2 processes, 2 local and 4 global devices each.
  assert results == ['[rank 0] RESULT explicit 0 2 2 4 26.0',
                     '[rank 1] RESULT explicit 1 2 2 4 26.0'], out.stdout + out.stderr


def _start_pair(tmp_path, victim, how, loop, heartbeat_s):
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  port = local.free_port()
  procs = []
  for rank in range(2):
    env = _env({'JAXDIFF_COORDINATOR': f'127.0.0.1:{port}', 'JAXDIFF_NUM_PROCESSES': '2',
                'JAXDIFF_PROCESS_ID': str(rank), 'JAXDIFF_HEARTBEAT_TIMEOUT_S': str(heartbeat_s),
                'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1',
                'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
    log = open(tmp_path / f'rank{rank}.log', 'w+')
    procs.append((subprocess.Popen([sys.executable, str(script), str(victim), how, loop],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait_exit(proc, deadline):
  while proc.poll() is None:
    if time.monotonic() > deadline:
      return None
    time.sleep(0.05)
  return time.monotonic()


def _read(log):
  log.flush()
  log.seek(0)
  return log.read()


def _survivor_outcome(tmp_path, victim, how, loop, heartbeat_s=10, kill_after_s=None):
  """Starts the pair, lets the victim die; returns (survivor status, its log, seconds it took)."""
  procs = _start_pair(tmp_path, victim, how, loop, heartbeat_s)
  (victim_proc, victim_log), (survivor, survivor_log) = procs[victim], procs[1 - victim]
  try:
    if kill_after_s is not None:  # SIGKILL from outside once the victim reported in.
      start = time.monotonic()
      while 'DYING' not in _read(victim_log) and time.monotonic() - start < 120:
        time.sleep(0.1)
      victim_proc.send_signal(signal.SIGKILL)
    died = _wait_exit(victim_proc, time.monotonic() + 180)
    assert died is not None, 'victim never died:\n' + _read(victim_log)
    ended = _wait_exit(survivor, died + 90)
    assert ended is not None, 'survivor hung:\n' + _read(survivor_log)
    return survivor.returncode, _read(survivor_log), ended - died
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()


@pytest.mark.full
def test_killed_process_ends_the_survivor_blocked_in_collectives(tmp_path):
  status, log, seconds = _survivor_outcome(tmp_path, victim=1, how='exit', loop='collectives')
  print(f'survivor exited {seconds:.1f} s after process 1 died (heartbeat_timeout_s=10)')
  assert status == contract.EXIT_PEER_FAILED, log
  assert 'jaxdiff.distributed: process 1 (host ' in log and 'stopped heartbeating' in log, log
  assert seconds < 60


@pytest.mark.full
def test_exception_in_one_process_ends_the_others_at_once(tmp_path):
  status, log, seconds = _survivor_outcome(tmp_path, victim=1, how='raise', loop='collectives')
  print(f'survivor exited {seconds:.1f} s after process 1 raised')
  assert status == contract.EXIT_PEER_FAILED, log
  assert 'process 1 failed: ValueError: loss is NaN at step 10' in log, log
  assert seconds < 10  # Published at once: no heartbeat timeout (jax alone would wait 300 s).


@pytest.mark.full
def test_exception_in_the_coordinator_process_is_reported_too(tmp_path):
  status, log, seconds = _survivor_outcome(tmp_path, victim=0, how='raise', loop='collectives')
  print(f'survivor exited {seconds:.1f} s after process 0 raised')
  assert status == contract.EXIT_PEER_FAILED, log
  assert 'process 0 failed: ValueError: loss is NaN at step 10' in log, log


@pytest.mark.full
def test_sigkilled_process_ends_the_sleeping_survivor(tmp_path):
  status, log, seconds = _survivor_outcome(tmp_path, victim=1, how='wait', loop='sleep',
                                           kill_after_s=0)
  print(f'survivor exited {seconds:.1f} s after process 1 was SIGKILLed')
  assert status == contract.EXIT_PEER_FAILED, log
  assert 'process 1 (host ' in log and 'stopped heartbeating' in log, log
  assert seconds < 60


@pytest.mark.full
def test_sigkilled_coordinator_ends_the_survivor(tmp_path):
  # Process 0 hosts the coordination service: jax's client aborts at once (SIGABRT) on its loss.
  status, log, seconds = _survivor_outcome(tmp_path, victim=0, how='wait', loop='sleep',
                                           kill_after_s=0)
  print(f'survivor exited {seconds:.1f} s after process 0 was SIGKILLed (status {status})')
  assert status != 0, log
  assert seconds < 60
