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
  k = config.optim.grad_accum_steps
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'optim.grad_accum_steps={k!r} must be a positive integer (1 = no '
                     'accumulation; k: each step sums the gradients of k micro-batches).')
  if config.data.global_batch_size % k:
    raise ValueError(f'data.global_batch_size={config.data.global_batch_size} must be divisible '
                     f'by optim.grad_accum_steps={k} (the micro-batches are equal).')
  if config.data.num_workers < 0 or config.data.prefetch < 0:
    raise ValueError('data.num_workers and data.prefetch must be >= 0.')
  for path, low, high, what in _RANGES:
    value = _get(config, path)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (value > low if path in _OPEN_LOW else value >= low)
          and (value < high if path in _OPEN_HIGH else value <= high))
    if not ok:
      raise ValueError(f'{path}={value!r} {what}.')
  if config.logging.eval_prompts not in ('shapes_benchmark', 'data') and not (
      config.logging.eval_prompt_list) and (config.logging.eval_every_steps
                                            or config.logging.eval_at_end):
    import os  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(config.logging.eval_prompts):
      raise ValueError(f'logging.eval_prompts={config.logging.eval_prompts!r}: no such file (one '
                       "prompt per line); or use 'data' or 'shapes_benchmark'.")


# (field, low, high, what it must be): the optimiser's signs and ranges, and the guard's.
_INF = float('inf')
_RANGES = (
    ('optim.learning_rate', 0.0, _INF, 'must be positive (a negative rate is gradient ascent)'),
    ('optim.warmup_steps', 0, _INF, 'must be >= 0'),
    ('optim.end_lr_factor', 0.0, _INF, 'must be >= 0 (the final rate is learning_rate x it)'),
    ('optim.b1', 0.0, 1.0, 'must be in [0, 1) (AdamW beta1, e.g. 0.9)'),
    ('optim.b2', 0.0, 1.0, 'must be in [0, 1) (AdamW beta2, e.g. 0.99)'),
    ('optim.eps', 0.0, _INF, 'must be positive (AdamW epsilon, e.g. 1e-8)'),
    ('optim.weight_decay', 0.0, _INF, 'must be >= 0'),
    ('optim.grad_clip', 0.0, _INF, 'must be >= 0 (0 = no clipping)'),
    ('checkpoint.divergence_factor', 0.0, _INF, 'must be >= 0 (0 = guard off; e.g. 100)'),
    ('checkpoint.divergence_window', 1, _INF, 'must be a positive number of steps'),
    ('sampler.guidance_scale', 0.0, _INF, 'must be >= 0 (0: unconditional, 1: conditional only, '
     '> 1: guided)'),
)
_OPEN_LOW = ('optim.learning_rate', 'optim.eps')  # Must be strictly above `low`.
_OPEN_HIGH = ('optim.b1', 'optim.b2')  # Must be strictly below `high`.


def check_mesh(config: ml_collections.ConfigDict, mesh, process_count: int) -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh's data-parallel
  devices (mesh.data x mesh.fsdp), each device's share into optim.grad_accum_steps micro-batches,
  and over the processes."""
  b, k = config.data.global_batch_size, config.optim.grad_accum_steps
  parallel = mesh.shape['data'] * mesh.shape['fsdp']
  devices = (f"mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']} = {parallel} (of "
             f'{mesh.size} devices)')
  if b % parallel:
    raise ValueError(
        f'data.global_batch_size={b} must be divisible by the data-parallel devices: {devices}; '
        f'use a multiple of {parallel}, e.g. {(b // parallel + 1) * parallel}.')
  if b % (parallel * k):
    raise ValueError(
        f'data.global_batch_size={b} must be divisible by optim.grad_accum_steps={k} x the '
        f'data-parallel devices ({devices}) = {k * parallel}: each device takes its share in {k} '
        f'equal micro-batches. Use a multiple of {k * parallel}, e.g. '
        f'{(b // (k * parallel) + 1) * k * parallel}, or a smaller optim.grad_accum_steps.')
  if b % process_count:
    raise ValueError(f'data.global_batch_size={b} must be divisible by the {process_count} '
                     'processes.')


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
