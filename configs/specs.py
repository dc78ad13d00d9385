"""The config -> the typed settings every layer below takes, made once where the config enters.

  settings = specs.build(config)   # configs.validation.validate(config) also checks across sections

`Settings` holds one frozen, checked value per config section, each defined by the code that
reads it:

  seed         int
  data         data.spec.DataSpec
  text         text.spec.TextSpec
  model        the `model.family`'s spec (models.family; 'unet': models.unet.UNetSpec)
  autoencoder  runtime.settings.AutoencoderSpec
  diffusion    diffusion.spec.DiffusionSpec
  sampler      diffusion.spec.SamplerSettings
  optim, mesh, checkpoint, logging   runtime.settings.{Optim,Mesh,Checkpoint,Logging}Spec
  distributed  cluster.distributed.DistributedSpec

and `record`, the whole config as JSON: what checkpoints save (sample.py reads it back with
`from_saved`), what the trace cache keys on and what TensorBoard shows as hparams. Every field is
read from the config and none has a second default (configs/base.py holds them all); a missing
field is refused naming it. Nothing below configs/ and the entry points takes a ConfigDict.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import ml_collections

from cluster.distributed import DistributedSpec
from configs import base, pipeline
from data.spec import DataSpec
from diffusion.spec import DiffusionSpec, SamplerSettings
from models import family
from runtime.settings import (AutoencoderSpec, CheckpointSpec, LoggingSpec, MeshSpec, OptimSpec)
from text.spec import TextSpec


@dataclasses.dataclass(frozen=True)
class Settings:
  """A run's settings, section by section (see the module docstring); hashable."""
  seed: int
  data: DataSpec
  text: TextSpec
  model: Any  # The spec of the `model.family` (models.family.FAMILIES).
  autoencoder: AutoencoderSpec
  diffusion: DiffusionSpec
  sampler: SamplerSettings
  optim: OptimSpec
  mesh: MeshSpec
  distributed: DistributedSpec
  checkpoint: CheckpointSpec
  logging: LoggingSpec
  record: str  # The whole config as sorted JSON (`config_record()` parses it).

  def config_record(self) -> dict[str, Any]:
    """The config as a plain dict (what `ConfigDict.to_dict()` gives)."""
    return json.loads(self.record)


# Sections read by plain spec classes (the model section's class depends on model.family, the
# sampler section derives its options from sampler.eta).
_SECTIONS = {'data': DataSpec, 'text': TextSpec, 'autoencoder': AutoencoderSpec,
             'diffusion': DiffusionSpec, 'optim': OptimSpec, 'mesh': MeshSpec,
             'distributed': DistributedSpec, 'checkpoint': CheckpointSpec,
             'logging': LoggingSpec}
# Read here or by configs/pipeline.py, not by the spec.
_NOT_SPEC_FIELDS = {'model': ('family', 'pretrained', 'pretrained_changes', 'lora'),
                    'sampler': ('eta',)}


def build(config: Mapping[str, Any]) -> Settings:
  """Every section of `config` (a ConfigDict or the same as nested dicts) as its spec; a
  `model.pretrained` pipeline folder fills its fields first (configs/pipeline.py)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = pipeline.fill(config)
  sections = {name: cls(**_read(cls, config, name)) for name, cls in _SECTIONS.items()}
  record = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return Settings(seed=_field(config, 'seed', ''), model=model(config), sampler=sampler(config),
                  record=json.dumps(record, sort_keys=True, default=list), **sections)


def model(config: Mapping[str, Any]) -> Any:
  """The `model` section as the spec of its `model.family`."""
  name = _field(_section(config, 'model'), 'family', 'model')
  chosen = family.get(name)
  if chosen.read_spec is not None:
    return chosen.read_spec(_tuples(dict(_section(config, 'model'))))
  lora = _section(_section(config, 'model'), 'lora')
  if lora and lora.get('rank'):
    raise ValueError(f"model.lora.rank={lora['rank']} adapts a pretrained network: it needs "
                     f"model.family='sd' (model.pretrained), not {name!r}.")
  return chosen.spec_class(**_read(chosen.spec_class, config, 'model'))


def sampler(config: Mapping[str, Any]) -> SamplerSettings:
  """The config's sampling recipe; `sampler.eta` is DDIM's eta and only valid with 'ddim'."""
  values = _read(SamplerSettings, config, 'sampler', skip=('options',))
  eta = _field(_section(config, 'sampler'), 'eta', 'sampler')
  if eta < 0:
    raise ValueError(f'sampler.eta={eta!r} must be >= 0 (0: deterministic DDIM, 1: DDPM-like).')
  if eta and values['name'] != 'ddim':
    raise ValueError(f"sampler.eta={eta!r} is DDIM's eta, but sampler.name={values['name']!r}: "
                     "use sampler.name='ddim' or leave sampler.eta at 0 (sample.py --eta sets "
                     "dpmpp_2m_sde's eta).")
  options = (('eta', float(eta)),) if values['name'] == 'ddim' else ()
  return SamplerSettings(**values, options=options)


def from_saved(saved: Mapping[str, Any]) -> Settings:
  """The settings of a config a checkpoint saved (its JSON), over configs/base.py: a field added
  since the run was written gets its default."""
  config = base.get_config()
  saved = {k: v for k, v in saved.items() if not k.startswith('_')}  # '_frozen': digests.
  _merge(config, _tuples(saved))
  return build(config)


def spec_fields(section: str, spec: Any) -> set[str]:
  """The config fields of `section` that its spec (or this module) reads."""
  derived = {'options'} if section == 'sampler' else set()  # Made from sampler.eta.
  return ({f.name for f in dataclasses.fields(spec)} - derived) | set(
      _NOT_SPEC_FIELDS.get(section, ()))


def _section(config, name: str):
  return config[name] if name in config else {}


def _read(cls, config, section_name: str, skip=()) -> dict[str, Any]:
  section = _section(config, section_name)
  return {f.name: _field(section, f.name, section_name) for f in dataclasses.fields(cls)
          if f.name not in skip}


def _field(section, name: str, section_name: str) -> Any:
  if name not in section:
    where = f'{section_name}.{name}' if section_name else name
    raise ValueError(f'{where} is missing from the config; every field is defined '
                     'in configs/base.py, which a config should start from.')
  return _tuples(section[name])


def _tuples(obj):
  """JSON and ConfigDict lists become tuples (spec fields are tuples, so specs stay hashable)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return tuple(_tuples(v) for v in obj)
  return obj


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  """Writes `saved` over `config`, section by section (fields the config lacks are added)."""
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      with config.ignore_type():
        config[key] = value
