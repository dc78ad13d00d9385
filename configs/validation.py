"""Config value checks that name the offending field, run before training (keys: configs/loading.py)."""

import ml_collections

from configs import specs
from data import pipeline
from models import layers
from text import encoders

# Allowed values, each tuple owned by the code that reads the field. The diffusion, model and
# sampler sections are checked by building their specs (configs/specs.py).
CHOICES = {
    'data.dataset': pipeline.DATASETS,
    'data.crop': pipeline.CROPS,
    'data.on_bad_record': pipeline.ON_BAD_RECORD,
    'text.encoder': encoders.ENCODERS,
    'text.dtype': tuple(layers.DTYPES),
}
POSITIVE = ('data.image_size', 'data.global_batch_size', 'data.num_train', 'optim.num_steps',
            'text.max_len', 'checkpoint.every_steps', 'checkpoint.keep', 'logging.every_steps')
FRACTIONS = ('text.cond_drop_prob', 'optim.ema_decay')


def _get(config, path):
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict):
  """Raises ValueError naming the first bad field (choices, ranges, divisibility)."""
  specs.diffusion(config)
  unet = specs.unet(config)
  specs.sampler(config)
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
  check_image_size(config, config.data.image_size, 'data.image_size')
  if config.autoencoder.decode_chunk < 1:
    raise ValueError('autoencoder.decode_chunk must be >= 1.')
  if config.data.num_workers < 0 or config.data.prefetch < 0:
    raise ValueError('data.num_workers and data.prefetch must be >= 0.')
  if config.optim.warmup_steps < 0:
    raise ValueError('optim.warmup_steps must be >= 0.')


def check_image_size(config: ml_collections.ConfigDict, size: int, name: str, *,
                     attention: bool = True) -> None:
  """Raises ValueError unless images of side `size` (named `name` in the message) fit the U-Net
  of `config`: divisible down its levels, in pixels or in the autoencoder's latents, and (with
  `attention`) with a level at each of model.attn_resolutions."""
  unet = specs.unet(config)
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise ValueError(f'{name}={size!r} must be a positive integer.')
  factor = 2 ** (len(unet.channel_mult) - 1) * unet.patch_size
  if size % factor:
    raise ValueError(f'{name}={size} must be divisible by '
                     f'model.patch_size * 2**(len(model.channel_mult)-1)={factor}.')
  vae_factor, where = 1, ''
  if config.autoencoder.path:
    from models import vae_loading  # pylint: disable=g-import-not-at-top
    vae_factor = vae_loading.read_config(config.autoencoder.path).downsample_factor
    where = f' / the autoencoder\'s {vae_factor}'
    if size % (factor * vae_factor):
      raise ValueError(
          f'{name}={size} must be divisible by the autoencoder\'s '
          f'downsampling ({vae_factor}, autoencoder.path) x model.patch_size x '
          f'2**(len(model.channel_mult)-1) = {factor * vae_factor}: the U-Net runs on latents '
          f'of side image_size / {vae_factor}.')
  side = size // vae_factor // unet.patch_size
  heights = [side // 2 ** i for i in range(len(unet.channel_mult))]
  missing = [r for r in unet.attn_resolutions if r not in heights]
  if missing and attention:
    raise ValueError(
        f'model.attn_resolutions has {missing}, but the U-Net levels ({name}='
        f'{size}{where} / model.patch_size={unet.patch_size}) have heights '
        f'{heights}; use values from that list.')
