"""Sampling from a workdir: load its saved config and a checkpoint, write PNGs, a grid and a manifest.

The parameters are restored onto whatever devices are present (a data-parallel mesh
over all of them), whatever mesh trained them.
"""

import json
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from configs import specs
from diffusion import schedules
from diffusion.spec import SamplerSettings
from sampling import generate, images
from training import checkpoint, sharding, state


class Loaded(NamedTuple):
  """A trained model read back from a workdir, ready to sample."""
  config: ml_collections.ConfigDict  # The run's saved config (over configs/base.py's defaults).
  generator: generate.Generator
  unet_params: Any
  text_params: Any
  step: int  # The checkpoint's training step.


def load(workdir: str, step: int | None = None, *, use_ema: bool = True,
         sampling_grid: str | None = None) -> Loaded:
  """Reads the saved config and only the (EMA) parameters of a checkpoint, over all devices.

  `sampling_grid` (e.g. 'karras') samples on another grid than the run's diffusion.sampling_grid.
  """
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  config = ckpt.restore_config(step)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})  # Data-parallel over all.
  unet, text_encoder = state.build_models(config, workdir=workdir)
  abstract = state.abstract_params(config, mesh, unet=unet, text_encoder=text_encoder)
  params, ckpt_step = ckpt.restore_params(abstract, step, use_ema=use_ema)
  ckpt.close()
  text_params = params['text'] if text_encoder.trainable else text_encoder.init(None)
  spec = specs.diffusion(config)
  if sampling_grid:
    spec = spec.replace(sampling_grid=sampling_grid)
  gen = generate.Generator(unet, text_encoder, spec, config.data.image_size, mesh,
                           autoencoder=state.build_autoencoder(config),
                           decode_chunk=config.autoencoder.decode_chunk)
  return Loaded(config, gen, params['unet'], text_params, ckpt_step)


def read_prompts(prompts: Sequence[str], prompt_file: str | None) -> list[str]:
  out = list(prompts or [])
  if prompt_file:
    if not os.path.isfile(prompt_file):
      raise FileNotFoundError(f'--prompt_file={prompt_file!r}: no such file (one prompt per line).')
    with open(prompt_file) as f:
      out += [line.strip() for line in f if line.strip()]
  if not out:
    raise ValueError('No prompts: pass --prompt (repeatable) or --prompt_file.')
  return out


def sample_to_folder(loaded: Loaded, out_dir: str, prompts: Sequence[str],
                     recipe: SamplerSettings, *, seed=0, samples_per_prompt=1,
                     batch_size=64) -> dict:
  """Writes one PNG per sample, grid.png and manifest.jsonl into out_dir; returns a summary.

  `recipe`: how to sample (start from `specs.sampler(loaded.config)`, see
  `diffusion.spec.overridden`). Sample k of the run gets seed + k.
  """
  gen = loaded.generator
  jobs = [(p, seed + i * samples_per_prompt + j) for i, p in enumerate(prompts)
          for j in range(samples_per_prompt)]
  # What every manifest line records besides its file, prompt and seed.
  record = {**recipe.record(), 'grid': schedules.effective_grid(gen.spec, recipe.name),
            'checkpoint_step': loaded.step}
  if gen.vae is not None:  # Latent diffusion: which autoencoder decoded the samples.
    record['autoencoder'] = gen.vae.fingerprint
  os.makedirs(out_dir, exist_ok=True)
  all_images, t0 = [], time.time()
  with open(os.path.join(out_dir, 'manifest.jsonl'), 'w') as manifest:
    for start in range(0, len(jobs), batch_size):
      chunk = jobs[start:start + batch_size]
      pad = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(jobs) > batch_size else chunk
      out = gen(loaded.unet_params, loaded.text_params, [p for p, _ in pad],
                seed=[s for _, s in pad], settings=recipe)
      imgs = images.to_uint8(out[:len(chunk)])
      for k, ((prompt, s), img) in enumerate(zip(chunk, imgs)):
        name = f'{start + k:05d}.png'
        images.save_png(img, os.path.join(out_dir, name))
        manifest.write(json.dumps({'file': name, 'prompt': prompt, 'seed': s, **record}) + '\n')
      all_images.append(imgs)
      logging.info('Sampled %d/%d images (%.1fs).', min(start + batch_size, len(jobs)), len(jobs),
                   time.time() - t0)
  grid = images.captioned_grid(np.concatenate(all_images), list(prompts), samples_per_prompt)
  images.save_png(grid, os.path.join(out_dir, 'grid.png'))
  return {'num_images': len(jobs), 'checkpoint_step': loaded.step, 'out_dir': out_dir,
          'seconds': time.time() - t0, 'devices': jax.device_count()}
