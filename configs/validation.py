"""Config checks that name the offending field: override keys before parsing, values before training."""

import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

from diffusion import losses, parameterization, samplers, schedules

CHOICES = {
    'data.dataset': ('shapes', 'shapes_rendered'),
    'text.encoder': ('scratch', 'pretrained'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'text.dtype': ('float32', 'bfloat16'),
    # The diffusion package owns its choices; these are the same tuples it checks against.
    'diffusion.schedule': schedules.SCHEDULES,
    'diffusion.prediction': parameterization.PREDICTIONS,
    'diffusion.loss_target': losses.LOSS_TARGETS,
    'diffusion.loss_weighting': losses.LOSS_WEIGHTINGS,
    'diffusion.noise_sampling': schedules.NOISE_SAMPLINGS,
    'diffusion.sampling_grid': schedules.SAMPLING_GRIDS,
    'sampler.name': tuple(samplers.SAMPLERS),
}
POSITIVE = ('data.image_size', 'data.global_batch_size', 'data.num_train', 'optim.num_steps',
            'text.max_len', 'model.channels', 'model.num_res_blocks', 'model.num_heads',
            'checkpoint.every_steps', 'checkpoint.keep', 'logging.every_steps', 'sampler.num_steps')
FRACTIONS = ('text.cond_drop_prob', 'model.dropout', 'optim.ema_decay')


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way `--config=` does."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config={spec}: no such file {path!r}.')
  module_spec = importlib.util.spec_from_file_location('_config_module', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_keys(argv: Sequence[str], config: ml_collections.ConfigDict):
  """Refuses `--config.a.b=v` for a key the config does not have, suggesting close names."""
  known = set(_paths(config))
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    if key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      raise ValueError(f'Unknown config field {key!r} in {arg!r}.{hint}')


def _paths(config, prefix=''):
  for k, v in config.items():
    path = f'{prefix}{k}'
    yield path
    if isinstance(v, ml_collections.ConfigDict):
      yield from _paths(v, path + '.')


def _get(config, path):
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict):
  """Raises ValueError naming the first bad field (choices, ranges, divisibility)."""
  for path, choices in CHOICES.items():
    value = _get(config, path)
    if value not in choices:
      raise ValueError(f'{path}={value!r} is not one of {choices}.')
  for path in POSITIVE:
    if _get(config, path) <= 0:
      raise ValueError(f'{path}={_get(config, path)!r} must be positive.')
  for path in FRACTIONS:
    if not 0.0 <= _get(config, path) < 1.0:
      raise ValueError(f'{path}={_get(config, path)!r} must be in [0, 1).')
  if config.sampler.eta < 0:
    raise ValueError(f'sampler.eta={config.sampler.eta!r} must be >= 0 (0: deterministic DDIM, '
                     '1: DDPM-like).')
  if config.sampler.eta and config.sampler.name != 'ddim':
    raise ValueError(f"sampler.eta={config.sampler.eta!r} is DDIM's eta, but "
                     f"sampler.name={config.sampler.name!r}: use sampler.name='ddim' or leave "
                     "sampler.eta at 0 (sample.py --eta sets dpmpp_2m_sde's eta).")
  levels = len(config.model.channel_mult)
  if levels == 0:
    raise ValueError('model.channel_mult is empty; give one multiplier per resolution level.')
  factor = 2 ** (levels - 1) * config.model.get('patch_size', 1)
  if config.data.image_size % factor:
    raise ValueError(f'data.image_size={config.data.image_size} must be divisible by '
                     f'model.patch_size * 2**(len(model.channel_mult)-1)={factor}.')
  if config.optim.warmup_steps < 0:
    raise ValueError('optim.warmup_steps must be >= 0.')
