"""Cloud TPU pod launcher: the same command on every worker of a TPU VM through gcloud ssh.

  python -m launch.tpu --tpu_name my-v5e-32 --zone us-west4-a --project my-proj \
      --repo https://github.com/me/jaxdiff.git --config configs/shapes.py \
      --workdir gs://my-bucket/runs/shapes_v5e32 --dry_run -- --config.optim.num_steps=20000

Step `setup` clones (or updates) the repo on every worker and pip-installs jax[tpu] and the
requirements; step `run` starts train.py on every worker (jax finds the pod by itself, see
cluster/distributed.py). `--step all` (default) does both. `--detach` runs training under nohup so
it survives the ssh session. `--dry_run` prints the gcloud commands.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from typing import Sequence

from launch import command


def _q(text: str) -> str:
  return shlex.quote(text)


def _pip_spec(text: str) -> str:
  """A pip requirement in double quotes (no glob on `[extras]`), refusing shell syntax."""
  if not re.fullmatch(r'[\w.\[\],=<>!~-]+', text):
    raise ValueError(f'--jax_package {text!r} is not a plain pip requirement like jax[tpu]==0.6.0.')
  return f'"{text}"'


def _path(text: str, flag: str) -> str:
  """A worker path left unquoted so that `~` expands; so it may hold no shell syntax."""
  if not re.fullmatch(r'[~\w./@+-]+', text):
    raise ValueError(f'{flag} {text!r} may only hold letters, digits, ~ . / _ @ + -.')
  return text


def setup_script(args: argparse.Namespace) -> str:
  """Remote shell: get the code at `--branch`, pip-install jax[tpu] and the requirements."""
  d = _path(args.remote_dir, '--remote_dir')
  return ' && '.join([
      'set -e',
      f'if [ -d {d}/.git ]; then git -C {d} fetch -q origin {_q(args.branch)} && '
      f'git -C {d} checkout -q FETCH_HEAD; else git clone -q --branch {_q(args.branch)} '
      f'{_q(args.repo)} {d}; fi',
      f'cd {d}',
      f'{_path(args.python, "--python")} -m pip install -q -U {_pip_spec(args.jax_package)}'
      + (f' -r {_q(args.requirements)}' if args.requirements else ''),
  ])


def run_script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
  """Remote shell: start train.py from the checkout on this worker."""
  argv = command.train_argv(args, overrides)
  exports = ' '.join(f'{k}={_q(v)}' for k, v in (('PYTHONUNBUFFERED', '1'), *(
      e.partition('=')[::2] for e in args.env)))
  line = f'{exports} {command.shell_join(argv)}'
  if args.detach:
    line = f'nohup env {line} > {_path(args.log, "--log")} 2>&1 < /dev/null &'
  return f'cd {_path(args.remote_dir, "--remote_dir")} && {line}'


def gcloud(args: argparse.Namespace, remote: str) -> list[str]:
  """gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command REMOTE."""
  argv = [args.gcloud, 'compute', 'tpus', 'tpu-vm', 'ssh', args.tpu_name, '--zone', args.zone]
  if args.project:
    argv += ['--project', args.project]
  return argv + ['--worker=all', '--command', remote]


def commands(args: argparse.Namespace, overrides: Sequence[str]) -> list[list[str]]:
  """The gcloud commands for `--step`."""
  if not args.tpu_name or not args.zone:
    raise ValueError('--tpu_name and --zone are required (the TPU VM and its zone).')
  for item in args.env:
    if '=' not in item:
      raise ValueError(f'--env {item!r} must look like NAME=value.')
  out = []
  if args.step in ('setup', 'all'):
    if not args.repo:
      raise ValueError('--repo (a git URL the workers can clone) is required for --step setup/all.')
    out.append(gcloud(args, setup_script(args)))
  if args.step in ('run', 'all'):
    out.append(gcloud(args, run_script(args, overrides)))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m launch.tpu', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  command.add_train_flags(p)
  p.set_defaults(python='python3')  # TPU VM images: the system Python, packages in ~/.local.
  p.add_argument('--tpu_name', required=True, help='TPU VM (pod slice) name.')
  p.add_argument('--zone', required=True, help='Its zone, e.g. us-central2-b.')
  p.add_argument('--project', default='', help='GCP project; empty = gcloud default.')
  p.add_argument('--step', choices=('setup', 'run', 'all'), default='all')
  p.add_argument('--repo', default='', help='Git URL of this repo, cloned on every worker.')
  p.add_argument('--branch', default='main', help='Branch or tag to check out.')
  p.add_argument('--remote_dir', default='~/jaxdiff', help='Checkout directory on the workers.')
  p.add_argument('--jax_package', default='jax[tpu]', help='pip spec of jax for TPUs.')
  p.add_argument('--requirements', default='requirements.txt',
                 help='Requirements file in the repo; empty = none.')
  p.add_argument('--env', action='append', default=[], help='NAME=value for train.py (repeatable).')
  p.add_argument('--detach', action='store_true', help='nohup: survive the ssh session.')
  p.add_argument('--log', default='~/jaxdiff_train.log', help='Worker log file with --detach.')
  p.add_argument('--gcloud', default='gcloud', help='gcloud executable.')
  p.add_argument('--dry_run', action='store_true', help='Print the commands, run nothing.')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  flags, overrides = command.split_argv(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(flags)
  try:
    cmds = commands(args, overrides)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for cmd in cmds:
    print(command.shell_join(cmd))
    if args.dry_run:
      continue
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError:
      print(f'error: {args.gcloud!r} not found: install the Google Cloud SDK.', file=sys.stderr)
      return 2
    if rc:
      print(f'error: step failed with status {rc}: {command.shell_join(cmd)}', file=sys.stderr)
      return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
