"""Hyper-parameter sweeps: a grid of `--config.x=v` overrides, one workdir per member, and a report.

  # Grid from the command line (';' separates axes, ',' values), 2 members at a time on
  # disjoint halves of this host's devices:
  python -m launch.sweep --config=configs/shapes.py:cpu --root=runs/lr_sweep \
      --grid="optim.learning_rate=1e-3,2e-3;text.cond_drop_prob=0.1,0.2" --parallel=2
  # Or the config file's get_sweep() (a list of override dicts), big_vision's get_hyper style:
  python -m launch.sweep --config=configs/shapes.py:cpu --root=runs/sweep --from_config
  # The same sweep as a SLURM job array or a Kubernetes Indexed Job (launch/sweep_cluster.py):
  python -m launch.sweep ... --slurm --partition=gpu --gpus_per_member=1 --dry_run
  python -m launch.sweep ... --k8s --name=lr-sweep --image=ghcr.io/me/jaxdiff --dry_run
  # One table and plots of every member (works while the sweep runs: launch/sweep_report.py):
  python -m launch.sweep report runs/lr_sweep

Each member runs `train.py` with its overrides in `ROOT/<name>`, a normal workdir that resumes by
itself; flags after the sweep's own (e.g. `--config.optim.num_steps=500`) go to every member.
Every member is loaded through `configs.loading` first, so an unknown field or a bad value fails
the sweep before any run starts. Locally, `--parallel=N` runs N members at a time, each on its
own devices (CUDA_VISIBLE_DEVICES on GPUs; on a CPU host each gets its share of the simulated
devices); a member's console goes to `ROOT/<name>/console.log` (its full log: train.log) and its
state to `ROOT/<name>/sweep_member.json` (launch/member.py). Running the same command again skips
finished members and resumes the others, so a half-finished (or killed) sweep is finished by
re-running it.
`--dry_run` prints the commands, `--jobs_file=F` writes them one per line.
"""

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Sequence

from configs import loading
from launch import member
from runtime import host
from runtime import workdir as paths


def parse_grid(grid: str) -> list[dict[str, str]]:
  """'a.b=1,2;c=x' -> [{'a.b': '1', 'c': 'x'}, {'a.b': '2', 'c': 'x'}]."""
  axes = []
  for part in filter(None, (p.strip() for p in grid.split(';'))):
    key, sep, values = part.partition('=')
    if not sep or not values:
      raise ValueError(f'--grid axis {part!r} must look like field=v1,v2.')
    axes.append([(key.strip(), v.strip()) for v in values.split(',')])
  return [dict(point) for point in itertools.product(*axes)]


def overrides(point: dict) -> list[str]:
  """{'a.b': '1'} -> ['--config.a.b=1']."""
  return [f'{loading.PREFIX}{k}={v}' for k, v in point.items()]


def commands(config: str, root: str, points: Sequence[dict], extra: Sequence[str] = (),
             python: str = sys.executable) -> list[list[str]]:
  """One train.py command per point, each in its member's workdir under ROOT."""
  out = []
  for point in points:
    cmd = [python, 'train.py', f'--config={config}',
           f'--workdir={member.folder(root, point)}']
    cmd += overrides(point) + list(extra)
    out.append(cmd)
  return out


def _points_from_config(spec: str) -> list[dict]:
  path, _, arg = spec.partition(':')
  module = loading.import_module(path)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} has no get_sweep(); pass --grid instead.')
  return [{k: str(v) for k, v in p.items()} for p in module.get_sweep(arg or None)]


def check(spec: str, points: Sequence[dict], extra: Sequence[str] = ()) -> None:
  """Loads every point as train.py will (configs.loading); raises ValueError naming the field."""
  _, extra_overrides = loading.split_argv(extra)
  for point in points:
    loading.load(spec, overrides(point) + extra_overrides)


# ----------------------------------------------------------------------------- local devices


def detect_platform() -> str:
  """'cpu' or 'gpu' without importing jax (a launcher must not take the accelerators)."""
  wanted = os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip()
  if wanted in ('cpu', 'gpu', 'cuda', 'tpu'):
    return 'gpu' if wanted == 'cuda' else wanted
  return 'gpu' if shutil.which('nvidia-smi') else 'cpu'


def count_devices(platform: str) -> int:
  if platform == 'gpu':
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False)
    return max(len([l for l in out.stdout.splitlines() if l.startswith('GPU ')]), 1)
  found = re.search(rf'{host.DEVICE_COUNT_FLAG}=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(found[1]) if found else 1


def device_groups(num_devices: int, parallel: int) -> list[list[int]]:
  """Disjoint, equal device groups, one per concurrent member (ValueError if they do not fit)."""
  if parallel < 1:
    raise ValueError(f'--parallel={parallel} must be >= 1.')
  if parallel > num_devices:
    raise ValueError(f'--parallel={parallel} members need at least {parallel} devices; this host '
                     f'has {num_devices} (set --devices or lower --parallel).')
  k = num_devices // parallel
  return [list(range(i * k, (i + 1) * k)) for i in range(parallel)]


def member_env(platform: str, group: Sequence[int], base=None) -> dict:
  """The environment of a member running on devices `group`."""
  env = dict(os.environ if base is None else base)
  if platform == 'gpu':
    env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, group))
  else:  # Simulated CPU devices: each member gets its share.
    flags = re.sub(rf'{host.DEVICE_COUNT_FLAG}=\d+', '', env.get('XLA_FLAGS', ''))
    env['XLA_FLAGS'] = f'{flags} {host.DEVICE_COUNT_FLAG}={len(group)}'.strip()
  env['PYTHONUNBUFFERED'] = '1'
  return env


# ----------------------------------------------------------------------------- running


def failure_line(log_path: str) -> str:
  """The `error: ...` line of a member's console log, else its last non-empty line."""
  try:
    with open(log_path, errors='replace') as f:
      lines = [line.rstrip() for line in f if line.strip()]
  except OSError:
    return ''
  errors = [line for line in lines if line.startswith('error:')]
  return (errors or lines or [''])[-1][:300]


def run_local(members: Sequence[dict], *, parallel: int, platform: str, num_devices: int,
              poll_s: float = 0.5) -> list[dict]:
  """Runs members (dicts with name, workdir, command, overrides) `parallel` at a time on
  disjoint device groups; a finished member (status done) is skipped. Returns their states."""
  groups = device_groups(num_devices, parallel)
  todo = []
  for m in members:
    if member.read(m['workdir']).get('status') == 'done':
      print(f'[sweep] {m["name"]}: done before, skipped', flush=True)
    else:
      todo.append(m)
  free, running = list(range(parallel)), {}
  total, finished = len(todo), 0
  while todo or running:
    while todo and free:
      m, slot = todo.pop(0), free.pop(0)
      os.makedirs(m['workdir'], exist_ok=True)
      log = open(paths.console_log(m['workdir']), 'a')  # pylint: disable=consider-using-with
      proc = subprocess.Popen(m['command'], stdout=log, stderr=subprocess.STDOUT,
                              env=member_env(platform, groups[slot]))
      member.write(m['workdir'], name=m['name'], overrides=m['overrides'], status='running',
                   pid=proc.pid, returncode=None, started=time.time(), ended=None,
                   devices=groups[slot], command=shlex.join(m['command']))
      running[proc] = (m, slot, log)
      print(f'[sweep] {m["name"]}: started on devices {groups[slot]} (log: '
            f'{paths.console_log(m["workdir"])})', flush=True)
    time.sleep(poll_s)
    for proc in [p for p in running if p.poll() is not None]:
      m, slot, log = running.pop(proc)
      log.close()
      free.append(slot)
      finished += 1
      ok = proc.returncode == 0
      fields = {'status': 'done' if ok else 'failed', 'returncode': proc.returncode,
                'ended': time.time()}
      if not ok:  # Killed by a signal, its console ends in a progress bar: say what happened.
        fields['failure'] = (member.killed(proc.returncode, *member.progress(m['workdir']))
                             or failure_line(paths.console_log(m['workdir']))
                             or f'exit status {proc.returncode}')
      member.write(m['workdir'], **fields)
      what = 'done' if ok else f'FAILED ({fields["failure"]})'
      print(f'[sweep] {m["name"]}: {what} [{finished}/{total}]', flush=True)
  return [member.read(m['workdir']) for m in members]


def main(argv=None):
  """`python -m launch.sweep ...` (see the module doc); 1 when a member did not finish."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['report']:
    from launch import sweep_report  # pylint: disable=g-import-not-at-top
    return sweep_report.main(argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='config file[:variant]')
  parser.add_argument('--root', required=True, help='parent folder of the members\' workdirs')
  parser.add_argument('--grid', default='', help='"field=v1,v2;field2=v3,v4"')
  parser.add_argument('--from_config', action='store_true', help='use get_sweep() of the config')
  parser.add_argument('--parallel', type=int, default=1, help='members run at a time')
  parser.add_argument('--devices', type=int, default=0,
                      help='devices of this host to share (0 = detect: GPUs, or XLA_FLAGS\' '
                           'simulated CPU devices)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands only')
  parser.add_argument('--jobs_file', default='', help='write the commands, one per line')
  from launch import sweep_cluster  # pylint: disable=g-import-not-at-top
  sweep_cluster.add_flags(parser)
  args, extra = parser.parse_known_args(argv)
  points = _points_from_config(args.config) if args.from_config else parse_grid(args.grid)
  if not points:
    parser.error('empty sweep: give --grid or --from_config')
  try:
    check(args.config, points, extra)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  if args.slurm or args.k8s:
    return sweep_cluster.main(args, commands(args.config, args.root, points, extra,
                                             python=args.python))
  cmds = commands(args.config, args.root, points, extra)
  if args.jobs_file:
    with open(args.jobs_file, 'w') as f:
      f.writelines(shlex.join(c) + '\n' for c in cmds)
  if args.dry_run or args.jobs_file:
    for c in cmds:
      print(shlex.join(c))
    return 0
  workdirs = [member.folder(args.root, p) for p in points]
  members = [{'name': os.path.relpath(w, args.root), 'overrides': p, 'workdir': w, 'command': c}
             for p, w, c in zip(points, workdirs, cmds)]
  os.makedirs(args.root, exist_ok=True)
  with open(paths.sweep_file(args.root), 'w') as f:
    json.dump({'config': args.config, 'extra': list(extra),
               'members': [{k: m[k] for k in ('name', 'overrides', 'workdir')} for m in members]},
              f, indent=1)
  platform = detect_platform()
  try:
    states = run_local(members, parallel=args.parallel, platform=platform,
                       num_devices=args.devices or count_devices(platform))
  except ValueError as e:
    sys.exit(f'error: {e}')
  from launch import sweep_report  # pylint: disable=g-import-not-at-top
  sweep_report.main([args.root])
  failed = [s for s in states if s.get('status') != 'done']
  if failed:
    print(f'{len(failed)} of {len(states)} members did not finish; run the same command again '
          'to resume them.', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
