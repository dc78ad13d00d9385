"""Sweeps: members in parallel on disjoint devices, a killed member said to be killed and finished
by re-running, the report; the SLURM array and the Kubernetes Indexed Job of a sweep (dry runs)."""
import csv
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from launch import sweep, sweep_report
from runtime import host
from runtime import workdir as paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = 'optim.learning_rate=1e-3,2e-3;text.cond_drop_prob=0.1,0.2'


def test_device_groups_are_disjoint_and_envs_select_them():
  assert sweep.device_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert sweep.device_groups(8, 3) == [[0, 1], [2, 3], [4, 5]]
  with pytest.raises(ValueError, match='--parallel=3 members need at least 3 devices'):
    sweep.device_groups(2, 3)
  gpu = sweep.member_env('gpu', [4, 5], base={'PATH': '/bin'})
  assert gpu['CUDA_VISIBLE_DEVICES'] == '4,5'
  cpu = sweep.member_env('cpu', [0, 1, 2], base={
      'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=8'})
  assert cpu['XLA_FLAGS'] == '--xla_foo=1  --xla_force_host_platform_device_count=3'


def _dry(capsys, *flags):
  assert sweep.main([f'--config={ROOT}/configs/shapes.py:tiny', '--root=/shared/sw', f'--grid={GRID}',
                     '--parallel=2', '--dry_run', *flags, '--config.optim.num_steps=20']) == 0
  return capsys.readouterr().out


def _expected_commands(python):
  points = sweep.parse_grid(GRID)
  return sweep.commands(f'{ROOT}/configs/shapes.py:tiny', '/shared/sw', points,
                        ['--config.optim.num_steps=20'], python=python)


def test_slurm_array_of_a_sweep(tmp_path, capsys):
  text = _dry(capsys, '--slurm', '--partition=gpu', '--gpus_per_member=2', '--venv=/shared/venv',
              '--python=python')
  path = tmp_path / 'sweep.sbatch'
  path.write_text(text)
  check = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr
  lines = text.splitlines()
  for expected in ('#SBATCH --array=0-3%2', '#SBATCH --gpus-per-task=2', '#SBATCH --partition=gpu',
                   'source /shared/venv/bin/activate'):
    assert expected in lines, expected
  # The MEMBERS array, as bash reads it, holds the four train.py commands in order.
  start, end = lines.index('MEMBERS=('), lines.index(')')
  members = [shlex.split(shlex.split(line)[0]) for line in lines[start + 1:end]]
  assert members == _expected_commands('python')
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith('#'))
  assert all(i < first_command for i, line in enumerate(lines) if line.startswith('#SBATCH'))


def test_kubernetes_indexed_job_of_a_sweep(capsys):
  yaml = pytest.importorskip('yaml')
  doc = yaml.safe_load(_dry(capsys, '--k8s', '--name=lr-sweep', '--image=ghcr.io/me/jaxdiff:1',
                            '--gpus_per_member=1'))
  assert (doc['apiVersion'], doc['kind']) == ('batch/v1', 'Job')
  spec = doc['spec']
  assert (spec['completionMode'], spec['completions'], spec['parallelism']) == ('Indexed', 4, 2)
  container = spec['template']['spec']['containers'][0]
  assert container['image'] == 'ghcr.io/me/jaxdiff:1'
  assert container['resources']['limits'] == {'nvidia.com/gpu': 1}
  assert container['command'][:2] == ['bash', '-c']
  script = container['command'][2]
  check = subprocess.run(['bash', '-n', '-c', script], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr
  for i, cmd in enumerate(_expected_commands('python')):
    assert f'{i}) exec {shlex.join(cmd)} ;;' in script


def test_cluster_flags_are_checked(capsys):
  with pytest.raises(SystemExit, match='--k8s needs --image'):
    _dry(capsys, '--k8s')
  with pytest.raises(SystemExit, match='--name .* must be a DNS label'):
    _dry(capsys, '--k8s', '--image=x', '--name=Bad_Name')


# What a member killed at step 137 leaves (as train.py does): metrics, checkpoint 100, a save under
# way, and a progress bar as the console's last line.
_KILLED_MEMBER = """
import json, os, signal, sys
workdir = sys.argv[1]
with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
  f.writelines(json.dumps({'step': s, 'train/loss': 0.6}) + '\\n' for s in (50, 100, 137))
os.makedirs(os.path.join(workdir, 'checkpoints', '100'))
open(os.path.join(workdir, 'checkpoints', '100', '_CHECKPOINT_METADATA'), 'w').write('{}')
os.makedirs(os.path.join(workdir, 'checkpoints', '200.orbax-checkpoint-tmp-1'))
sys.stderr.write('train:  34%|###4      | 137/400 [00:12<00:23, loss=0.6017]')
sys.stderr.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_member_killed_by_a_signal_is_said_to_be_killed(tmp_path, capsys):
  """Not the progress bar it was killed in: the signal, the last step and how it resumes."""
  workdir = str(tmp_path / 'sweep' / 'learning_rate=1e-3')
  point = {'optim.learning_rate': '1e-3'}
  members = [{'name': 'learning_rate=1e-3', 'workdir': workdir, 'overrides': point,
              'command': [sys.executable, '-c', _KILLED_MEMBER, workdir]}]
  [state] = sweep.run_local(members, parallel=1, platform='cpu', num_devices=1, poll_s=0.05)
  said = 'killed by SIGKILL after step 137; running the sweep again resumes it from step 100'
  assert (state['status'], state['returncode'], state['failure']) == (
      'failed', -signal.SIGKILL, said)
  assert f'[sweep] learning_rate=1e-3: FAILED ({said}) [1/1]' in capsys.readouterr().out
  [m] = sweep_report.collect(str(tmp_path / 'sweep')).members
  assert (m.status, m.step, m.failure) == ('failed', 137, said)


def _member_states(root):
  return {os.path.basename(os.path.dirname(p)): json.load(open(p))
          for p in glob.glob(os.path.join(root, '*', paths.MEMBER_FILE))}


@pytest.mark.full
def test_local_sweep_in_parallel_finished_after_a_kill_and_reported(tmp_path):
  """2 x 2 grid of the tiny config, 2 members at a time on 8 simulated devices (4 each); one
  member is killed with SIGKILL after its first checkpoint; the same command finishes it."""
  root, steps = str(tmp_path / 'sweep'), 150
  cmd = [sys.executable, '-m', 'launch.sweep', '--config=configs/shapes.py:tiny', f'--root={root}',
         f'--grid={GRID}', '--parallel=2', f'--config.optim.num_steps={steps}',
         f'--config.checkpoint.every_steps={steps // 3}',
         f'--config.data.data_dir={tmp_path / "tfds"}']
  # The suite's XLA flags (tests/conftest.py: its fast-compile preset), on 8 devices.
  flags = re.sub(rf'{host.DEVICE_COUNT_FLAG}=\d+', '', os.environ['XLA_FLAGS'])
  env = {**os.environ, 'PYTHONPATH': ROOT,
         'XLA_FLAGS': f'{flags} {host.DEVICE_COUNT_FLAG}=8'}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  victim, deadline = None, time.time() + 400
  while victim is None and time.time() < deadline and proc.poll() is None:
    for name, state in _member_states(root).items():
      saved = os.listdir(os.path.join(root, name, 'checkpoints')) if os.path.isdir(
          os.path.join(root, name, 'checkpoints')) else []
      if state.get('status') == 'running' and str(steps // 3) in saved and str(steps) not in saved:
        os.kill(state['pid'], signal.SIGKILL)
        victim = name
        break
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=600)
  assert victim is not None, out[-3000:]
  assert proc.returncode == 1, out[-3000:]
  states = _member_states(root)
  assert len(states) == 4 and states[victim]['status'] == 'failed'
  assert states[victim]['returncode'] == -signal.SIGKILL
  assert states[victim]['failure'].startswith('killed by SIGKILL after step ')
  # Concurrency: two members ran at once, on disjoint devices.
  assert sorted(map(tuple, {tuple(s['devices']) for s in states.values()})) == [
      (0, 1, 2, 3), (4, 5, 6, 7)]
  spans = sorted((s['started'], s['ended']) for s in states.values())
  assert spans[1][0] < spans[0][1]  # The second started before the first ended.

  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
  assert sum('done before, skipped' in line for line in again.stdout.splitlines()) == 3
  states = _member_states(root)
  assert {s['status'] for s in states.values()} == {'done'}
  log = open(os.path.join(root, victim, 'train.log')).read()
  assert 'Resumed from step' in log

  report = subprocess.run([sys.executable, '-m', 'launch.sweep', 'report', root], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  with open(os.path.join(root, 'report.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4
  for name in ('report.md', 'report_loss.png', 'report_optim.learning_rate.png',
               'report_text.cond_drop_prob.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
