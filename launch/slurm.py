"""SLURM launcher: writes an sbatch script (launch/templates/slurm.sbatch) and submits it.

  python -m launch.slurm --nodes 2 --gpus_per_node 8 --time 24:00:00 --partition gpu \
      --account my_acct --venv /shared/jaxdiff/.venv --repo_dir /shared/jaxdiff \
      --config configs/shapes.py --workdir /shared/runs/shapes_2x8 --dry_run \
      -- --config.optim.num_steps=20000

One task per node drives all its GPUs by default (`--tasks_per_node T` gives each task
gpus_per_node/T GPUs through --gpus-per-task). Every task runs the same train.py command;
`cluster.distributed.initialize` reads SLURM_* to find process 0. `--dry_run` prints the script;
otherwise it is written to `--script` and passed to `sbatch`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

from cluster import contract
from launch import command

TEMPLATE = os.path.join(os.path.dirname(__file__), 'templates', 'slurm.sbatch')


def render(template: str, values: dict[str, str]) -> str:
  """Fills `{{name}}` placeholders; a placeholder without a value is an error."""
  missing = sorted(set(re.findall(r'{{(\w+)}}', template)) - set(values))
  if missing:
    raise ValueError(f'Template placeholders without a value: {missing}.')
  lines = [line for line in template.splitlines(keepends=True)
           if not (re.fullmatch(r'{{(\w+)}}\n?', line) and not values[line.strip()[2:-2]])]
  return re.sub(r'{{(\w+)}}', lambda m: values[m.group(1)], ''.join(lines))


TIME_FORMAT = r'(\d+-)?\d{1,3}(:\d{2}){0,2}'  # sbatch --time: HH:MM:SS or D-HH:MM:SS.


def _check(args: argparse.Namespace) -> None:
  for name in ('nodes', 'tasks_per_node', 'cpus_per_task'):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name} must be >= 1, got {getattr(args, name)}.')
  if args.gpus_per_node < 0:
    raise ValueError(f'--gpus_per_node must be >= 0, got {args.gpus_per_node}.')
  if args.gpus_per_node and args.gpus_per_node % args.tasks_per_node:
    raise ValueError(f'--gpus_per_node {args.gpus_per_node} must be a multiple of '
                     f'--tasks_per_node {args.tasks_per_node} (each task gets the same GPUs).')
  if not re.fullmatch(TIME_FORMAT, args.time):
    raise ValueError(f'--time {args.time!r} must look like HH:MM:SS or D-HH:MM:SS.')
  if args.venv and args.container_image:
    raise ValueError('Give --venv or --container_image, not both.')
  for item in args.env:
    if not re.fullmatch(r'[A-Za-z_]\w*=.*', item):
      raise ValueError(f'--env {item!r} must look like NAME=value.')


def script(args: argparse.Namespace, overrides: Sequence[str], template: str | None = None) -> str:
  """The sbatch script for these flags."""
  _check(args)
  sbatch = []
  if args.gpus_per_node and args.tasks_per_node == 1:
    sbatch.append(f'#SBATCH --gpus-per-node={args.gpus_per_node}')
  elif args.gpus_per_node:
    sbatch.append(f'#SBATCH --gpus-per-task={args.gpus_per_node // args.tasks_per_node}')
  for flag in ('partition', 'account', 'qos', 'mem'):
    if getattr(args, flag):
      sbatch.append(f'#SBATCH --{flag}={getattr(args, flag)}')
  if args.exclusive:
    sbatch.append('#SBATCH --exclusive')
  sbatch += [f'#SBATCH {line}' for line in args.sbatch]
  setup = list(args.setup)
  if args.venv:
    setup.append(f'source {shlex.quote(os.path.join(args.venv, "bin", "activate"))}')
  srun = []
  if args.container_image:
    srun.append(f'--container-image={shlex.quote(args.container_image)}')
    srun.append(f'--container-workdir={shlex.quote(args.repo_dir)}')
    if args.container_mounts:
      srun.append(f'--container-mounts={shlex.quote(args.container_mounts)}')
  else:
    setup.append(f'cd {shlex.quote(args.repo_dir)}')
  exports = []
  if args.port:
    exports.append(f'export {contract.ENV_COORDINATOR_PORT}={args.port}')
  if args.heartbeat_timeout_s:
    exports.append(f'export {contract.ENV_HEARTBEAT_TIMEOUT}={args.heartbeat_timeout_s:g}')
  for item in args.env:
    name, _, value = item.partition('=')
    exports.append(f'export {name}={shlex.quote(value)}')
  values = {
      'script_path': args.script,
      'job_name': args.job_name,
      'nodes': str(args.nodes),
      'tasks_per_node': str(args.tasks_per_node),
      'cpus_per_task': str(args.cpus_per_task),
      'time': args.time,
      'output': args.output,
      'sbatch_options': '\n'.join(sbatch),
      'setup': '\n'.join(setup) or ':',
      'exports': '\n'.join(exports),
      'srun_options': ''.join(f'{s} ' for s in srun),
      'command': command.shell_join(command.train_argv(args, overrides)),
  }
  if template is None:
    with open(args.template) as f:
      template = f.read()
  return render(template, values)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m launch.slurm', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  command.add_train_flags(p)
  p.add_argument('--nodes', type=int, default=1, help='Nodes (hosts).')
  p.add_argument('--gpus_per_node', type=int, default=8, help='GPUs per node; 0 = CPU nodes.')
  p.add_argument('--tasks_per_node', type=int, default=1, help='JAX processes per node.')
  p.add_argument('--cpus_per_task', type=int, default=16, help='CPU cores per task.')
  p.add_argument('--time', default='24:00:00', help='Wall-clock limit (HH:MM:SS or D-HH:MM:SS).')
  p.add_argument('--partition', default='', help='SLURM partition.')
  p.add_argument('--account', default='', help='SLURM account.')
  p.add_argument('--qos', default='', help='SLURM QOS.')
  p.add_argument('--mem', default='', help='Memory per node, e.g. 0 (all) or 500G.')
  p.add_argument('--exclusive', action='store_true', help='Whole nodes only.')
  p.add_argument('--sbatch', action='append', default=[], help='Extra #SBATCH line (repeatable).')
  p.add_argument('--job_name', default='jaxdiff', help='SLURM job name.')
  p.add_argument('--output', default='slurm-%x-%j.out', help='Log file (SLURM patterns allowed).')
  p.add_argument('--repo_dir', default=os.getcwd(), help='Checkout of this repo on the nodes.')
  p.add_argument('--venv', default='', help='Virtualenv on the nodes to activate.')
  p.add_argument('--container_image', default='', help='Image for srun (pyxis/enroot).')
  p.add_argument('--container_mounts', default='', help='pyxis --container-mounts value.')
  p.add_argument('--setup', action='append', default=[],
                 help='Shell line run before training, e.g. "module load cuda" (repeatable).')
  p.add_argument('--env', action='append', default=[], help='NAME=value to export (repeatable).')
  p.add_argument('--port', type=int, default=0,
                 help='Coordinator port; 0 = derived from the job id by cluster/distributed.py.')
  p.add_argument('--heartbeat_timeout_s', type=float, default=0,
                 help='Seconds before a silent task fails the job; 0 = the config\'s '
                      'distributed.heartbeat_timeout_s.')
  p.add_argument('--template', default=TEMPLATE, help='sbatch template with {{placeholders}}.')
  p.add_argument('--script', default='jaxdiff.sbatch', help='Where to write the script.')
  p.add_argument('--sbatch_bin', default='sbatch', help='sbatch executable.')
  p.add_argument('--dry_run', action='store_true', help='Print the script, submit nothing.')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  flags, overrides = command.split_argv(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(flags)
  try:
    text = script(args, overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.dry_run:
    print(text, end='')
    return 0
  with open(args.script, 'w') as f:
    f.write(text)
  print(f'Wrote {args.script}; submitting: {args.sbatch_bin} {args.script}')
  try:
    return subprocess.run([args.sbatch_bin, args.script], check=False).returncode
  except FileNotFoundError:
    print(f'error: {args.sbatch_bin!r} not found: run this on a SLURM login node, or submit '
          f'{args.script} there yourself.', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
