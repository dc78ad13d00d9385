"""Checks that span config sections, run once before training on the typed settings.

Each section's own values (choices, ranges, types) are checked by its spec class when
`configs.specs.build` makes it, naming `section.field`; what is left here relates sections to
each other (the batch to the accumulation steps and the mesh, the image size to the network and
the autoencoder) or to files. Every error is a ValueError naming the field.
"""
import os

import ml_collections

from configs import specs
from data import buckets
from models import family
from runtime import host
from runtime.settings import EVAL_PROMPT_SOURCES


def validate(config: ml_collections.ConfigDict) -> specs.Settings:
  """The config's settings, checked section by section and across sections."""
  settings = specs.build(config)
  check(settings)
  return settings


def check(settings: specs.Settings) -> None:
  """Raises ValueError naming the first field that does not fit the others."""
  b, k = settings.data.global_batch_size, settings.optim.grad_accum_steps
  if b % k:
    raise ValueError(f'data.global_batch_size={b} must be divisible by optim.grad_accum_steps={k} '
                     '(the micro-batches are equal).')
  check_image_size(settings, settings.data.image_size, 'data.image_size')
  if settings.data.bucketed:
    buckets.of(settings.data, size_step(settings))
  log = settings.logging
  if (log.eval_prompts not in EVAL_PROMPT_SOURCES and not log.eval_prompt_list
      and log.evaluates and not os.path.isfile(log.eval_prompts)):
    raise ValueError(f'logging.eval_prompts={log.eval_prompts!r}: no such file (one prompt per '
                     "line); or use 'data' or 'shapes_benchmark'.")


def vae_factor(settings) -> int:
  """How much the autoencoder downsamples (1 in pixel space); reads its config.json."""
  if not settings.autoencoder.path:
    return 1
  from models import vae_loading  # pylint: disable=g-import-not-at-top
  return vae_loading.read_config(settings.autoencoder.path).downsample_factor


def check_image_size(settings, size: int, name: str, *, attention: bool = True) -> None:
  """Raises ValueError unless images of side `size` (named `name`) fit the network and the
  autoencoder of `settings` (models.family: the U-Net's levels and attention resolutions)."""
  family.check_image_size(settings.model, size, name, vae_factor=vae_factor(settings),
                          attention=attention)


def size_step(settings) -> int:
  """The multiple the network needs of an image side in pixels (models.family.size_step)."""
  return family.size_step(settings.model, vae_factor(settings))


def check_mesh(settings, mesh, process_count: int) -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh's data-parallel
  devices (mesh.data x mesh.fsdp), each device's share into optim.grad_accum_steps micro-batches,
  and over the processes."""
  b, k = settings.data.global_batch_size, settings.optim.grad_accum_steps
  parallel = mesh.shape['data'] * mesh.shape['fsdp']
  devices = (f"mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']} = {parallel} (of "
             f'{mesh.size} devices)')
  if b % parallel:
    cpu = (' On the CPU, train.py makes one device per core, as many as the batch splits over, '
           f'unless XLA_FLAGS sets {host.DEVICE_COUNT_FLAG}.'
           if mesh.devices.flat[0].platform == 'cpu' else '')
    raise ValueError(
        f'data.global_batch_size={b} must be divisible by the data-parallel devices: {devices}; '
        f'use a multiple of {parallel}, e.g. {(b // parallel + 1) * parallel}.{cpu}')
  if b % (parallel * k):
    raise ValueError(
        f'data.global_batch_size={b} must be divisible by optim.grad_accum_steps={k} x the '
        f'data-parallel devices ({devices}) = {k * parallel}: each device takes its share in {k} '
        f'equal micro-batches. Use a multiple of {k * parallel}, e.g. '
        f'{(b // (k * parallel) + 1) * k * parallel}, or a smaller optim.grad_accum_steps.')
  if b % process_count:
    raise ValueError(f'data.global_batch_size={b} must be divisible by the {process_count} '
                     'processes.')
