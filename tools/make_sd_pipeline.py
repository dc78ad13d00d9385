"""Writes a small random Stable Diffusion pipeline folder in diffusers' exact layout.

  python -m tools.make_sd_pipeline --out=runs/sd_tiny            # SD 1.x-like (epsilon)
  python -m tools.make_sd_pipeline --out=runs/sd2_tiny --preset=sd2   # SD 2.x-like (v_prediction)

The folder has what `StableDiffusionPipeline.save_pretrained` writes (`model_index.json`, `unet/`,
`text_encoder/`, `tokenizer/`, `vae/`, `scheduler/`, the real file and tensor names, float32
safetensors), so the loaders that read a real SD 1.5 or 2.1 folder read it, and diffusers reads it
too. The weights are random and small: it is for trying the fine-tuning commands on a laptop CPU
and for the tests, not for pictures. numpy and safetensors only (no PyTorch).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl import app, flags

PRESETS = ('sd1', 'sd2')
_SCHEDULER = {  # What SD 1.5's and SD 2.1's scheduler_config.json hold (DDIM/PNDM fields trimmed).
    '_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
    'beta_end': 0.012, 'num_train_timesteps': 1000, 'clip_sample': False,
    'set_alpha_to_one': False, 'steps_offset': 1, 'timestep_spacing': 'leading',
    'rescale_betas_zero_snr': False,
}


def write_pipeline(out: str, *, preset: str = 'sd1', seed: int = 0) -> str:
  """Writes the random pipeline folder `out` (replaced if it exists); returns it, absolute."""
  from models import autoencoder, vae_loading  # pylint: disable=import-outside-toplevel
  from tools import random_clip, random_sd_unet  # pylint: disable=import-outside-toplevel
  from tools import train_autoencoder  # pylint: disable=import-outside-toplevel
  if preset not in PRESETS:
    raise ValueError(f'preset={preset!r} is not one of {PRESETS}.')
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  work = tempfile.mkdtemp(prefix='.sd-pipeline-', dir=os.path.dirname(out))
  try:
    sd2 = preset == 'sd2'
    random_sd_unet.write_random_sd_unet(os.path.join(work, 'unet'), preset=preset, seed=seed)
    with open(os.path.join(work, 'unet', 'config.json')) as f:
      width = json.load(f)['cross_attention_dim']  # The text encoder's width.
    random_clip.write_random_clip(
        os.path.join(work, 'text_encoder'), os.path.join(work, 'tokenizer'), hidden_size=width,
        hidden_act='gelu' if sd2 else 'quick_gelu', pad_token='!' if sd2 else '<|endoftext|>',
        seed=seed + 1)
    vae_config = autoencoder.VAEConfig(block_out_channels=(8, 16), layers_per_block=1,
                                       norm_num_groups=4, sample_size=16,
                                       down_block_types=('DownEncoderBlock2D',) * 2,
                                       up_block_types=('UpDecoderBlock2D',) * 2)
    vae_params = train_autoencoder.init_params(autoencoder.AutoencoderKL(vae_config), 16,
                                               seed=seed + 2)
    vae_loading.save_vae(os.path.join(work, 'vae'), vae_config, vae_params)
    scheduler = dict(_SCHEDULER, prediction_type='v_prediction' if sd2 else 'epsilon')
    _write_json(os.path.join(work, 'scheduler', 'scheduler_config.json'), scheduler)
    _write_json(os.path.join(work, 'model_index.json'), {
        '_class_name': 'StableDiffusionPipeline', '_diffusers_version': '0.42.1',
        'feature_extractor': [None, None], 'image_encoder': [None, None],
        'requires_safety_checker': False, 'safety_checker': [None, None],
        'scheduler': ['diffusers', 'DDIMScheduler'],
        'text_encoder': ['transformers', 'CLIPTextModel'],
        'tokenizer': ['transformers', 'CLIPTokenizer'],
        'unet': ['diffusers', 'UNet2DConditionModel'],
        'vae': ['diffusers', 'AutoencoderKL']})
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(work, out)
  finally:
    if os.path.exists(work):
      shutil.rmtree(work)
  return out


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def main(argv):
  del argv
  flag = flags.FLAGS
  if not flag.out:
    raise app.UsageError('--out is required (the pipeline folder to write).')
  print(write_pipeline(flag.out, preset=flag.preset, seed=flag.seed))


if __name__ == '__main__':
  # Flags only when run as a program: the tests import this module beside sample.py's flags.
  flags.DEFINE_string('out', None, 'Folder to write (replaced if it exists).')
  flags.DEFINE_enum('preset', 'sd1', PRESETS, 'sd1: SD 1.x-like (conv proj_in, quick_gelu CLIP, '
                    'epsilon); sd2: SD 2.x-like (linear proj_in, head counts per level, upcast '
                    'attention, gelu CLIP, v_prediction).')
  flags.DEFINE_integer('seed', 0, 'Seed of the random weights.')
  app.run(main)
