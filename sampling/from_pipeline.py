"""Sampling a diffusers Stable Diffusion folder as it is: no workdir, no training.

  python sample.py --pretrained=/models/sd15 --prompt="a photo of a cat" --out=/tmp/cats

The caller builds the settings (sample.py: configs/sd.py:sample with model.pretrained = the folder,
which configs/pipeline.py fills with the folder's text encoder, VAE, noise schedule and timestep
spacing). The U-Net's weights are the folder's (its family's pretrained weights, models/family.py);
the CLIP text encoder and the VAE load as training loads them. Images are as large as diffusers'
pipeline makes them by default (the U-Net's sample_size times the VAE's factor) unless
`image_size` says otherwise. The result is a `from_checkpoint.Loaded`, so
`from_checkpoint.sample_to_folder` writes the PNGs, grid and manifest as for a workdir.
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from models import family
from runtime import sharding, state
from runtime.settings import MeshSpec
from sampling import generate
from sampling.from_checkpoint import Loaded, check_fits


def default_image_size(model_spec, autoencoder) -> int:
  """diffusers' default height and width: the U-Net's sample_size x the VAE's downsampling."""
  side = model_spec.network.sample_size
  if isinstance(side, (tuple, list)):
    side = side[0] if len(set(side)) == 1 else None
  if not side:
    raise ValueError(f'{model_spec.unet_folder}/config.json gives no square sample_size: pass '
                     '--image_size.')
  return int(side) * autoencoder.config.downsample_factor


def load(settings, *, image_size: int | tuple[int, int] | None = None,
         sampling_grid: str | None = None) -> Loaded:
  """The folder of `settings.model` (an 'sd' family spec) ready to sample, over all devices.

  `sampling_grid` (e.g. 'karras') samples on another grid than the folder's timestep spacing;
  `image_size` (a side, or (height, width); default: `default_image_size`) must be a multiple of
  the VAE's factor that the U-Net takes (each side named as sample.py's flag).
  """
  hook = family.pretrained(settings.model)
  if hook is None or not getattr(settings.model, 'folder', ''):
    raise ValueError('Sampling a pipeline folder needs model.family=\'sd\' with model.pretrained '
                     '(sample.py --pretrained=DIR).')
  autoencoder = state.build_autoencoder(settings.autoencoder)
  if autoencoder is None:
    raise ValueError(f'{settings.model.folder}: no VAE (autoencoder.path) to decode latents with.')
  size = image_size or default_image_size(settings.model, autoencoder)
  check_fits(settings.model, size, autoencoder.config.downsample_factor)
  unet, text_encoder = state.build_networks(settings, autoencoder=autoencoder)
  mesh = sharding.make_mesh(MeshSpec.data_parallel())
  replicated = NamedSharding(mesh, P())
  unet_params = jax.device_put(hook(), replicated)
  text_params = jax.device_put(text_encoder.init(None), replicated)
  spec = settings.diffusion
  if sampling_grid:
    spec = spec.replace(sampling_grid=sampling_grid)
  gen = generate.Generator(unet, text_encoder, spec, size, mesh, autoencoder=autoencoder,
                           decode_chunk=settings.autoencoder.decode_chunk)
  return Loaded(settings, gen, unet_params, text_params, None, pretrained=settings.model.folder)
