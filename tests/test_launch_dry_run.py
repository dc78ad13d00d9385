"""Cluster launchers in --dry_run: the SLURM script, the JobSet manifest, the gcloud commands."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from launch import k8s, slurm, tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_yaml(text):
  # PyYAML comes with flax / orbax-checkpoint; launch.k8s itself writes YAML without it.
  return pytest.importorskip('yaml').safe_load(text)


TRAIN = ['--config', 'configs/shapes.py:cpu', '--workdir', '/shared/runs/my run']
OVERRIDES = ['--', '--config.optim.num_steps=20', '--config.data.global_batch_size=64']


def _dry_run(main, argv, capsys):
  assert main(['--dry_run'] + argv) == 0
  return capsys.readouterr().out


# ----------------------------------------------------------------------------- SLURM


def test_slurm_script_passes_bash_syntax_check_and_runs_train_py(tmp_path, capsys):
  text = _dry_run(slurm.main, ['--nodes', '4', '--gpus_per_node', '8', '--partition', 'gpu',
                               '--account', 'acct', '--time', '2-00:00:00', '--venv',
                               '/shared/venv', '--repo_dir', '/shared/jaxdiff', *TRAIN,
                               *OVERRIDES], capsys)
  path = tmp_path / 'job.sbatch'
  path.write_text(text)
  check = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr
  lines = text.splitlines()
  assert lines[0] == '#!/bin/bash'
  for expected in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
                   '#SBATCH --gpus-per-node=8', '#SBATCH --partition=gpu',
                   '#SBATCH --account=acct', '#SBATCH --time=2-00:00:00',
                   'source /shared/venv/bin/activate', 'cd /shared/jaxdiff'):
    assert expected in lines, expected
  srun = [line for line in lines if line.startswith('srun ')]
  assert len(srun) == 1
  assert shlex.split(srun[0]) == [
      'srun', '--kill-on-bad-exit=1', 'python', 'train.py', '--config=configs/shapes.py:cpu',
      '--workdir=/shared/runs/my run', '--config.optim.num_steps=20',
      '--config.data.global_batch_size=64']
  # All #SBATCH lines come before the first command, or sbatch ignores them.
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith('#'))
  assert all(i < first_command for i, line in enumerate(lines) if line.startswith('#SBATCH'))


def test_slurm_container_and_task_per_gpu(tmp_path, capsys):
  text = _dry_run(slurm.main, ['--nodes', '2', '--gpus_per_node', '8', '--tasks_per_node', '8',
                               '--container_image', 'nvcr.io/nvidia/jax:25.04-py3',
                               '--repo_dir', '/w/jaxdiff', '--env', 'XLA_FLAGS=--a=1 --b=2',
                               '--heartbeat_timeout_s', '45', *TRAIN], capsys)
  (tmp_path / 'job.sbatch').write_text(text)
  assert subprocess.run(['bash', '-n', str(tmp_path / 'job.sbatch')]).returncode == 0
  assert '#SBATCH --gpus-per-task=1' in text and '--gpus-per-node' not in text
  assert '#SBATCH --ntasks-per-node=8' in text
  assert "export XLA_FLAGS='--a=1 --b=2'" in text
  assert 'export JAXDIFF_HEARTBEAT_TIMEOUT_S=45' in text
  srun = next(line for line in text.splitlines() if line.startswith('srun '))
  assert '--container-image=nvcr.io/nvidia/jax:25.04-py3' in srun
  assert '--container-workdir=/w/jaxdiff' in srun
  assert 'cd /w/jaxdiff' not in text  # The repo lives in the container, not on the host.


@pytest.mark.parametrize('argv, needle', [
    (['--gpus_per_node', '8', '--tasks_per_node', '3'], 'multiple of'),
    (['--time', 'one day'], '--time'),
    (['--nodes', '0'], '--nodes'),
    (['--env', 'no_equals'], '--env'),
])
def test_slurm_bad_flags_are_refused(argv, needle, capsys):
  assert slurm.main(argv + TRAIN + ['--dry_run']) == 2
  assert needle in capsys.readouterr().err


def test_slurm_submits_the_written_script(tmp_path, capsys):
  fake = tmp_path / 'sbatch'
  fake.write_text('#!/bin/bash\necho "Submitted batch job 42 from $1"\n')
  fake.chmod(0o755)
  script = tmp_path / 'job.sbatch'
  assert slurm.main(['--sbatch_bin', str(fake), '--script', str(script), *TRAIN]) == 0
  assert script.read_text().startswith('#!/bin/bash')
  assert slurm.main(['--sbatch_bin', str(tmp_path / 'missing'), '--script', str(script),
                     *TRAIN]) == 2
  assert 'not found' in capsys.readouterr().err


def test_slurm_template_placeholders_must_all_be_filled():
  with pytest.raises(ValueError, match='nodes'):
    slurm.render('#SBATCH --nodes={{nodes}}', {})
  assert slurm.render('a\n{{x}}\nb {{y}}\n', {'x': '', 'y': '1'}) == 'a\nb 1\n'


# ----------------------------------------------------------------------------- Kubernetes


K8S = ['--name', 'shapes-4x8', '--image', 'ghcr.io/me/jaxdiff:1', '--num_hosts', '4', *TRAIN]


def _env(container):
  return {e['name']: e.get('value', e.get('valueFrom')) for e in container['env']}


def test_jobset_manifest_parses_and_wires_the_coordinator(capsys):
  doc = _load_yaml(_dry_run(k8s.main, K8S + ['--gpus_per_host', '8', *OVERRIDES], capsys))
  assert doc['apiVersion'] == 'jobset.x-k8s.io/v1alpha2' and doc['kind'] == 'JobSet'
  assert doc['metadata']['name'] == 'shapes-4x8'
  assert doc['spec']['network'] == {'enableDNSHostnames': True, 'subdomain': 'shapes-4x8'}
  [rjob] = doc['spec']['replicatedJobs']
  job = rjob['template']['spec']
  assert rjob['replicas'] == 1
  assert job['parallelism'] == job['completions'] == 4 and job['completionMode'] == 'Indexed'
  [container] = job['template']['spec']['containers']
  assert container['command'] == ['python', 'train.py', '--config=configs/shapes.py:cpu',
                                  '--workdir=/shared/runs/my run', '--config.optim.num_steps=20',
                                  '--config.data.global_batch_size=64']
  env = _env(container)
  assert env['JAXDIFF_COORDINATOR'] == 'shapes-4x8-workers-0-0.shapes-4x8:8476'
  assert env['JAXDIFF_NUM_PROCESSES'] == '4'
  assert env['JAXDIFF_PROCESS_ID'] == {'fieldRef': {
      'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
  assert container['resources'] == {'limits': {'nvidia.com/gpu': 8}}
  assert container['ports'] == [{'name': 'coordinator', 'containerPort': 8476}]


def test_jobset_for_tpu_requests_chips_and_selects_the_slice(capsys):
  doc = _load_yaml(_dry_run(k8s.main, K8S + [
      '--accelerator', 'tpu', '--tpu_type', 'tpu-v5-lite-podslice', '--tpu_topology', '4x4',
      '--tpu_chips_per_host', '4', '--port', '1234', '--namespace', 'ml'], capsys))
  pod = doc['spec']['replicatedJobs'][0]['template']['spec']['template']['spec']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                 'cloud.google.com/gke-tpu-topology': '4x4'}
  assert pod['containers'][0]['resources']['limits'] == {'google.com/tpu': 4}
  assert _env(pod['containers'][0])['JAXDIFF_COORDINATOR'].endswith(':1234')
  assert doc['metadata']['namespace'] == 'ml'


def test_yaml_writer_round_trips_awkward_values():
  doc = {'a': 'yes', 'b': 'on: off # not a comment', 'c': ['1', 1, True, None, [], {}],
         'd': [{'x': {'y': ['z']}, 'w': "it's \"quoted\"\nnewline"}], 'key with space': 0.5,
         'nvidia.com/gpu': 8}
  assert _load_yaml(k8s.to_yaml(doc)) == doc
  assert json.loads(json.dumps(doc)) == doc


@pytest.mark.parametrize('argv, needle', [
    (['--name', 'Bad_Name'], 'DNS label'),
    (['--name', 'x' * 60], 'too long'),
    (['--accelerator', 'tpu'], '--tpu_type'),
    (['--name', 'ok', '--num_hosts', '0'], '--num_hosts'),
])
def test_jobset_bad_flags_are_refused(argv, needle, capsys):
  base = ['--name', 'ok', '--image', 'img', *TRAIN]
  assert k8s.main(base + argv + ['--dry_run']) == 2
  assert needle in capsys.readouterr().err


def test_overrides_must_be_config_fields(capsys):
  assert k8s.main(K8S + ['--dry_run', '--', '--learning_rate=1']) == 2
  assert '--config.section.field=value' in capsys.readouterr().err


def test_launchers_import_neither_jax_nor_training():
  """A login node needs only the launchers, cluster.contract and the workdir layout, not the
  training stack; and the sweep report does not import the sweep (they share launch.member)."""
  code = ('import sys, launch.sweep_report\n'
          "print('launch.sweep' in sys.modules)\n"
          'import launch.command, launch.k8s, launch.local, launch.member, launch.slurm, '
          'launch.sweep, launch.sweep_cluster, launch.tpu, runtime.workdir\n'
          "print(sorted(m for m in sys.modules\n"
          "             if m.split('.')[0] in ('jax', 'flax', 'orbax', 'training')))")
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0 and out.stdout.split() == ['False', '[]'], out.stdout + out.stderr


# ----------------------------------------------------------------------------- TPU


def test_tpu_commands_ssh_to_all_workers(capsys):
  out = _dry_run(tpu.main, ['--tpu_name', 'v5e-32', '--zone', 'us-west4-a', '--project', 'proj',
                            '--repo', 'https://github.com/me/jaxdiff.git', '--branch', 'v1',
                            *TRAIN, *OVERRIDES], capsys)
  setup, run = [shlex.split(line) for line in out.splitlines()]
  head = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v5e-32', '--zone', 'us-west4-a',
          '--project', 'proj', '--worker=all', '--command']
  assert setup[:-1] == head and run[:-1] == head
  assert 'git clone -q --branch v1 https://github.com/me/jaxdiff.git ~/jaxdiff' in setup[-1]
  assert 'cd ~/jaxdiff && python3 -m pip install -q -U "jax[tpu]" -r requirements.txt' in setup[-1]
  assert run[-1] == ("cd ~/jaxdiff && PYTHONUNBUFFERED=1 python3 train.py "
                     "--config=configs/shapes.py:cpu '--workdir=/shared/runs/my run' "
                     "--config.optim.num_steps=20 --config.data.global_batch_size=64")
  if shutil.which('bash'):  # Both remote scripts are valid shell.
    for script in (setup[-1], run[-1]):
      assert subprocess.run(['bash', '-n', '-c', script]).returncode == 0


def test_tpu_run_step_detached(capsys):
  out = _dry_run(tpu.main, ['--tpu_name', 'pod', '--zone', 'z', '--step', 'run', '--detach',
                            '--env', 'XLA_FLAGS=--x=1', *TRAIN], capsys)
  [run] = [shlex.split(line) for line in out.splitlines()]
  assert run[-1].startswith('cd ~/jaxdiff && nohup env PYTHONUNBUFFERED=1 XLA_FLAGS=--x=1 ')
  assert run[-1].endswith('> ~/jaxdiff_train.log 2>&1 < /dev/null &')


def test_tpu_setup_needs_a_repo_and_safe_paths(capsys):
  assert tpu.main(['--tpu_name', 'pod', '--zone', 'z', *TRAIN, '--dry_run']) == 2
  assert '--repo' in capsys.readouterr().err
  assert tpu.main(['--tpu_name', 'pod', '--zone', 'z', '--step', 'run', '--remote_dir',
                   '~/a; rm -rf /', *TRAIN, '--dry_run']) == 2
  assert '--remote_dir' in capsys.readouterr().err
