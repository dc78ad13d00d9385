"""Hyper-parameter sweeps: a grid of `--config.x=v` overrides, one workdir per point.

  # Grid from the command line (';' separates axes, ',' values):
  python -m launch.sweep --config=configs/shapes.py:cpu --root=runs/lr_sweep \
      --grid="optim.learning_rate=1e-3,2e-3;sampler.guidance_scale=2,4" --dry_run
  # Or from the config file's get_sweep() (a list of override dicts), big_vision's get_hyper style:
  python -m launch.sweep --config=configs/shapes.py:cpu --root=runs/sweep --from_config

Each point runs `train.py` with its overrides in `ROOT/<name>`; flags after the sweep's own
(e.g. `--config.optim.num_steps=500`) go to every point. Every point is loaded through
`configs.loading` first, so an unknown field or a bad value fails the sweep before any run starts.
`--dry_run` prints the commands, `--jobs_file=F` writes them one per line (for a SLURM array or
any scheduler).
Re-running a sweep resumes each point from its workdir (a finished point ends at once).
"""

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Sequence

from configs import loading


def parse_grid(grid: str) -> list[dict[str, str]]:
  """'a.b=1,2;c=x' -> [{'a.b': '1', 'c': 'x'}, {'a.b': '2', 'c': 'x'}]."""
  axes = []
  for part in filter(None, (p.strip() for p in grid.split(';'))):
    key, sep, values = part.partition('=')
    if not sep or not values:
      raise ValueError(f'--grid axis {part!r} must look like field=v1,v2.')
    axes.append([(key.strip(), v.strip()) for v in values.split(',')])
  return [dict(point) for point in itertools.product(*axes)]


def point_name(point: dict) -> str:
  return '_'.join(f'{k.split(".")[-1]}={v}' for k, v in point.items()) or 'base'


def overrides(point: dict) -> list[str]:
  """{'a.b': '1'} -> ['--config.a.b=1']."""
  return [f'{loading.PREFIX}{k}={v}' for k, v in point.items()]


def commands(config: str, root: str, points: Sequence[dict], extra: Sequence[str] = ()) -> list[list[str]]:
  out = []
  for point in points:
    cmd = [sys.executable, 'train.py', f'--config={config}',
           f'--workdir={os.path.join(root, point_name(point))}']
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='config file[:variant]')
  parser.add_argument('--root', required=True, help='parent folder of the points\' workdirs')
  parser.add_argument('--grid', default='', help='"field=v1,v2;field2=v3,v4"')
  parser.add_argument('--from_config', action='store_true', help='use get_sweep() of the config')
  parser.add_argument('--dry_run', action='store_true', help='print the commands only')
  parser.add_argument('--jobs_file', default='', help='write the commands, one per line')
  args, extra = parser.parse_known_args(argv)
  points = _points_from_config(args.config) if args.from_config else parse_grid(args.grid)
  if not points:
    parser.error('empty sweep: give --grid or --from_config')
  check(args.config, points, extra)
  cmds = commands(args.config, args.root, points, extra)
  if args.jobs_file:
    with open(args.jobs_file, 'w') as f:
      f.writelines(shlex.join(c) + '\n' for c in cmds)
  if args.dry_run or args.jobs_file:
    for c in cmds:
      print(shlex.join(c))
    return 0
  os.makedirs(args.root, exist_ok=True)
  results = []
  for i, (point, cmd) in enumerate(zip(points, cmds)):
    print(f'[sweep {i + 1}/{len(cmds)}] {shlex.join(cmd)}', flush=True)
    rc = subprocess.call(cmd)
    results.append({'point': point, 'returncode': rc})
  with open(os.path.join(args.root, 'sweep.json'), 'w') as f:
    json.dump(results, f, indent=1)
  failed = [r for r in results if r['returncode']]
  if failed:
    print(f'{len(failed)} of {len(results)} points failed: {failed}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
