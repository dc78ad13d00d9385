"""`model.pretrained`: a diffusers Stable Diffusion folder fills the config's U-Net, text encoder,
tokenizer, autoencoder and diffusion fields, so one field points a run at a pipeline.

  python train.py --config=configs/sd.py:finetune --config.model.pretrained=/models/sd15 ...

The folder is what `StableDiffusionPipeline.save_pretrained` writes (or a hub snapshot):
`model_index.json`, `unet/`, `text_encoder/`, `tokenizer/`, `vae/`, `scheduler/`. What it sets:

  model.family            'sd' (models/family.py; the U-Net's own config.json is read there)
  text.encoder, text.pretrained_path, text.max_len    the CLIP text encoder and its tokenizer
  autoencoder.path        the VAE
  diffusion.*             from scheduler/scheduler_config.json (`folder_values`): the noise
                          schedule, prediction type, and diffusers' timestep spacing as the
                          sampling grid, steps_offset and set_alpha_to_one (so sampling walks the
                          timesteps diffusers' schedulers walk)

A field left at its configs/base.py default takes the folder's value. A field set to something
else contradicts the folder and is refused naming both, unless it is listed in
`model.pretrained_changes` (diffusion.sampling_grid, a sampling choice, needs no listing): a
listed field keeps the config's value (e.g.
('diffusion.zero_terminal_snr', 'diffusion.prediction') with both set, to fine-tune SD 1.5
towards zero terminal SNR with v-prediction).
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from configs import base
from diffusion import names

COMPONENTS = ('unet', 'text_encoder', 'tokenizer', 'vae', 'scheduler')  # Sub-folders it needs.
INDEX = 'model_index.json'
SCHEDULER_CONFIG = os.path.join('scheduler', 'scheduler_config.json')
_PREDICTIONS = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}
_SCHEDULES = {'scaled_linear': 'scaled_linear', 'linear': 'linear',
              'squaredcos_cap_v2': 'cosine'}
# diffusers' default timestep_spacing where scheduler_config.json has none: 'linspace' for these
# classes, 'leading' for the others (SD 1.5's PNDMScheduler, DDIMScheduler, DDPMScheduler).
_LINSPACE_BY_DEFAULT = ('EulerDiscreteScheduler', 'EulerAncestralDiscreteScheduler',
                        'HeunDiscreteScheduler', 'DPMSolverMultistepScheduler',
                        'DPMSolverSDEScheduler',
                        'UniPCMultistepScheduler', 'DEISMultistepScheduler', 'SASolverScheduler',
                        'KDPM2DiscreteScheduler', 'KDPM2AncestralDiscreteScheduler',
                        'LMSDiscreteScheduler')
# Sampling choices the folder suggests: a config's own value is kept, without pretrained_changes.
_SUGGESTED = ('diffusion.sampling_grid',)


class PipelineError(ValueError):
  """A pipeline folder that cannot be used, or a config field that contradicts it."""


def folder_of(config) -> str:
  """The absolute pipeline folder `model.pretrained` names ('' when none)."""
  path = config.model.get('pretrained', '') or ''
  return os.path.abspath(os.path.expanduser(path)) if path else ''


def check_folder(folder: str) -> dict[str, Any]:
  """The folder's model_index.json, after checking every component sub-folder is there."""
  if not os.path.isdir(folder):
    raise PipelineError(f'model.pretrained={folder!r} is not a folder: point it at a diffusers '
                        f'Stable Diffusion folder ({INDEX}, {", ".join(COMPONENTS)}).')
  index_path = os.path.join(folder, INDEX)
  if not os.path.isfile(index_path):
    raise PipelineError(f'{index_path} not found: model.pretrained must be a whole diffusers '
                        "pipeline folder (StableDiffusionPipeline.save_pretrained's layout), not "
                        'one component of it.')
  with open(index_path) as f:
    index = json.load(f)
  for name in COMPONENTS:
    if not os.path.isdir(os.path.join(folder, name)):
      raise PipelineError(f'{os.path.join(folder, name)} not found: a Stable Diffusion pipeline '
                          f'folder needs {", ".join(COMPONENTS)} (listed in {index_path}).')
  return index


def folder_values(folder: str) -> dict[str, dict[str, Any]]:
  """{section: {field: value}} that the pipeline folder fixes."""
  scheduler_path = os.path.join(folder, SCHEDULER_CONFIG)
  if not os.path.isfile(scheduler_path):
    raise PipelineError(f'{scheduler_path} not found: the pipeline folder has no scheduler '
                        'config (the noise schedule the U-Net was trained with).')
  with open(scheduler_path) as f:
    sched = json.load(f)
  beta_schedule = sched.get('beta_schedule', 'linear')
  if beta_schedule not in _SCHEDULES:
    raise PipelineError(f'{scheduler_path}: beta_schedule={beta_schedule!r} is not supported '
                        f'(supported: {", ".join(_SCHEDULES)}).')
  prediction_type = sched.get('prediction_type', 'epsilon')
  if prediction_type not in _PREDICTIONS:
    raise PipelineError(f'{scheduler_path}: prediction_type={prediction_type!r} is not supported '
                        f'(supported: {", ".join(_PREDICTIONS)}).')
  default_spacing = ('linspace' if sched.get('_class_name') in _LINSPACE_BY_DEFAULT
                     else 'leading')
  spacing = sched.get('timestep_spacing') or default_spacing
  if spacing not in names.TIMESTEP_SPACINGS:
    raise PipelineError(f'{scheduler_path}: timestep_spacing={spacing!r} is not supported '
                        f'(supported: {", ".join(names.TIMESTEP_SPACINGS)}).')
  tokenizer_config = os.path.join(folder, 'tokenizer', 'tokenizer_config.json')
  max_len = 77
  if os.path.isfile(tokenizer_config):
    with open(tokenizer_config) as f:
      max_len = int(json.load(f).get('model_max_length', 77))
    max_len = max_len if max_len <= 4096 else 77  # transformers writes 1e30 for "no limit".
  return {
      'model': {'family': 'sd'},
      'text': {'encoder': 'pretrained', 'pretrained_path': os.path.join(folder, 'text_encoder'),
               'max_len': max_len},
      'autoencoder': {'path': os.path.join(folder, 'vae')},
      'diffusion': {
          'schedule': _SCHEDULES[beta_schedule],
          'num_train_timesteps': int(sched.get('num_train_timesteps', 1000)),
          'beta_start': float(sched.get('beta_start', 0.0001)),
          'beta_end': float(sched.get('beta_end', 0.02)),
          'prediction': _PREDICTIONS[prediction_type],
          'zero_terminal_snr': bool(sched.get('rescale_betas_zero_snr', False)),
          'logsnr_shift': 0.0,
          'noise_sampling': 'uniform',
          'sampling_grid': spacing,
          'steps_offset': int(sched.get('steps_offset', 0)),
          'set_alpha_to_one': bool(sched.get('set_alpha_to_one', True)),
      },
  }


def fill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the fields `model.pretrained`'s folder fixes (a copy; the same config when
  `model.pretrained` is empty). PipelineError for a bad folder or a contradicting field."""
  folder = folder_of(config)
  if not folder:
    return config
  check_folder(folder)
  defaults = base.get_config()
  allowed = set(config.model.get('pretrained_changes', ()) or ())
  filled = ml_collections.ConfigDict(config.to_dict())
  filled.model.pretrained = folder
  for section, values in folder_values(folder).items():
    for field, value in values.items():
      given = config[section].get(field)
      default = defaults[section].get(field)
      name = f'{section}.{field}'
      if name in _SUGGESTED and given is not None and given != default:
        continue  # The config's own sampling choice.
      if given is not None and given != default and given != value and name not in allowed:
        raise PipelineError(
            f'{name}={given!r} contradicts the pipeline folder {folder} ({value!r}); leave it '
            f"unset to use the folder's, or add {name!r} to model.pretrained_changes to change "
            'it on purpose.')
      keep = given is not None and name in allowed  # Listed: the config's value, on purpose.
      with filled.ignore_type():
        filled[section][field] = given if keep else value
  return filled
