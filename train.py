"""Trains a text-to-image diffusion model. Thin entry point: flags -> training.loop.

  python train.py --config=configs/shapes.py:cpu --workdir=runs/shapes_cpu [--config.a.b=v ...]

Re-running the same command resumes from the workdir's latest checkpoint.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import validation  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/shapes.py:cpu', 'Config file[:variant].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and samples go here.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from training import loop, reporting  # Heavy imports after flag parsing.
  reporting.quiet_library_logs()
  logging.info('Config:\n%s', _CONFIG.value)
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _precheck(argv):
  """Unknown `--config.x` keys get a message naming them, before absl parses anything."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), 'configs/shapes.py:cpu')
  try:
    validation.check_override_keys(argv, validation.load_config_file(spec))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _precheck(sys.argv)
  app.run(main)
