"""launch.local: per-child environments, rank-prefixed output, and failing fast on a bad child."""

import io
import os
import shlex
import subprocess
import sys
import time

import pytest

from launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_children_get_coordinator_rank_and_cpu_devices():
  children = local.child_specs(['python', 'train.py', '--workdir=w'], 3, devices_per_process=4,
                               port=5555, base_env={'XLA_FLAGS': '--xla_foo=1 '
                                                    '--xla_force_host_platform_device_count=8'})
  assert [c.rank for c in children] == [0, 1, 2]
  for c in children:
    assert c.argv == ('python', 'train.py', '--workdir=w')
    assert c.env['JAXDIFF_COORDINATOR'] == '127.0.0.1:5555'
    assert c.env['JAXDIFF_NUM_PROCESSES'] == '3'
    assert c.env['JAXDIFF_PROCESS_ID'] == str(c.rank)
    assert c.env['JAX_PLATFORMS'] == 'cpu'
    assert c.env['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=4'
    assert 'CUDA_VISIBLE_DEVICES' not in c.env


def test_gpu_split_of_the_visible_devices():
  children = local.child_specs(['x'], 2, gpus_per_process=2, port=1,
                               base_env={'CUDA_VISIBLE_DEVICES': '4,5,6,7'})
  assert [c.env['CUDA_VISIBLE_DEVICES'] for c in children] == ['4,5', '6,7']
  assert all('XLA_FLAGS' not in c.env and 'JAX_PLATFORMS' not in c.env for c in children)
  assert [c.env['CUDA_VISIBLE_DEVICES'] for c in local.child_specs(
      ['x'], 4, gpus_per_process=1, port=1, base_env={})] == ['0', '1', '2', '3']
  with pytest.raises(ValueError, match='needs 6 GPUs'):
    local.child_specs(['x'], 3, gpus_per_process=2, port=1,
                      base_env={'CUDA_VISIBLE_DEVICES': '0,1'})


@pytest.mark.parametrize('kwargs, needle', [
    ({'command': [], 'num_processes': 2}, 'after `--`'),
    ({'command': ['x'], 'num_processes': 0}, '--num_processes'),
    ({'command': ['x'], 'num_processes': 2, 'devices_per_process': 0}, '--devices_per_process'),
])
def test_bad_launch_requests(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    local.child_specs(**kwargs)


def test_dry_run_prints_one_runnable_line_per_rank():
  out = subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes', '2', '--port',
                        '7000', '--dry_run', '--', 'python', 'train.py', '--workdir=my run'],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == '# rank 0' and lines[2] == '# rank 1'
  words = shlex.split(lines[3])
  assert 'JAXDIFF_PROCESS_ID=1' in words and 'JAXDIFF_COORDINATOR=127.0.0.1:7000' in words
  assert words[-3:] == ['python', 'train.py', '--workdir=my run']


CHILD = r'''
import os, sys, time
rank = int(os.environ['JAXDIFF_PROCESS_ID'])
print(f'hello from {rank} of {os.environ["JAXDIFF_NUM_PROCESSES"]}', flush=True)
fail_rank = int(sys.argv[1])
if rank == fail_rank:
  time.sleep(0.5 if len(sys.argv) < 3 else 1.5)
  sys.exit(7)
if len(sys.argv) > 2 and rank == int(sys.argv[2]):  # Its watchdog saw the failure first.
  time.sleep(0.5)
  sys.exit(3)
if fail_rank >= 0:
  time.sleep(60)  # Must be terminated by the launcher.
'''


def _run_children(tmp_path, fail_rank, n=3, reacting_rank=None):
  script = tmp_path / 'child.py'
  script.write_text(CHILD)
  argv = [sys.executable, str(script), str(fail_rank)]
  if reacting_rank is not None:
    argv.append(str(reacting_rank))
  children = local.child_specs(argv, n, port=1)
  out, err = io.StringIO(), io.StringIO()
  start = time.monotonic()
  status = local.run(children, out=out, err=err, grace_s=5.0)
  return status, out.getvalue(), err.getvalue(), time.monotonic() - start


def test_output_is_prefixed_with_the_rank_and_success_is_zero(tmp_path):
  status, out, err, _ = _run_children(tmp_path, fail_rank=-1)
  assert status == 0, err
  assert sorted(out.splitlines()) == ['[rank 0] hello from 0 of 3', '[rank 1] hello from 1 of 3',
                                      '[rank 2] hello from 2 of 3']


def test_a_failing_child_stops_the_others_and_is_named(tmp_path):
  status, out, err, seconds = _run_children(tmp_path, fail_rank=1)
  assert status == 7
  assert 'launch.local: rank 1 exited with status 7; terminating ranks [0, 2].' in err
  assert 'launch.local: FAILED: rank 1 exited with status 7.' in err
  assert seconds < 30  # Not the 60 s the others would have slept.
  assert '[rank 1] hello from 1 of 3' in out


def test_the_root_cause_is_named_not_the_peer_that_reacted_first(tmp_path):
  status, _, err, _ = _run_children(tmp_path, fail_rank=0, reacting_rank=1)
  assert status == 7
  assert 'launch.local: FAILED: rank 0 exited with status 7.' in err
