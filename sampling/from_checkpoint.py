"""Sampling from a workdir: load its saved config and a checkpoint, write PNGs, a grid and a manifest.

The parameters are restored onto whatever devices are present (a data-parallel mesh
over all of them), whatever mesh trained them.
"""

import json
import os
import time
from typing import Sequence

import jax
import numpy as np
from absl import logging

from diffusion import samplers, schedules
from sampling import generate, images
from training import checkpoint, loop, sharding


def load(workdir: str, step: int | None = None, *, use_ema: bool = True):
  """Returns (config, unet, text_encoder, unet_params, text_params, step, mesh)."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  config = ckpt.restore_config(step)
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  mesh = sharding.make_mesh(config.mesh)
  unet, text_encoder = loop.build_models(config)
  tx, _ = loop.make_optimizer(config.optim)
  abstract, shardings, _ = loop.create_sharded_state(config, mesh, unet=unet,
                                                     text_encoder=text_encoder, tx=tx)
  state, _ = ckpt.restore(checkpoint.abstract_with_shardings(abstract, shardings), step)
  ckpt.close()
  params = state.ema_params if use_ema else state.params
  text_params = params['text'] if text_encoder.trainable else text_encoder.init(None)
  return config, unet, text_encoder, params['unet'], text_params, int(state.step), mesh


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


def sample_to_folder(workdir: str, out_dir: str, prompts: Sequence[str], *, step=None,
                     sampler=None, num_steps=None, guidance_scale=None, eta=None, seed=0,
                     samples_per_prompt=1, batch_size=64, use_ema=True, sampling_grid=None,
                     guidance_rescale=0.0, guidance_interval=None, threshold_percentile=None,
                     sampler_opts: dict | None = None) -> dict:
  """Writes one PNG per sample, grid.png and manifest.jsonl into out_dir; returns a summary.

  `eta` (None: the config's sampler.eta for DDIM, else the sampler's default) and
  `sampler_opts` (e.g. {'s_churn': 10}; None values are left out) are the sampler's options;
  one the sampler does not take raises ValueError before anything is sampled.
  """
  config, unet, text_encoder, unet_params, text_params, ckpt_step, mesh = load(
      workdir, step, use_ema=use_ema)
  sampler = sampler or config.sampler.name
  num_steps = int(num_steps or config.sampler.num_steps)
  w = float(config.sampler.guidance_scale if guidance_scale is None else guidance_scale)
  opts = {k: float(v) for k, v in (sampler_opts or {}).items() if v is not None}
  eta = generate.config_eta(config.sampler, sampler) if eta is None else eta
  if eta is not None:
    opts['eta'] = float(eta)
  samplers.sampler_options(sampler, **opts)  # A clear error before compiling.
  if sampling_grid:
    config.diffusion.sampling_grid = sampling_grid
  gen = generate.Generator(unet, text_encoder, config, mesh)
  jobs = [(p, seed + i * samples_per_prompt + j) for i, p in enumerate(prompts)
          for j in range(samples_per_prompt)]
  # What every manifest line records besides its file, prompt and seed.
  settings = {'sampler': sampler, 'steps': num_steps, 'guidance': w, 'options': opts,
              'guidance_rescale': guidance_rescale, 'guidance_interval': guidance_interval,
              'threshold': threshold_percentile,
              'grid': schedules.effective_grid(config.diffusion, sampler),
              'checkpoint_step': ckpt_step}
  os.makedirs(out_dir, exist_ok=True)
  all_images, t0 = [], time.time()
  with open(os.path.join(out_dir, 'manifest.jsonl'), 'w') as manifest:
    for start in range(0, len(jobs), batch_size):
      chunk = jobs[start:start + batch_size]
      pad = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(jobs) > batch_size else chunk
      out = gen(unet_params, text_params, [p for p, _ in pad], seed=[s for _, s in pad],
                sampler=sampler, num_steps=num_steps, guidance_scale=w,
                guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                threshold_percentile=threshold_percentile, extra_opts=opts)
      imgs = images.to_uint8(out[:len(chunk)])
      for k, ((prompt, s), img) in enumerate(zip(chunk, imgs)):
        name = f'{start + k:05d}.png'
        images.save_png(img, os.path.join(out_dir, name))
        manifest.write(json.dumps({'file': name, 'prompt': prompt, 'seed': s, **settings}) + '\n')
      all_images.append(imgs)
      logging.info('Sampled %d/%d images (%.1fs).', min(start + batch_size, len(jobs)), len(jobs),
                   time.time() - t0)
  grid = images.captioned_grid(np.concatenate(all_images), list(prompts), samples_per_prompt)
  images.save_png(grid, os.path.join(out_dir, 'grid.png'))
  return {'num_images': len(jobs), 'checkpoint_step': ckpt_step, 'out_dir': out_dir,
          'seconds': time.time() - t0, 'devices': jax.device_count()}
