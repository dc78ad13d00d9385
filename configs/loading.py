"""The one config loader: `path.py[:arg]` plus `--config.a.b=value` overrides, as train.py reads them.

  config = loading.load('configs/shapes.py:cpu', ['--config.optim.learning_rate=1e-3'])

`train.py` (its pre-check), `launch.sweep` and the benchmarks all load configs here. The file is
loaded as `ml_collections.config_flags` loads `--config=` (`get_config(arg)` after the first
colon), and the overrides are parsed by config_flags itself, on a private `absl.flags.FlagValues`,
so `--config.x=v` means the same value everywhere it is accepted (ints, floats, bools such as
`False`, tuples such as `'(1,2,2)'`, strings as written). Unknown keys are refused with the
closest valid names before any value is parsed; the result is locked, as train.py's is.
"""

import difflib
import importlib.util
import os
import types
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

PREFIX = '--config.'  # Every override starts with this, as on train.py's command line.


def import_module(path: str) -> types.ModuleType:
  """Imports a config file (for `get_config`, `get_sweep`); errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Config file {path!r} does not exist (relative paths start at '
                            f'{os.getcwd()}); pass --config=path.py[:arg], e.g. '
                            f'configs/shapes.py:cpu from the repository root.')
  spec = importlib.util.spec_from_file_location('_jaxdiff_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (the user's file: any error is theirs)
    raise ValueError(f'Config file {path!r} failed to import: {type(e).__name__}: {e}') from e
  if not hasattr(module, 'get_config'):
    raise ValueError(f'Config file {path!r} has no get_config(arg=None) function.')
  return module


def check_override_keys(argv: Sequence[str], config: ml_collections.ConfigDict) -> None:
  """Refuses `--config.a.b=v` for a key the config does not have, suggesting close names.

  Items of `argv` that are not `--config.` overrides (`--workdir=...`) are ignored.
  """
  known = set(_paths(config))
  for arg in argv:
    if not arg.startswith(PREFIX):
      continue
    key = arg[len(PREFIX):].split('=', 1)[0]
    if key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      raise ValueError(f'Unknown config field {key!r} in {arg!r}.{hint}')


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of `spec` (`path.py[:arg]`) with `overrides` (`--config.a.b=value`) applied.

  Raises FileNotFoundError for a missing file, ValueError naming the file for one that fails to
  load, the key for an unknown field, the field for a value of the wrong type.
  """
  overrides = list(overrides)
  for o in overrides:
    if not o.startswith(PREFIX):
      raise ValueError(f'Override {o!r} must look like --config.section.field=value.')
  path, colon, arg = spec.partition(':')
  module = import_module(path)
  try:
    config = module.get_config(*([arg] if colon else []))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--config={spec}: get_config() of {path!r} raised {type(e).__name__}: '
                     f'{e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'--config={spec}: get_config() returned a {type(config).__name__}, not an '
                     f'ml_collections.ConfigDict.')
  check_override_keys(overrides, config)
  # config_flags' own override parsing: the flag machinery of DEFINE_config_file, fed the loaded
  # config instead of the file name (which it would load again).
  argv = ['configs.loading', *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict('config', config, flag_values=values, sys_argv=argv)
    values(argv)
  except (flags.Error, TypeError, ValueError) as e:
    raise ValueError(f'Bad config override for --config={spec}: {e}') from e
  return values.config


def split_argv(argv: Sequence[str],
               default_spec: str | None = None) -> tuple[str | None, list[str]]:
  """(`--config` value, `--config.` overrides) of a train.py-style command line.

  `--config X` and `--config.a.b X` (absl's two-word form) are joined into `=` form.
  """
  spec, overrides = default_spec, []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    two_words = '=' not in arg and i + 1 < len(argv) and not argv[i + 1].startswith('--')
    if arg == '--config' and i + 1 < len(argv):
      spec, i = argv[i + 1], i + 1
    elif arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith(PREFIX):
      overrides.append(f'{arg}={argv[i + 1]}' if two_words else arg)
      i += two_words
    i += 1
  return spec, overrides


def _paths(config: ml_collections.ConfigDict, prefix: str = ''):
  for k, v in config.items():
    path = f'{prefix}{k}'
    yield path
    if isinstance(v, ml_collections.ConfigDict):
      yield from _paths(v, path + '.')
