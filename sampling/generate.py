"""Text-to-image generation: tokens -> guided sampler -> images, as one jitted function.

`Generator(unet, text_encoder, diffusion_spec, image_size)(params..., prompts, seed=...,
settings=SamplerSettings, negative_prompt='')`; with `autoencoder=` it samples latents and decodes
them. The unconditional branch of classifier-free guidance encodes `negative_prompt` (the empty
caption by default). The guidance strengths, sampler options, seeds, the negative prompt and
given initial latents are traced arguments, so changing them reuses the compiled program; the
sampler, its step count (the grid's length), thresholding on or off and the batch shape are what
compile. Each program's trace is kept on disk as the train step's is (`runtime/trace_cache.py`),
so a second process (`sample.py` on the same workdir, the eval grid of a resumed run) loads it
instead of tracing the networks again; the outputs are the same, bit for bit. Given a `mesh`, the
batch is split over its batch axes ('data', 'fsdp'; padded with copies of its last example to a
multiple of their size), so each device samples its share instead of all of them the whole batch.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion import guidance, samplers, schedules
from diffusion.spec import DiffusionSpec, SamplerSettings
from models import denoiser
from text.encoders import NULL_CAPTION
from runtime import compile_cache, sharding, trace_cache
from runtime import state as state_lib


def _cond(encode, text_params, ids):
  emb, mask, pooled = encode(text_params, ids)
  return {'emb': emb, 'mask': mask, 'pooled': pooled}


class Generator:
  """Holds the compiled sampling program for one (U-Net, text encoder, diffusion spec, size)."""

  def __init__(self, unet, text_encoder, spec: DiffusionSpec, image_size: int | tuple[int, int],
               mesh=None, *, autoencoder=None, decode_chunk: int | None = None):
    """`image_size`: the side S of square images, or (height, width). `autoencoder`: a frozen
    `models.vae_loading.PretrainedVAE` for latent diffusion (the sampler runs on its latents,
    which are decoded `decode_chunk` at a time, the run's autoencoder.decode_chunk), or None."""
    if autoencoder is not None and not decode_chunk:
      raise ValueError('A latent-diffusion Generator needs decode_chunk (autoencoder.decode_chunk).')
    self.unet = unet
    self.text = text_encoder
    self.spec = spec
    self.vae, self.decode_chunk = autoencoder, decode_chunk
    self.image_size = image_size
    height, width = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
    self.vae_params = None
    if autoencoder is None:
      self.image_shape = (height, width, 3)
    else:
      f, c = autoencoder.config.downsample_factor, autoencoder.config.latent_channels
      self.image_shape = (height // f, width // f, c)  # The latent the sampler draws.
      self.vae_params = jax.device_put(
          autoencoder.params, NamedSharding(mesh, P()) if mesh is not None else None)
    self.mesh = mesh
    self._out_sharding = NamedSharding(mesh, P()) if mesh is not None else None
    # What the traces read besides their arguments: with the static arguments, their key.
    self._key = {**state_lib.networks_key(unet, text_encoder, autoencoder), 'spec': spec,
                 'image_shape': self.image_shape, 'decode_chunk': decode_chunk,
                 'out': repr(self._out_sharding)}
    self._programs: dict[tuple, trace_cache.Program] = {}  # (static, latents given) -> program.
    self._noise = jax.jit(self._draw_noise)

  def _draw_noise(self, seeds):
    # One key per example (its seed), so a deterministic sampler's image depends on its seed alone.
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    return jax.vmap(lambda k: jax.random.normal(k, self.image_shape, jnp.float32))(keys)

  def _sample(self, unet_params, text_params, vae_params, ids, uncond_ids, logsnrs, seeds, noise,
              noise_scale, strengths, opts, *, sampler_name, thresholding):
    ids, seeds, noise = (None if x is None else self._split(x) for x in (ids, seeds, noise))
    cond = _cond(self.text.encode, text_params, ids)
    uncond = _cond(self.text.encode, text_params, jnp.broadcast_to(uncond_ids, ids.shape))
    model_fn = denoiser.x0_model(self.unet, unet_params, self.spec)
    denoise_fn = guidance.guided_denoiser(model_fn, cond, uncond, strengths,
                                          thresholding=thresholding)
    if noise is None:
      noise = self._split(self._draw_noise(seeds))
    rng_sampler = jax.random.fold_in(jax.random.PRNGKey(seeds[0]), 1)
    x0 = samplers.get_sampler(sampler_name)(denoise_fn, noise * noise_scale, logsnrs, rng_sampler,
                                            **opts)
    if self.vae is not None:
      chunk = min(self.decode_chunk, x0.shape[0])
      x0 = self.vae.decode_chunked(vae_params, self.vae.from_latents(x0), chunk)
    return jnp.clip(x0, -1.0, 1.0)

  def _split(self, x):
    """`x` with its leading (batch) axis over the mesh's batch axes (traced; no mesh: as it is)."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(self.mesh, x.ndim))

  def _batch_multiple(self) -> int:
    """The sampled batch is padded to a multiple of this: the mesh's batch-axis size."""
    return 1 if self.mesh is None else sharding.batch_size_of(self.mesh)

  def __call__(self, unet_params, text_params, prompts: Sequence[str], *, seed,
               settings: SamplerSettings, negative_prompt: str = NULL_CAPTION,
               latents=None) -> np.ndarray:
    """Samples one image per prompt with `settings`; float32 [len(prompts), H, W, 3] in [-1, 1].

    `seed` is an int (example i gets seed + i) or a sequence of per-example seeds; the initial
    noise is `initial_noise(seeds)` unless `latents` ([B, h, w, c] ~ N(0, I), diffusers'
    `latents=` in NHWC) gives it. `negative_prompt` is what the unconditional branch encodes.
    The guidance strengths, sampler options, seeds, negative prompt and latents are traced: new
    values reuse the compiled program; the sampler, its step count, thresholding on/off and the
    batch shape compile.
    """
    args, static = self._inputs(unet_params, text_params, prompts, seed, settings,
                                negative_prompt, latents)
    program = self._program(static, latents is not None)
    seconds = program.start_seconds
    with compile_cache.gc_paused():  # A new sampler, step count or batch shape traces.
      out = program(*args)
    if program.start_seconds > seconds:
      logging.info('%s: ready in %.2f s (its trace, or the trace cache; then XLA, or its cache).',
                   program.name, program.start_seconds - seconds)
    return np.asarray(jax.device_get(out))[:len(prompts)]  # Without the padding.

  def _program(self, static: dict, latents_given: bool) -> trace_cache.Program:
    """The jitted sampler for these static arguments, its trace kept on disk (made once)."""
    key = (tuple(sorted(static.items())), latents_given)
    if key not in self._programs:
      jitted = jax.jit(functools.partial(self._sample, **static), out_shardings=self._out_sharding)
      self._programs[key] = trace_cache.Program(
          jitted, name=f"sample_{static['sampler_name']}", key={**self._key, 'static': key})
    return self._programs[key]

  @property
  def compile_seconds(self) -> float:
    """Seconds its calls spent tracing (or loading traces) and compiling (or loading programs)."""
    return sum(p.start_seconds for p in self._programs.values())

  def initial_noise(self, seeds: Sequence[int]) -> np.ndarray:
    """The N(0, I) noise [B, h, w, c] sampling starts from for these per-example seeds (before
    the scheduler's scale, `schedules.initial_noise_scale`): diffusers' `latents=` in NHWC."""
    return np.asarray(self._noise(np.asarray(seeds, np.int32)))

  def lower(self, unet_params, text_params, prompts: Sequence[str], *, seed,
            settings: SamplerSettings, negative_prompt: str = NULL_CAPTION,
            latents=None) -> jax.stages.Lowered:
    """The program `__call__` runs for these inputs, lowered (for its HLO and cost analysis);
    traced (or loaded) and compiled first, as the first call would."""
    args, static = self._inputs(unet_params, text_params, prompts, seed, settings,
                                negative_prompt, latents)
    return self._program(static, latents is not None).lower(*args)

  def _inputs(self, unet_params, text_params, prompts, seed, settings, negative_prompt,
              latents) -> tuple[tuple, dict]:
    """(positional, static keyword) arguments of the jitted sampler for this call."""
    ids = np.asarray(self.text.tokenize(list(prompts)))
    uncond_ids = np.asarray(self.text.tokenize([negative_prompt]))
    logsnrs = schedules.sampling_logsnrs(self.spec, settings.num_steps, settings.name)
    noise_scale = np.float32(schedules.initial_noise_scale(self.spec, logsnrs, settings.name))
    seeds = np.asarray(seed, np.int32) if np.ndim(seed) else np.int32(seed) + np.arange(
        len(ids), dtype=np.int32)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      if latents.shape != (len(ids),) + self.image_shape:
        raise ValueError(f'latents of shape {latents.shape}: expected '
                         f'{(len(ids),) + self.image_shape} (one N(0, I) array per prompt, NHWC).')
    pad = -len(ids) % self._batch_multiple()  # Copies of the last example, dropped after.
    ids, seeds, latents = (None if x is None else np.concatenate([x, np.repeat(x[-1:], pad, 0)])
                           for x in (ids, seeds, latents))
    return ((unet_params, text_params, self.vae_params, ids, uncond_ids, logsnrs, seeds, latents,
             noise_scale, settings.guidance(), settings.sampler_kwargs()),
            {'sampler_name': settings.name, 'thresholding': settings.thresholding})

  def compiled_count(self) -> int:
    """How many programs have been compiled (tests check that w and seed do not add any)."""
    return sum(p.compiled_count() for p in self._programs.values())
