"""The real trainer (`train.py`) over several JAX processes on CPU: same losses, portable
checkpoints, and a lost process that fails the job instead of hanging it.

Every run is a subprocess (clean JAX state, its own simulated device count). One 2-process x
4-device run of the tiny config (mesh data=4, fsdp=2, a checkpoint every 2 steps) is shared by
the first two tests. Data is `shapes_rendered` (rendered on the fly: no TFDS files to race on).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster import contract
from configs import specs
from launch import local
from runtime import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ('--config=configs/shapes.py:tiny', '--config.data.dataset=shapes_rendered',
        '--config.logging.eval_at_end=False', '--config.logging.every_steps=1')


def _train_cmd(workdir, *overrides):
  return [sys.executable, 'train.py', *TINY, f'--workdir={workdir}', *overrides]


def _clean_env():
  """This process's environment without job variables; XLA_FLAGS keeps the suite's compile
  settings (tests/conftest.py) without a device count, set per run."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAXDIFF_', 'SLURM_', 'TPU_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='3')
  env['XLA_FLAGS'] = ' '.join(re.sub(rf'{host.DEVICE_COUNT_FLAG}=\S*', '',
                                     env.get('XLA_FLAGS', '')).split())
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _run_one_process(cmd, devices, timeout=300):
  env = _clean_env()
  env['XLA_FLAGS'] += f' {host.DEVICE_COUNT_FLAG}={devices}'
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
  return out


def _run_launcher(cmd, num_processes, devices_per_process, timeout=300):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--num_processes', str(num_processes),
       '--devices_per_process', str(devices_per_process), '--', *cmd],
      cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
  return out


def _losses(workdir):
  """{step: train/loss} from WORKDIR/metrics.jsonl (written by process 0 only)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """2 processes x 4 devices, mesh data=4 x fsdp=2, 4 steps, checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('multihost') / 'two_by_four')
  start = time.monotonic()
  out = _run_launcher(_train_cmd(workdir, '--config.mesh.data=4', '--config.mesh.fsdp=2',
                                 '--config.checkpoint.every_steps=2'), 2, 4)
  print(f'2-process x 4-device run: {time.monotonic() - start:.1f} s')
  # Both processes really joined one 8-device job (the log line of cluster.distributed, in the
  # full log every process appends to).
  log = _read(os.path.join(workdir, 'train.log'))
  for rank in (0, 1):
    assert f'joined as process {rank} of 2, 4 local / 8 global devices' in log, out.stdout
  return workdir


@pytest.mark.full
def test_two_processes_match_one_process_with_the_same_mesh(two_process_run, tmp_path):
  workdir = str(tmp_path / 'one_by_eight')
  start = time.monotonic()
  _run_one_process(_train_cmd(workdir, '--config.mesh.data=4', '--config.mesh.fsdp=2'), 8)
  print(f'1-process x 8-device run: {time.monotonic() - start:.1f} s')
  two, one = _losses(two_process_run), _losses(workdir)
  assert sorted(two) == sorted(one) == [1, 2, 3, 4], (two, one)
  steps = sorted(one)
  np.testing.assert_allclose([two[s] for s in steps], [one[s] for s in steps], rtol=1e-4)
  # The run learnt something (4 steps is enough to move the loss), so equality is not vacuous.
  assert len(set(np.round([one[s] for s in steps], 6))) == 4


@pytest.mark.full
def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(two_process_run, tmp_path):
  import jax
  import orbax.checkpoint as ocp
  from configs import shapes
  from runtime import checkpoint, sharding
  from training import builder

  workdir = str(tmp_path / 'resumed')
  shutil.copytree(two_process_run, workdir)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))  # Keep only what the resumed run writes.
  ckpt_dir = checkpoint.state_dir(workdir)
  manager = ocp.CheckpointManager(ckpt_dir)
  assert sorted(manager.all_steps()) == [2, 4]
  manager.delete(4)  # As if the job had stopped after step 2's save.
  manager.close()
  assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 2

  start = time.monotonic()
  _run_one_process(_train_cmd(workdir, '--config.mesh.data=2', '--config.mesh.fsdp=2'), 4)
  print(f'1-process x 4-device resume: {time.monotonic() - start:.1f} s')
  full, resumed = _losses(two_process_run), _losses(workdir)
  assert sorted(resumed) == [3, 4], resumed  # It resumed at step 2 rather than starting over.
  np.testing.assert_allclose([resumed[3], resumed[4]], [full[3], full[4]], rtol=1e-4)

  # The final parameters, optimiser moments and EMA agree too: restore both step-4 checkpoints
  # onto one device of this process.
  config = shapes.get_config('tiny')
  config.mesh.data, config.mesh.fsdp = 1, 1
  settings = specs.build(config)
  mesh = sharding.make_mesh(settings.mesh, jax.devices()[:1])
  trainer = builder.build_trainer(settings, mesh)
  target = checkpoint.abstract_with_shardings(trainer.abstract, trainer.shardings)
  states = []
  for w in (two_process_run, workdir):
    ckpt = checkpoint.Checkpointer(w, read_only=True)
    assert ckpt.latest_step() == 4
    state, position = ckpt.restore(target, step=4)
    assert position['step'] == 4
    states.append(jax.device_get(state))
    ckpt.close()
  a, b = states
  assert int(a.step) == int(b.step) == 4
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=5e-6)  # Seen: 7e-7 max.


def _read(path):
  if not os.path.exists(path):
    return ''
  with open(path, errors='replace') as f:
    return f.read()


@pytest.mark.full
def test_sigkilled_process_fails_the_real_trainer_within_a_minute(tmp_path):
  workdir = str(tmp_path / 'killed')
  # The config flag, not JAXDIFF_HEARTBEAT_TIMEOUT_S: the config's default (30 s) wins over it.
  cmd = _train_cmd(workdir, '--config.optim.num_steps=100000',
                   '--config.checkpoint.every_steps=100000',
                   '--config.distributed.heartbeat_timeout_s=10')
  base = _clean_env()
  # Exactly the environments `python -m launch.local --num_processes 2 --devices_per_process 2`
  # gives its children; started here so that one of them can be killed.
  children = local.child_specs(cmd, 2, devices_per_process=2, base_env=base)
  procs, logs = [], []
  try:
    for child in children:
      log = str(tmp_path / f'rank{child.rank}.log')
      with open(log, 'w') as f:
        procs.append(subprocess.Popen(list(child.argv), cwd=REPO, env={**base, **child.env},
                                      stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True))
      logs.append(log)
    survivor, victim = procs
    # Process 0 logs every step's scalars ("[N] data/...=..., train/loss=...") to the workdir's
    # train.log; metrics.jsonl is only flushed when the run ends, so the log is where a few steps
    # show up while it runs.
    full_log = os.path.join(workdir, 'train.log')
    deadline = time.monotonic() + 240
    while not any(re.search(rf'\] \[{s}\] .*train/loss=', _read(full_log)) for s in (3, 4, 5)):
      assert survivor.poll() is None and victim.poll() is None, _read(logs[0])[-5000:]
      assert time.monotonic() < deadline, 'no training step after 240 s:\n' + _read(logs[0])[-5000:]
      time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = time.monotonic()
    while survivor.poll() is None and time.monotonic() - killed < 90:
      time.sleep(0.1)
    seconds = time.monotonic() - killed
    log = _read(logs[0])
    tail = log[-5000:]
    assert survivor.poll() is not None, f'process 0 still running {seconds:.0f} s later:\n' + tail
    print(f'process 0 exited with status {survivor.returncode} {seconds:.1f} s after process 1 '
          f'was SIGKILLed (heartbeat_timeout_s=10)')
    assert survivor.returncode == contract.EXIT_PEER_FAILED, tail
    assert 'jaxdiff.distributed: process 1 (host ' in log and 'stopped heartbeating' in log, tail
    assert seconds < 60
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
