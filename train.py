"""Trains a text-to-image diffusion model. Thin entry point: flags -> training.loop.

  python train.py --config=configs/shapes.py:cpu --workdir=runs/shapes_cpu [--config.a.b=v ...]

Re-running the same command resumes from the workdir's latest checkpoint.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import loading  # noqa: E402

_DEFAULT_CONFIG = 'configs/shapes.py:cpu'
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file[:variant].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and samples go here.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from evaluation import sample_grid  # Heavy imports after flag parsing.
  from data.sources import DataError
  from training import console, loop
  console.quiet_library_logs()
  config = _CONFIG.value
  logging.info('Config:\n%s', config)
  evaluator = None
  if config.logging.eval_every_steps or config.logging.eval_at_end:
    try:
      evaluator = sample_grid.SampleGridEvaluator(config)  # Before training, not after it.
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')
  try:
    loop.train_and_evaluate(config, _WORKDIR.value, evaluator=evaluator)
  except (DataError, FileNotFoundError) as e:  # Bad data or a missing file: one line, no traceback.
    sys.exit(f'error: {e}')


def _precheck(argv):
  """Config errors (missing or failing file, unknown key, bad value) as one line, before absl.

  configs.loading parses overrides with config_flags, as the flag above does, so what passes here
  parses the same way there.
  """
  spec, overrides = loading.split_argv(argv[1:], _DEFAULT_CONFIG)
  try:
    loading.load(spec, overrides)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _precheck(sys.argv)
  app.run(main)
