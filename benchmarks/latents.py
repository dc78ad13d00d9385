"""Latent diffusion's train step: latents encoded on the fly against cached posterior moments.

  PYTHONPATH=. .venv/bin/python -m benchmarks.latents --config=configs/shapes.py:cpu \
      --config.data.image_size=64 --config.autoencoder.path=runs/vae_shapes64 [--rounds=5 --steps=10]

Builds the run's jitted `train_step` (training/builder.py) once and times it on two batches of the
config's shape: images only (the frozen encoder runs in the step), and images plus stored moments
(as `tools.prepare --autoencoder` records give; the encoder is skipped). The two are timed in turn,
A B A B, `--rounds` times `--steps` steps after a compile-and-warm-up step each; the ratio is the
median of the per-round ratios. Prints images/s of both on the device present.
"""
import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from configs import loading, validation
from data import shapes
from runtime import sharding
from training import builder


def _flag(argv, name, default):
  for arg in argv:
    if arg.startswith(f'--{name}='):
      return type(default)(arg.split('=', 1)[1])
  return default


def main(argv):
  spec, overrides = loading.split_argv(
      [a for a in argv[1:] if not a.startswith(('--rounds=', '--steps=', '--json_out='))],
      'configs/shapes.py:cpu')
  rounds, steps, json_out = _flag(argv, 'rounds', 5), _flag(argv, 'steps', 10), _flag(
      argv, 'json_out', '')
  config = loading.load(spec, overrides)
  if not config.autoencoder.path:
    sys.exit('error: set --config.autoencoder.path to a VAE folder (the latents are its).')
  settings = validation.validate(config)
  mesh = sharding.make_mesh(settings.mesh)
  trainer = builder.build_trainer(settings, mesh)  # No records: its step takes images.
  frozen, vae_params = trainer.frozen_weights, trainer.vae_params
  b, s = config.data.global_batch_size, config.data.image_size
  rng = np.random.default_rng(0)
  latent = (s // trainer.autoencoder.config.downsample_factor,) * 2 + (
      trainer.autoencoder.config.latent_channels,)
  fly = {'image': rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32), 'bad': np.zeros(b, np.int32),
         **trainer.text_inputs.from_captions([shapes.example('train', i, 32)[1] for i in range(b)])}
  cached = {k: v for k, v in fly.items() if k != 'image'}  # As the loader gives: no images.
  cached.update(latent_mean=rng.normal(size=(b,) + latent).astype(np.float32),
                latent_logvar=np.full((b,) + latent, -4.0, np.float32))
  # The same step over batches of stored moments (what cached records give the loop).
  cached_step = builder.jit_train_step(
      settings, unet=trainer.unet, text_encoder=trainer.text_encoder,
      null_inputs=trainer.text_inputs.null, tx=trainer.tx, autoencoder=trainer.autoencoder,
      state_shardings=trainer.shardings,
      batch_shardings={k: sharding.batch_sharding(mesh, v.ndim) for k, v in cached.items()})
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(settings.mesh.logical_axis_rules):
    runs = {}
    for name, local, fn in (('on_the_fly', fly, trainer.step), ('cached', cached, cached_step)):
      batch = sharding.global_batch(mesh, local)
      state = trainer.init(jax.random.PRNGKey(0))
      t = time.perf_counter()
      state, m = fn(state, batch, jax.random.PRNGKey(0), frozen, vae_params)
      jax.block_until_ready(m)
      results[f'{name}_compile_s'] = time.perf_counter() - t
      runs[name] = [fn, batch, state, []]
    for _ in range(rounds):
      for name, run in runs.items():
        fn, batch, state, rates = run
        t = time.perf_counter()
        for _ in range(steps):
          state, m = fn(state, batch, jax.random.PRNGKey(0), frozen, vae_params)
        jax.block_until_ready((state, m))
        rates.append(steps * b / (time.perf_counter() - t))
        run[2] = state
  device = jax.devices()[0]
  for name, run in runs.items():
    results[f'{name}_img_per_s'] = statistics.median(run[3])
    results[f'{name}_rounds'] = run[3]
  ratio = statistics.median(c / f for c, f in zip(runs['cached'][3], runs['on_the_fly'][3]))
  results.update(ratio_cached_over_fly=ratio, device=f'{jax.device_count()} x {device.device_kind}',
                 batch=b, image_size=s, latent_shape=list(latent), spec=spec,
                 overrides=list(overrides))
  print(f"{spec} {' '.join(overrides)}\n  batch {b}, {s} px -> latents {latent} on "
        f"{results['device']}: on the fly {results['on_the_fly_img_per_s']:.1f} img/s, cached "
        f"{results['cached_img_per_s']:.1f} img/s, cached / on the fly {ratio:.2f} (median of "
        f'{rounds} interleaved rounds of {steps} steps)')
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main(sys.argv)
