"""The model-family seam: `model.family` names the denoiser network a run trains.

A family is a spec class (the typed `config.model` section it reads) and a builder that makes the
Flax module from it. Every family's module has the same call, so the loop, the sampler, EMA and
checkpointing never ask which one they hold:

  module(x [B,H,W,C], c_noise [B], context [B,L,D], context_mask [B,L], pooled [B,D], *, train)
      -> raw output [B,H,W,C] float32 (the preconditioning wrapper, models/denoiser.py, turns it
         into x0 for the diffusion spec's parameterisation)

A family may also read its spec from somewhere else than the config's fields (`read_spec`: the
'sd' family reads `model.pretrained`'s unet/config.json) and start from pretrained weights
(`pretrained`). A module with `takes_timestep = True` gets diffusers' discrete timestep as
c_noise (models/denoiser.py maps the noise level to it).

A second family (other weights, other inputs) adds an entry to FAMILIES; nothing else changes.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn

from models import sd_family, unet


class Family(NamedTuple):
  spec_class: type  # Reads the `model` section (configs.specs builds it from the config).
  build: Callable[[Any, int], nn.Module]  # (spec, the training input's side) -> the module.
  # (spec, image side in pixels, its name for errors, *, vae_factor, attention): raises
  # ValueError naming the field unless the network can take images of that side.
  check_image_size: Callable[..., None]
  # (the config's `model` section as a mapping) -> spec; None: spec_class(**the section's fields).
  read_spec: Callable[[Any], Any] | None = None
  # spec -> a function loading its pretrained weights (plain arrays), or None (random init).
  pretrained: Callable[[Any], Callable[[], Any] | None] | None = None


def _build_unet(spec: unet.UNetSpec, side: int) -> nn.Module:
  # The attention levels are fixed from the training size, so sampling at another size keeps them.
  return unet.UNet(spec, attn_levels=unet.attention_levels(spec, side // spec.patch_size))


FAMILIES = {  # model.family
    'unet': Family(unet.UNetSpec, _build_unet, unet.check_image_size),
    'sd': Family(sd_family.SDSpec, sd_family.build, sd_family.check_image_size,
                 read_spec=sd_family.read_spec, pretrained=sd_family.pretrained),
}


def get(name: str) -> Family:
  """The family `model.family` names; an unknown name is refused listing the known ones."""
  if name not in FAMILIES:
    raise ValueError(f'model.family={name!r} is not one of {tuple(FAMILIES)}.')
  return FAMILIES[name]


def of(spec: Any) -> Family:
  """The family whose spec `spec` is."""
  for family in FAMILIES.values():
    if isinstance(spec, family.spec_class):
      return family
  raise TypeError(f'{type(spec).__name__} is not the spec of a model family ({tuple(FAMILIES)}).')


def build(spec: Any, input_side: int) -> nn.Module:
  """The module of `spec`'s family for inputs of side `input_side` (pixels or latents)."""
  return of(spec).build(spec, input_side)


def pretrained(spec: Any) -> Callable[[], Any] | None:
  """A function loading the pretrained weights `spec`'s family starts from (None: random init)."""
  hook = of(spec).pretrained
  return None if hook is None else hook(spec)


def lora(spec: Any) -> Any:
  """The LoRA adapters (`models.lora.LoRASpec`) `spec`'s network carries, or None."""
  return getattr(getattr(spec, 'network', None), 'lora', None)


def check_image_size(spec: Any, size: int, name: str, *, vae_factor: int = 1,
                     attention: bool = True) -> None:
  """Raises ValueError naming `name` unless `spec`'s network takes images of side `size`."""
  of(spec).check_image_size(spec, size, name, vae_factor=vae_factor, attention=attention)


def size_step(spec: Any, vae_factor: int = 1) -> int:
  """The multiple `spec`'s network needs of an image side in pixels (its downsampling, x
  `vae_factor` in latent space): the smallest side `check_image_size` takes, attention aside."""
  for side in range(vae_factor, 4097 * vae_factor, vae_factor):
    try:
      check_image_size(spec, side, 'side', vae_factor=vae_factor, attention=False)
      return side
    except ValueError:
      continue
  raise ValueError('model: the network takes no image side up to 4096 (latent) pixels.')
