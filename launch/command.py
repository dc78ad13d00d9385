"""The training command line that every cluster launcher runs, and its shared flags."""

from __future__ import annotations

import argparse
import shlex
from typing import Sequence


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Launcher flags before `--`, train.py overrides (`--config.x=v`) after it."""
  argv = list(argv)
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def add_train_flags(parser: argparse.ArgumentParser) -> None:
  """--config, --workdir, --python, --entry: what to run on every host."""
  parser.add_argument('--config', required=True,
                      help='Config spec passed to train.py, e.g. configs/shapes.py:cpu.')
  parser.add_argument('--workdir', required=True,
                      help='Run directory as seen from the cluster hosts (shared storage / gs://).')
  parser.add_argument('--python', default='python', help='Python executable on the hosts.')
  parser.add_argument('--entry', default='train.py', help='Entry point, relative to the repo.')


def train_argv(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
  """[python, train.py, --config=..., --workdir=..., overrides...]; checks the overrides."""
  for o in overrides:
    if not o.startswith('--config.'):
      raise ValueError(f'Override {o!r} after `--` must look like --config.section.field=value.')
  return [args.python, args.entry, f'--config={args.config}', f'--workdir={args.workdir}',
          *overrides]


def shell_join(argv: Sequence[str]) -> str:
  return shlex.join(list(argv))
