"""Sampling from a workdir: load its saved settings and a checkpoint, write PNGs, a grid and a
manifest. `restore` (the parameters only) is also what export/diffusers.py writes out.

The parameters are restored onto whatever devices are present (a data-parallel mesh
over all of them), whatever mesh trained them. The saved config becomes settings through the
`settings_of` the caller passes (sample.py: `configs.specs.from_saved`), so nothing here reads a
config.
"""

import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from absl import logging

from data import buckets
from diffusion import schedules
from diffusion.spec import SamplerSettings
from models import family, lora
from runtime import checkpoint, console, sharding, state
from runtime.settings import MeshSpec
from sampling import generate, images


class Loaded(NamedTuple):
  """A trained model read back from a workdir, ready to sample."""
  settings: Any  # The run's saved settings (fields added since: configs/base.py's defaults).
  generator: generate.Generator
  unet_params: Any
  text_params: Any
  step: int | None  # The checkpoint's training step (None: a pipeline folder, from_pipeline.py).
  pretrained: str = ''  # The diffusers folder sampled as it is (sample.py --pretrained), or ''.


class Restored(NamedTuple):
  """A checkpoint's parameters and what they were trained with (`restore`)."""
  settings: Any  # The run's saved settings (fields added since: configs/base.py's defaults).
  saved_config: dict  # The config the checkpoint saved, as written (`Checkpointer.saved_config`).
  autoencoder: Any  # The frozen VAE (models.vae_loading.PretrainedVAE), or None.
  unet: Any  # The denoiser module.
  text_encoder: Any  # text.encoders.TextEncoder.
  params: Any  # {'unet': ..., 'text': ... if the encoder trained}: the EMA (or raw) parameters
  # (with LoRA, 'unet' holds the adapters alone).
  step: int  # The checkpoint's training step.
  frozen: Any = None  # LoRA: {'unet': the base weights under the adapters (plain arrays)}.

  def weights(self, lora_scale: float = 1.0) -> dict:
    """{'unet': the whole network's parameters, 'text'?: the trained encoder's}: with LoRA, the
    adapters (their update scaled by `lora_scale`) over the frozen base."""
    if not self.frozen:
      return self.params
    return lora.combine(lora.scaled(self.params, lora_scale), self.frozen)


def restore(workdir: str, step: int | None = None, *, settings_of: Callable[[dict], Any],
            use_ema: bool = True, image_size: int | tuple[int, int] | None = None,
            allow_other_resolution: bool | None = None, mesh=None) -> Restored:
  """Reads the saved settings and only the (EMA) parameters of a checkpoint (default: the newest
  that restores) onto `mesh` (default: data-parallel over all devices).

  `settings_of`: the saved config (a plain dict) -> the run's settings. `image_size` (checked
  against the run's, see `check_resolution`) refuses an incompatible size before reading weights.
  """
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  mesh = mesh or sharding.make_mesh(MeshSpec.data_parallel())

  def restore_at(at):
    saved = ckpt.saved_config(at)
    settings = settings_of(saved)
    autoencoder = state.build_autoencoder(settings.autoencoder)
    if image_size is not None:  # (A user error: raised, not taken for a damaged checkpoint.)
      try:
        check_resolution(settings, image_size, allow_other_resolution, autoencoder)
      except ValueError as e:
        raise checkpoint.IncompatibleCheckpoint(str(e)) from None
    unet, text_encoder = state.build_networks(settings, autoencoder=autoencoder, workdir=workdir)
    abstract = state.abstract_params(
        mesh, settings.mesh.logical_axis_rules, unet=unet, text_encoder=text_encoder,
        input_shape=state.diffusion_shape(settings.data.image_size, autoencoder))
    params, _ = ckpt.restore_params(abstract, at, use_ema=use_ema)
    frozen = None
    if family.lora(settings.model):  # The adapters apply to the base they were trained on.
      base = family.pretrained(settings.model)()
      checkpoint.check_frozen(saved, checkpoint.FROZEN_BASE, base, settings.model.unet_folder,
                              ckpt.directory)
      frozen = {'unet': base}
    return Restored(settings, saved, autoencoder, unet, text_encoder, params, at, frozen)

  if step is None:  # The newest that restores; a damaged newer one is reported and skipped.
    restored = ckpt.restore_latest_intact(restore_at)
    if restored is None:
      raise FileNotFoundError(f'No checkpoint found in {ckpt.directory}: train first.')
    restored = restored[0]
  else:
    ckpt.resolve(step)  # FileNotFoundError listing the steps there are.
    console.quiet_closed_loop_errors()  # A failed restore's pending reads: no traceback each.
    try:
      restored = restore_at(step)
    except checkpoint.IncompatibleCheckpoint:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint.CheckpointError(
          f'--step={step}: the checkpoint {os.path.join(ckpt.directory, str(step))} cannot be '
          f'restored ({checkpoint.describe_error(e)}); leave out --step to use the newest intact '
          f'one (steps: {ckpt.all_steps()}).') from None
  ckpt.close()
  return restored


def load(workdir: str, step: int | None = None, *, settings_of: Callable[[dict], Any],
         use_ema: bool = True, sampling_grid: str | None = None,
         image_size: int | tuple[int, int] | None = None,
         allow_other_resolution: bool | None = None, lora_scale: float = 1.0) -> Loaded:
  """`restore`, then the generator that samples with those parameters, over all devices.

  `sampling_grid` (e.g. 'karras') samples on another grid than the run's
  diffusion.sampling_grid. `image_size` (default: the trained data.image_size; a side, or
  (height, width): a trained aspect-ratio bucket, data.buckets) samples at another size; that is
  refused unless `allow_other_resolution` (default: the run's data.allow_other_sample_size).
  `lora_scale` scales a LoRA run's adapters (0: the base alone).
  """
  mesh = sharding.make_mesh(MeshSpec.data_parallel())  # Data-parallel over all devices.
  r = restore(workdir, step, settings_of=settings_of, use_ema=use_ema, image_size=image_size,
              allow_other_resolution=allow_other_resolution, mesh=mesh)
  if lora_scale != 1.0 and not r.frozen:
    raise ValueError(f'--lora_scale={lora_scale}: {workdir} is not a LoRA run (model.lora.rank '
                     'is 0); leave the flag out.')
  weights = r.weights(lora_scale)
  text_params = weights['text'] if r.text_encoder.trainable else r.text_encoder.init(None)
  spec = r.settings.diffusion
  if sampling_grid:
    spec = spec.replace(sampling_grid=sampling_grid)
  gen = generate.Generator(r.unet, r.text_encoder, spec, image_size or r.settings.data.image_size,
                           mesh, autoencoder=r.autoencoder,
                           decode_chunk=r.settings.autoencoder.decode_chunk)
  return Loaded(r.settings, gen, weights['unet'], text_params, r.step)


def check_resolution(settings, image_size: int | tuple[int, int], allow: bool | None = None,
                     autoencoder=None) -> None:
  """Raises ValueError if `image_size` (a side, or (height, width)) is not a trained size
  (data.image_size, or an aspect-ratio bucket) and that is not allowed, or does not fit the
  network (and the `autoencoder` the run diffused in the latents of)."""
  vae_factor = 1 if autoencoder is None else autoencoder.config.downsample_factor
  square = np.ndim(image_size) == 0
  hw = (image_size, image_size) if square else tuple(image_size)
  trained = settings.data.image_size
  shapes = {(trained, trained)}
  if settings.data.bucketed:
    shapes |= set(buckets.of(settings.data, family.size_step(settings.model, vae_factor)))
  allow = settings.data.allow_other_sample_size if allow is None else allow
  named = f'--image_size={image_size}' if square else f'--height={hw[0]} --width={hw[1]}'
  if hw not in shapes and not allow:
    sizes = (f'{trained} px (data.image_size)' if len(shapes) == 1 else
             ', '.join(f'{h}x{w}' for h, w in sorted(shapes)) + ' px (height x width: '
             'data.image_size and the buckets, data.buckets)')
    raise ValueError(
        f'{named}: this model was trained at {sizes}, and a diffusion model sampled at another '
        'size usually makes worse images (objects repeated or cut). Pass '
        '--allow_other_resolution (or train with data.allow_other_sample_size=True) to sample at '
        'it anyway.')
  check_fits(settings.model, image_size, vae_factor)


def check_fits(model_spec, image_size: int | tuple[int, int], vae_factor: int) -> None:
  """Raises ValueError naming --image_size, --height or --width unless each side of `image_size`
  (a side, or (height, width)) fits the network (models.family.check_image_size: the U-Net's
  levels x the VAE's factor); the attention levels stay those of the trained size."""
  sides = ([(image_size, '--image_size')] if np.ndim(image_size) == 0 else
           [(image_size[0], '--height'), (image_size[1], '--width')])
  for side, name in sides:
    family.check_image_size(model_spec, side, name, vae_factor=vae_factor, attention=False)


def sample_to_folder(loaded: Loaded, out_dir: str, prompts: Sequence[str],
                     recipe: SamplerSettings, *, seed=0, samples_per_prompt=1,
                     batch_size=64, progress: bool = False, negative_prompt: str = '') -> dict:
  """Writes one PNG per sample, grid.png and manifest.jsonl into out_dir; returns a summary.

  `recipe`: how to sample (start from `loaded.settings.sampler`, see
  `diffusion.spec.overridden`). Sample k of the run gets seed + k. `negative_prompt` (one for all
  prompts) is what guidance's unconditional branch encodes ('': the empty caption). The captioned
  grid (`images.captioned_pages`) is grid.png, then grid_2.png, grid_3.png ... when it takes more
  than one screen-sized page; the summary's 'grids' lists their paths, its 'compile_seconds' the
  time spent tracing (or loading the traced program) and compiling (or loading) the sampler.
  """
  gen = loaded.generator
  compile_seconds = gen.compile_seconds
  jobs = [(p, seed + i * samples_per_prompt + j) for i, p in enumerate(prompts)
          for j in range(samples_per_prompt)]
  # What every manifest line records besides its file, prompt and seed.
  record = {**recipe.record(), 'grid': schedules.effective_grid(gen.spec, recipe.name),
            'checkpoint_step': loaded.step, 'image_size': gen.image_size}
  if negative_prompt:
    record['negative_prompt'] = negative_prompt
  if loaded.pretrained:
    record['pretrained'] = loaded.pretrained
  if gen.vae is not None:  # Latent diffusion: which autoencoder decoded the samples.
    record['autoencoder'] = gen.vae.fingerprint
  os.makedirs(out_dir, exist_ok=True)
  all_images, t0 = [], time.time()
  bar = console.progress(len(jobs), 'sample', 'img', disable=not progress)
  with open(os.path.join(out_dir, 'manifest.jsonl'), 'w') as manifest, bar:
    for start in range(0, len(jobs), batch_size):
      chunk = jobs[start:start + batch_size]
      pad = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(jobs) > batch_size else chunk
      out = gen(loaded.unet_params, loaded.text_params, [p for p, _ in pad],
                seed=[s for _, s in pad], settings=recipe, negative_prompt=negative_prompt)
      imgs = images.to_uint8(out[:len(chunk)])
      for k, ((prompt, s), img) in enumerate(zip(chunk, imgs)):
        name = f'{start + k:05d}.png'
        images.save_png(img, os.path.join(out_dir, name))
        manifest.write(json.dumps({'file': name, 'prompt': prompt, 'seed': s, **record}) + '\n')
      all_images.append(imgs)
      bar.update(len(chunk))
      logging.info('Sampled %d/%d images (%.1fs).', min(start + batch_size, len(jobs)), len(jobs),
                   time.time() - t0)
  pages = images.captioned_pages(np.concatenate(all_images), list(prompts), samples_per_prompt)
  grids = images.save_pages(pages, out_dir, 'grid')
  return {'num_images': len(jobs), 'checkpoint_step': loaded.step, 'out_dir': out_dir,
          'seconds': time.time() - t0, 'devices': jax.device_count(), 'grids': grids,
          'compile_seconds': gen.compile_seconds - compile_seconds}
