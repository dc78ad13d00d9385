"""Trains a small AutoencoderKL on the repository's own data: the CPU demonstration of a latent space.

The network is `models.autoencoder.AutoencoderKL` (Stable Diffusion's VAE) at a tiny width; the
objective is Rombach et al. 2022 (arXiv:2112.10752, sec. 3 and appendix G) without the LPIPS and
GAN terms: mean |x - D(z)| with z ~ q(z|x), plus kl_weight * KL(q(z|x) || N(0, I)) per latent
element. At the end the latent scale is estimated as SD did (scaling_factor = 1 / std of posterior
samples, sec. 4.3.2) and the VAE is written as a diffusers folder with `save_vae`.

  python -m tools.train_autoencoder --out=runs/vae_shapes --image_size=64 --steps=600 --batch_size=16

writes to --out: config.json + diffusion_pytorch_model.safetensors (load with
`models.vae_loading.load_vae(out)`), reconstructions.png (8 held-out images over their
reconstructions) and summary.json (final L1, PSNR, scaling factor, speed).

The default VAE, channels (16, 32, 32) with one ResNet per level, 8 groups and mid-block attention,
downsamples 4x: 64 px Shapes -> 16 x 16 x 4 latents, the size the 16 px pixel-space U-Net already
handles. Its cost is the 64 px level: (32, 64, 64) ran 0.42 steps/s at batch 32 on 2 shared CPU
cores (~125 steps in 5 minutes), (16, 32, 32) runs ~2.2 steps/s at batch 16, so the command above
takes about 5 minutes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax

from absl import logging

from data import pipeline, sources
from models.autoencoder import AutoencoderKL, VAEConfig
from models import vae_loading

DEMO_CHANNELS = (16, 32, 32)  # 64 px -> 16 x 16 x 4 latents; ~2 steps/s at batch 16 on 2 CPU cores.
SCALE_BATCHES = 4  # Held-out batches for the scaling factor and the PSNR.


def demo_config(channels: Sequence[int] = DEMO_CHANNELS, latent_channels: int = 4,
                norm_num_groups: int = 8, image_size: int = 64) -> VAEConfig:
  """The demonstration VAE: `channels` levels, 1 ResNet per level, mid-block attention on."""
  n = len(channels)
  return VAEConfig(block_out_channels=tuple(channels), layers_per_block=1,
                   latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                   sample_size=image_size, down_block_types=('DownEncoderBlock2D',) * n,
                   up_block_types=('UpDecoderBlock2D',) * n, mid_block_add_attention=True,
                   source='the autoencoder training arguments')


# ----------------------------------------------------------------------------- loss and step


def vae_loss(model: AutoencoderKL, params: Any, images: jax.Array, rng: jax.Array,
             kl_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """mean |x - D(z)|, z ~ q(z|x), plus kl_weight * mean KL per latent element (ibid., eq. 25)."""
  posterior = model.apply({'params': params}, images, method=AutoencoderKL.encode)
  recon = model.apply({'params': params}, posterior.sample(rng), method=AutoencoderKL.decode)
  l1 = jnp.mean(jnp.abs(images - recon))
  kl = jnp.mean(posterior.kl()) / math.prod(posterior.mean.shape[1:])
  return l1 + kl_weight * kl, {'loss': l1 + kl_weight * kl, 'l1': l1, 'kl': kl}


def make_train_step(model: AutoencoderKL, optimizer: optax.GradientTransformation,
                    kl_weight: float):
  """(params, opt_state, images, rng) -> (params, opt_state, metrics), jitted, state donated."""
  def train_step(params, opt_state, images, rng):
    grad_fn = jax.grad(lambda p: vae_loss(model, p, images, rng, kl_weight), has_aux=True)
    grads, metrics = grad_fn(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics['grad_norm'] = optax.global_norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics
  return jax.jit(train_step, donate_argnums=(0, 1))


def init_params(model: AutoencoderKL, image_size: int, seed: int) -> Any:
  """The module's initialisation (lecun-normal kernels truncated at 2 std, zero biases, unit norm
  scales), drawn with numpy from `seed`: `model.init` costs ~10 s of XLA compilation on CPU."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, model.config.in_channels),
                                jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x), images)['params'])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':  # flax truncated_normal(stddev=1) / .87962566 keeps the variance 1/fan_in.
      z = rng.standard_normal(leaf.shape)
      while np.any(np.abs(z) > 2):
        bad = np.abs(z) > 2
        z[bad] = rng.standard_normal(int(bad.sum()))
      fan_in = math.prod(leaf.shape[:-1])
      return jnp.asarray(z / 0.87962566103423978 / np.sqrt(fan_in), leaf.dtype)
    return (jnp.ones if name == 'scale' else jnp.zeros)(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def psnr(mse: float) -> float:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
  return float(10.0 * np.log10(4.0 / max(mse, 1e-12)))


# ----------------------------------------------------------------------------- training


def _check(name: str, value: Any, kind: type, positive: bool = True) -> None:
  if isinstance(value, bool) or not isinstance(value, kind) or (
      positive and value <= 0) or (not positive and value < 0):
    raise ValueError(f'{name}={value!r} must be a {"positive" if positive else "non-negative"} '
                     f'{kind.__name__}.')


def _loaders(data_spec, batch_size: int):
  """(train loader, held-out loader, held-out split name) over a `DataSpec` at `batch_size`."""
  cfg = data_spec.replace(global_batch_size=batch_size)
  train = pipeline.make_loader(cfg, pipeline.make_source(cfg, 'train'))
  held_out = sources.make(cfg, 'eval')
  if held_out is None:  # No eval split configured (data.eval_path): say so in the summary.
    logging.warning('no held-out split (set data.eval_path): PSNR is measured on training images.')
    return train, train, 'train'
  return train, pipeline.make_loader(cfg, held_out), 'eval'


def _held_out(loader, n: int) -> list[np.ndarray]:
  return [loader(step)['image'] for step in range(n)]


def train_autoencoder(data_config, vae_config: VAEConfig, *, steps: int = 2000,
                      batch_size: int = 32, learning_rate: float = 1e-3, kl_weight: float = 1e-6,
                      seed: int = 0, out_dir: str, log_every: int = 100,
                      progress: bool = True) -> dict[str, Any]:
  """Trains `vae_config` on `data_config`'s images and saves it to `out_dir` (diffusers layout).

  Args:
    data_config: the data section as a `data.spec.DataSpec` (dataset, path, image_size, seed);
      its global_batch_size is replaced by `batch_size`.
    vae_config: the network (image_size must be a multiple of its downsample_factor).
    steps, batch_size, learning_rate: AdamW (b2=0.99, 1e-4 decay, global-norm clip 1) with a
      linear warmup over min(100, steps // 10) steps.
    kl_weight: weight of the KL per latent element against the per-pixel L1.
    seed: parameter init and posterior sampling (fold_in(seed, step)); data order is data.seed.
    out_dir: where config.json, the safetensors, reconstructions.png and summary.json go.
    log_every: steps between logged (and NaN-checked) metrics; the last step is always logged.
    progress: show a tqdm bar.
  Returns:
    summary: final l1 and kl (last logged step), history [(step, l1, kl)], held-out l1 and psnr
    (posterior mean), scaling_factor, steps_per_s, seconds, out_dir.
  """
  for name, value in (('steps', steps), ('batch_size', batch_size), ('log_every', log_every)):
    _check(name, value, int)
  _check('seed', seed, int, positive=False)
  _check('learning_rate', float(learning_rate), float)
  _check('kl_weight', float(kl_weight), float, positive=False)
  if not math.isfinite(learning_rate) or not math.isfinite(kl_weight):
    raise ValueError(f'learning_rate={learning_rate} and kl_weight={kl_weight} must be finite.')
  f, size = vae_config.downsample_factor, data_config.image_size
  if size % f:
    raise ValueError(f'image_size={size} must be a multiple of the VAE downsample factor {f} '
                     f'(2 ** (len(block_out_channels) - 1) = {len(vae_config.block_out_channels)}'
                     ' levels); change image_size or the channels.')
  train_loader, eval_loader, eval_split = _loaders(data_config, batch_size)

  model = AutoencoderKL(vae_config)
  params = init_params(model, size, seed)
  root = jax.random.key(seed)
  warmup = max(1, min(100, steps // 10))
  schedule = optax.linear_schedule(0.0, learning_rate, warmup)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b2=0.99, weight_decay=1e-4))
  opt_state = optimizer.init(params)
  train_step = make_train_step(model, optimizer, float(kl_weight))

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  history, start, compiled_at = [], time.perf_counter(), None
  batches = pipeline.iterate(train_loader, 0, steps, prefetch=2)
  try:
    bar = tqdm(batches, total=steps, unit='step', desc='vae', disable=not progress,
               dynamic_ncols=True)
    for step, batch in bar:
      params, opt_state, metrics = train_step(params, opt_state, jnp.asarray(batch['image']),
                                              jax.random.fold_in(root, step))
      if step == 0:
        jax.block_until_ready(metrics)
        compiled_at = time.perf_counter()
      if (step + 1) % log_every == 0 or step == steps - 1 or step == 0:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(v) for v in m.values()):
          raise FloatingPointError(f'non-finite metrics at step {step}: {m}; lower '
                                   '--learning_rate.')
        history.append((step, m['l1'], m['kl']))
        logging.info('vae step %d: l1 %.4f, kl %.4g, grad_norm %.3g', step, m['l1'], m['kl'],
                     m['grad_norm'])
        bar.set_postfix(l1=f'{m["l1"]:.4f}', kl=f'{m["kl"]:.3g}')
  finally:
    batches.close()
  jax.block_until_ready(params)
  end = time.perf_counter()
  steps_per_s = (steps - 1) / (end - compiled_at) if steps > 1 else 1.0 / (end - start)

  summary, recon = evaluate(model, params, eval_loader, jax.random.fold_in(root, steps))
  summary.update(
      final_l1=history[-1][1], final_kl=history[-1][2], history=history, held_out=eval_split,
      steps=steps, batch_size=batch_size, kl_weight=float(kl_weight), steps_per_s=steps_per_s,
      seconds=end - start, out_dir=os.path.abspath(out_dir))
  vae_loading.save_vae(out_dir, vae_config, params, scaling_factor=summary['scaling_factor'])
  save_comparison(os.path.join(out_dir, 'reconstructions.png'), eval_loader(0)['image'][:8],
                  recon[:8])
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f_out:
    json.dump(summary, f_out, indent=2)
  return summary


def evaluate(model: AutoencoderKL, params: Any, loader, rng: jax.Array,
             num_batches: int = SCALE_BATCHES) -> tuple[dict[str, float], np.ndarray]:
  """Held-out l1 and psnr of decode(posterior mean), scaling_factor = 1 / std(z ~ q(z|x)), and
  the reconstructions of the first held-out batch."""
  @jax.jit
  def run(params, images, key):
    posterior = model.apply({'params': params}, images, method=AutoencoderKL.encode)
    recon = model.apply({'params': params}, posterior.mean, method=AutoencoderKL.decode)
    err = images - recon
    return jnp.abs(err).mean(), jnp.square(err).mean(), posterior.sample(key), recon

  l1s, mses, latents, first = [], [], [], None
  for i, images in enumerate(_held_out(loader, num_batches)):
    l1, mse, z, recon = jax.device_get(run(params, jnp.asarray(images), jax.random.fold_in(rng, i)))
    first = recon if first is None else first
    l1s.append(float(l1))
    mses.append(float(mse))
    latents.append(np.asarray(z))
  std = float(np.std(np.concatenate(latents)))
  if not np.isfinite(std) or std <= 0:
    raise FloatingPointError(f'latent std={std}: the VAE collapsed; lower --learning_rate.')
  mse = float(np.mean(mses))
  return {'l1': float(np.mean(l1s)), 'mse': mse, 'psnr': psnr(mse), 'latent_std': std,
          'scaling_factor': 1.0 / std}, np.asarray(first)


def save_comparison(path: str, originals: np.ndarray, recon: np.ndarray) -> str:
  """A PNG with `originals` (top row) over `recon` (bottom row), images in [-1, 1], 2 px gaps."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows = []
  for row in (originals, recon):
    padded = [np.pad(x, ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for x in row]
    rows.append(np.concatenate(padded, axis=1))
  grid = np.concatenate(rows, axis=0)
  pixels = np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)
  Image.fromarray(pixels).save(path)
  return path


# ----------------------------------------------------------------------------- command line


def _define_flags(flags) -> None:
  flags.DEFINE_string('out', None, 'Output folder (diffusers VAE layout, PNG, summary.json).')
  flags.DEFINE_string('dataset', 'shapes_rendered', "data.dataset: 'shapes_rendered', 'folder', ...")
  flags.DEFINE_string('data_path', '', 'data.path (folder: the image tree).')
  flags.DEFINE_string('eval_path', '', 'data.eval_path: held-out images (folder).')
  flags.DEFINE_integer('image_size', 64, 'Side of the square training images, in pixels.')
  flags.DEFINE_integer('steps', 2000, 'Training steps.')
  flags.DEFINE_integer('batch_size', 32, 'Images per step.')
  flags.DEFINE_list('channels', [str(c) for c in DEMO_CHANNELS], 'block_out_channels.')
  flags.DEFINE_integer('latent_channels', 4, 'Latent channels.')
  flags.DEFINE_integer('norm_num_groups', 8, 'GroupNorm groups (must divide every channel count).')
  flags.DEFINE_float('learning_rate', 1e-3, 'Peak AdamW learning rate.')
  flags.DEFINE_float('kl_weight', 1e-6, 'KL weight (per latent element, against per-pixel L1).')
  flags.DEFINE_integer('seed', 0, 'Init/sampling seed (also data.seed).')
  flags.DEFINE_integer('log_every', 50, 'Steps between logged metrics.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse(argv):
  """absl flag parsing whose errors (bad value, unknown flag) are one `error:` line, exit 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import base, specs  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; every option is a --flag.')
  try:
    if not f.out:
      raise ValueError('--out is required: the folder the trained VAE is written to.')
    try:
      channels = tuple(int(c) for c in f.channels)
    except ValueError:
      raise ValueError(f'--channels={",".join(f.channels)!r} must be comma-separated integers, '
                       'e.g. 32,64,64.') from None
    data = specs.build(base.get_config()).data.replace(
        dataset=f.dataset, path=f.data_path, eval_path=f.eval_path, image_size=f.image_size,
        seed=f.seed)
    vae = demo_config(channels, f.latent_channels, f.norm_num_groups, f.image_size)
    summary = train_autoencoder(data, vae, steps=f.steps, batch_size=f.batch_size,
                                learning_rate=f.learning_rate, kl_weight=f.kl_weight,
                                seed=f.seed, out_dir=f.out, log_every=f.log_every,
                                progress=f.progress)
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e))
  print(f'Wrote {summary["out_dir"]}: {summary["steps"]} steps in {summary["seconds"]:.0f} s '
        f'({summary["steps_per_s"]:.2f} steps/s); final train L1 {summary["final_l1"]:.4f}; '
        f'{summary["held_out"]} L1 {summary["l1"]:.4f}, PSNR {summary["psnr"]:.2f} dB; '
        f'scaling_factor {summary["scaling_factor"]:.4f}.')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from absl import app, flags as absl_flags  # pylint: disable=g-import-not-at-top
  _define_flags(absl_flags)
  app.run(main, flags_parser=_parse)
