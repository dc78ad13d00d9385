"""Config sections -> the typed values each part of the code takes, made once where it enters.

  diffusion(config) -> DiffusionSpec    (diffusion/: schedules, parameterisation, losses)
  unet(config)      -> UNetSpec         (models/unet.py)
  sampler(config)   -> SamplerSettings  (sampling/: generator, eval grid, manifest)

Every field is read from the config, none has a second default here or in the spec classes
(configs/base.py holds them all), and a missing field is refused naming it. The spec classes
check their own allowed values; `configs.validation` reuses these builders.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from diffusion.spec import DiffusionSpec, SamplerSettings
from models.unet import UNetSpec

# Fields of SamplerSettings that are not config fields: options come from `sampler.eta`.
_SAMPLER_DERIVED = ('options',)


def diffusion(config: ml_collections.ConfigDict) -> DiffusionSpec:
  return DiffusionSpec(**_read(DiffusionSpec, config, 'diffusion'))


def unet(config: ml_collections.ConfigDict) -> UNetSpec:
  return UNetSpec(**_read(UNetSpec, config, 'model', skip=('attn_levels',)))


def sampler(config: ml_collections.ConfigDict) -> SamplerSettings:
  """The config's sampling recipe; `sampler.eta` is DDIM's eta and only valid with 'ddim'."""
  section = config.sampler
  values = _read(SamplerSettings, config, 'sampler', skip=_SAMPLER_DERIVED)
  eta = _field(section, 'eta', 'sampler')
  if eta < 0:
    raise ValueError(f'sampler.eta={eta!r} must be >= 0 (0: deterministic DDIM, 1: DDPM-like).')
  if eta and values['name'] != 'ddim':
    raise ValueError(f"sampler.eta={eta!r} is DDIM's eta, but sampler.name={values['name']!r}: "
                     "use sampler.name='ddim' or leave sampler.eta at 0 (sample.py --eta sets "
                     "dpmpp_2m_sde's eta).")
  options = (('eta', float(eta)),) if values['name'] == 'ddim' else ()
  return SamplerSettings(**values, options=options)


def _read(cls, config, section_name: str, skip=()) -> dict[str, Any]:
  section = config[section_name] if section_name in config else {}
  return {f.name: _field(section, f.name, section_name) for f in dataclasses.fields(cls)
          if f.name not in skip}


def _field(section, name: str, section_name: str) -> Any:
  if name not in section:
    raise ValueError(f'{section_name}.{name} is missing from the config; every field is defined '
                     'in configs/base.py, which a config should start from.')
  value = section[name]
  return tuple(value) if isinstance(value, list) else value
