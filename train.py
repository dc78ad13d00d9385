"""Trains a text-to-image diffusion model. Thin entry point: flags -> training.loop.

  python train.py --config=configs/shapes.py:cpu --workdir=runs/shapes_cpu [--config.a.b=v ...]

Re-running the same command resumes from the workdir's latest checkpoint.
"""

import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # (TensorFlow only reads TFDS here: no notice.)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import loading  # noqa: E402
from runtime import workdir as paths  # noqa: E402

_DEFAULT_CONFIG = 'configs/shapes.py:cpu'
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file[:variant].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and samples go here.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show every log line on the console (they always go '
                             'to WORKDIR/train.log) and, on an error, the traceback (always in '
                             'WORKDIR/error.log).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from runtime import host
  host_note = host.setup(_CONFIG.value)  # Before jax starts: its CPU devices, malloc.
  from runtime import console  # Heavy imports after flag parsing.
  console.quiet_library_noise()
  console.log_to_file(paths.train_log(_WORKDIR.value), verbose=_VERBOSE.value)
  if host_note:
    logging.info('Host: %s.', host_note)
  from runtime import compile_cache
  compile_cache.enable()  # Before the first jit: a resume loads its programs, not compiles them.
  # A bad value, file or workdir, or a diverging run: one `error:` line (no traceback).
  console.run_or_exit(_train, verbose=_VERBOSE.value, log_dir=_WORKDIR.value)


def _train():
  import jax
  from configs import validation
  from evaluation import quality_eval
  from runtime import compile_cache
  from training import loop
  config = _CONFIG.value
  logging.info('Config:\n%s', config)
  settings = validation.validate(config)  # The config's last stop: below, typed settings.
  evaluator = None
  if settings.logging.evaluates:
    evaluator = quality_eval.evaluator_of(settings)  # Before training, not after it.
  t0 = time.time()
  with compile_cache.CompileCounter() as compiles:
    result = loop.train(settings, _WORKDIR.value, evaluator=evaluator)
  logging.info('%s', compiles.summary())
  if jax.process_index() == 0:
    print(_summary(settings, _WORKDIR.value, result, time.time() - t0), flush=True)


def _summary(settings, workdir, result, seconds) -> str:
  """Where everything was written, for the console at the end."""
  steps = [s for s, _ in result.history]
  done = f'steps {steps[0] - 1} -> {steps[-1]}' if steps else 'no steps (already trained)'
  last = [l for _, l in result.history[-settings.logging.every_steps:]]
  over = 'the last step' if len(last) == 1 else f'mean of the last {len(last)} steps'
  loss = f', loss {sum(last) / len(last):.4f} ({over})' if steps else ''
  grids = paths.sample_pngs(workdir, 'grid')
  lines = [f'Trained {done} of {settings.optim.num_steps} in {seconds / 60:.1f} min{loss}.',
           f'  checkpoints  {paths.checkpoints(workdir)}',
           f'  metrics      {paths.metrics(workdir)} (tensorboard --logdir {workdir})',
           f'  log          {paths.train_log(workdir)}']
  if grids:
    lines.append(f'  eval grid    {grids[-1]}')
  lines.append(f'  sample       python sample.py --workdir={workdir} --prompt="..."')
  if getattr(settings.model, 'folder', ''):  # The 'sd' family: hand the result to diffusers.
    lines.append(f'  export       python -m export.diffusers --workdir={workdir} --out=DIR')
  return '\n'.join(lines)


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
